"""`ila identify`: the ILA pipeline end to end (load, Stage 1, Stage 2, ranking, heatmap, report, manifest).

Reads a model and SFT data; writes a run folder (see README). Everything that can be wrong with the input is
checked before the run folder is created, so a bad call leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ila import distributed, sharding, tracking
from ila.compare import jaccard
from ila.config import IdentifyConfig, build_config, config_to_dict, drop_remote_code, read_yaml
from ila.errors import IlaError, NonFiniteLossError
from ila.html_report import write_html_report
from ila.identify_report import write_identify_report
from ila.layers import Layer, discover_layers
from ila.lora_adapters import LayerMask, load_lora, remove_lora
from ila.model_loading import LoadedModel, load_model, pick_device
from ila.plots import plot_heatmap
from ila.ranking import Ranking, rank_layers
from ila.run_folder import (
    hardware,
    package_versions,
    peak_memory,
    prepare_run_dir,
    read_manifest,
    reset_peak_memory,
    write_csv,
    write_json,
    write_yaml,
)
from ila.seeds import derive_seed
from ila.sft_data import SftData, eval_batches, load_sft_data
from ila.sharding import shard_if_enabled
from ila.stage1_lora import Stage1Result, run_stage1
from ila.stage2_mask import Stage2Result, run_stage2
from ila.training_loop import compile_blocks, enable_gradient_checkpointing, heldout_loss

log = logging.getLogger(__name__)


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class IdentifyResult:
    run_dir: Path
    ranking: Ranking
    stage1: Stage1Result | None
    stage2: Stage2Result
    heldout: dict[str, float]
    timings: dict[str, float]
    memory: dict[str, float]


def setup_runtime(cfg: IdentifyConfig) -> torch.device:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    return distributed.local_device() or pick_device(cfg.run.device)  # under a launcher: this process's device


def prepare_inputs(cfg: IdentifyConfig, timings: Timings) -> tuple[LoadedModel, list[Layer], SftData]:
    """Load and check everything a run needs; raises IlaError before anything is written."""
    if cfg.stage1.repeats > 1 and sharding.fsdp_enabled():
        raise IlaError(
            "stage1.repeats > 1 is not supported under FSDP (a sharded model cannot drop its LoRA layers); "
            "run one identify per seed (--seed) and average with ila compare, or launch without FSDP"
        )
    tracking.check_available(cfg.run.report_to)
    device = setup_runtime(cfg)
    with timings.measure("load model"):
        loaded = load_model(cfg.model, device, defer=sharding.ram_efficient_loading())
    layers = discover_layers(loaded.model, cfg.model.include_lm_head)
    if cfg.run.gradient_checkpointing or sharding.activation_checkpointing():
        enable_gradient_checkpointing(loaded.model)
    with timings.measure("load data"):
        data = load_sft_data(cfg.data, loaded.tokenizer, cfg.run.seed)
    return loaded, layers, data


def _mask_loss(
    model: torch.nn.Module, layers: list[Layer], keep: set[str], batches: list[Any], device: torch.device
) -> float:
    with LayerMask(model, layers) as mask:
        mask.values = torch.tensor([1.0 if layer.name in keep else 0.0 for layer in layers], device=device)
        return heldout_loss(model, batches, device)


def stage1_seed(cfg: IdentifyConfig, data: SftData, repeat: int = 0) -> int:
    """Stage 1's LoRA initialisation and batch order: pinned by stage1.seed (+ repeat), else derived from run.seed
    and the data, so that runs of one seed on two data sets do not share an initialisation. Repeat 0 is the
    seed of a run without repeats."""
    if cfg.stage1.seed is not None:
        return cfg.stage1.seed + repeat
    if repeat == 0:
        return derive_seed(cfg.run.seed, "stage1", data.stats.fingerprint)
    return derive_seed(cfg.run.seed, "stage1", data.stats.fingerprint, repeat)


def stage1_folders(run_dir: Path, repeat: int) -> tuple[Path, Path]:
    """Where Stage 1 and its Stage 2 write for one Stage-1 repeat: stage1/ and stage2/ for the first (as in a run
    without repeats), stage1-<i>/ and stage2-<i>/ for the others."""
    if repeat == 0:
        return run_dir / "stage1", run_dir / "stage2"
    return run_dir / f"stage1-{repeat}", run_dir / f"stage2-{repeat}"


def stage2_seed(cfg: IdentifyConfig, data: SftData, adapter: str, repeat: int) -> int:
    """Stage 2's batch order for one repeat (numbered across all Stage-1 repeats): pinned by stage2.seed
    (+ repeat), else derived from run.seed, the data and the Stage-1 adapter (final, final-<i> or milestone), so
    milestone and cross-data runs get their own order."""
    if cfg.stage2.seed is not None:
        return cfg.stage2.seed + repeat
    return derive_seed(cfg.run.seed, "stage2", data.stats.fingerprint, adapter, repeat)


def _delta_norm_mask_loss(
    cfg: IdentifyConfig, model: torch.nn.Module, layers: list[Layer], batches: list[Any], device: torch.device
) -> float:
    """The same hard mask on the layers with the largest Stage-1 updates (RMS of Δθ_i): the free ranking that
    Stage 2 has to beat for its cost to be worth paying."""
    from ila.baselines import delta_norm_scores

    by_size = rank_layers(layers, delta_norm_scores(model, layers), "delta-norm")
    return _mask_loss(model, layers, set(by_size.top_fraction(cfg.run.report_top_fraction)), batches, device)


def _stage2_runs(
    cfg: IdentifyConfig,
    loaded: LoadedModel,
    peft_model: torch.nn.Module,
    layers: list[Layer],
    data: SftData,
    timings: Timings,
    adapter: str,
    checkpoint_dir: Path,
    first: int = 0,
) -> list[Stage2Result]:
    """Stage 2 once per `stage2.repeats` on one Stage-1 model, each under its own batch order; `first` numbers
    the first of them among all Stage-2 runs of the identify run."""
    pad_id = int(loaded.tokenizer.pad_token_id)
    repeats = cfg.stage2.repeats
    results: list[Stage2Result] = []
    for repeat in range(repeats):
        folder = checkpoint_dir if repeats == 1 else checkpoint_dir / f"repeat-{repeat}"
        with timings.measure("stage 2"):
            results.append(
                run_stage2(
                    peft_model,
                    layers,
                    data.train,
                    cfg.stage2,
                    stage2_seed(cfg, data, adapter, first + repeat),
                    pad_id,
                    loaded.device,
                    folder / "checkpoint.pt",
                    cfg.run.checkpoint_every,
                )
            )
        write_csv(folder / "trace.csv", results[-1].trace)  # the convergence trace: γ spread, top-K Jaccard
    return results


def rank_repeats(
    layers: list[Layer], groups: list[list[Stage2Result]], info: dict[str, Any]
) -> tuple[Stage2Result, Ranking]:
    """The ranking from every Stage-2 run, grouped by the Stage-1 model it ran on: one run ranks by its scores;
    several rank by the mean score, with each layer's rank interval and the noise floor in info["repeats"]."""
    results = [result for group in groups for result in group]
    stage2 = results[0]
    many = len(results) > 1
    info.update(
        stage2_seed=[r.seed for r in results] if many else stage2.seed,
        stage2_steps=[r.loop.steps_run for r in results] if many else stage2.loop.steps_run,
        stage2_converged_at=[r.converged_at for r in results] if many else stage2.converged_at,
        stage2_penalty=stage2.penalty,
        stage2_gain=stage2.gain,
    )
    if not many:
        return stage2, rank_layers(layers, stage2.scores, "ila", stage2.gammas, info)
    scores = [statistics.fmean(values) for values in zip(*(r.scores for r in results), strict=True)]
    grouped = [[rank_layers(layers, r.scores, "ila") for r in group] for group in groups]
    singles = [single for group in grouped for single in group]
    ranks = [single.ranks() for single in singles]
    intervals = [(min(rk[layer.name] for rk in ranks), max(rk[layer.name] for rk in ranks)) for layer in layers]
    repeats: dict[str, Any] = {
        "n": len(results),
        "stage1_runs": len(groups),
        "stage2_runs": len(groups[0]),
        "varies": "stage 2 batch order" if len(groups) == 1 else "stage 1 seed and stage 2 batch order",
        "top_overlap": {f"{p:g}": repeat_overlap(singles, p / 100) for p in REPEAT_OVERLAP_PERCENTS},
        "seeds": [r.seed for r in results],
        "scores": [{layer.name: score for layer, score in zip(layers, r.scores, strict=True)} for r in results],
    }
    if len(groups) > 1 and len(groups[0]) > 1:  # the Stage-2 floor alone: pairs that share their Stage 1
        repeats["stage2_top_overlap"] = {
            f"{p:g}": statistics.fmean(repeat_overlap(group, p / 100) for group in grouped)
            for p in REPEAT_OVERLAP_PERCENTS
        }
    info["repeats"] = repeats
    gammas = [1.0 / (1.0 + math.exp(-s)) for s in scores]
    merged = Stage2Result(scores, gammas, stage2.loop, stage2.trace, stage2.converged_at, stage2.penalty, stage2.gain)
    for extra in results[1:]:  # the loop summary covers every repeat's steps
        merged.loop.step_seconds = merged.loop.step_seconds + extra.loop.step_seconds
    return merged, rank_layers(layers, scores, "ila", gammas, info, intervals)


NO_SPREAD = "every layer has the same score: the ranking carries no information"


def information_warnings(stage1_runs: list[Stage1Result], ranking: Ranking) -> list[str]:
    """What makes a finished run carry little or no information; the CLI prints these and the report leads with
    them. NO_SPREAD makes `ila identify` exit non-zero."""
    out = []
    scores = [entry.score for entry in ranking.layers]
    if max(scores) - min(scores) <= 1e-9 * max(1.0, abs(max(scores))):
        out.append(NO_SPREAD)
    for i, run in enumerate(stage1_runs):
        losses, w = run.loop.losses, max(1, min(10, len(run.loop.losses) // 2))
        if len(losses) >= 2 and statistics.fmean(losses[-w:]) >= statistics.fmean(losses[:w]):
            which = "" if len(stage1_runs) == 1 else f" (Stage-1 repeat {i})"
            out.append(
                f"Stage 1{which} did not lower the training loss over its {len(losses)} steps (first "
                f"{statistics.fmean(losses[:w]):.4f}, last {statistics.fmean(losses[-w:]):.4f}); check stage1.lr "
                "and the data"
            )
    return out


def _each_stage1_model(peft_model: torch.nn.Module, runs: list[Stage1Result]) -> Iterator[torch.nn.Module]:
    """The model of each Stage-1 repeat in turn: the last one as it is still attached, then the others reloaded
    from their saved adapters."""
    yield peft_model
    for run in runs[:-1]:
        peft_model = load_lora(remove_lora(peft_model), run.adapter_dir)  # type: ignore[arg-type]
        yield peft_model


REPEAT_OVERLAP_PERCENTS = (10, 25, 30, 50)


def repeat_overlap(rankings: list[Ranking], fraction: float) -> float:
    """Mean pairwise Jaccard of the top-`fraction` sets: the Stage-2 noise floor at that K."""
    tops = [set(r.top_fraction(fraction)) for r in rankings]
    pairs = [(a, b) for i, a in enumerate(tops) for b in tops[i + 1 :]]
    return statistics.fmean(jaccard(a, b) for a, b in pairs)


def run_identify(cfg: IdentifyConfig, overwrite: bool = False, command: str = "") -> IdentifyResult:
    """Stage 1 + Stage 2 on a fresh run folder; returns the ranking and what was measured."""
    reset_peak_memory()
    timings = Timings()
    started = time.perf_counter()
    loaded, layers, data = prepare_inputs(cfg, timings)
    run_dir = prepare_run_dir(cfg.run.output, "identify", overwrite)
    write_yaml(run_dir / "config.yaml", config_to_dict(cfg))
    manifest = _manifest_base(cfg, loaded, data, layers, command)
    manifest["status"] = "running"
    write_json(run_dir / "manifest.json", manifest)
    with tracking.session(cfg.run.report_to, run_dir, config_to_dict(cfg)):
        return _execute(cfg, run_dir, loaded, layers, data, timings, manifest, started)


def run_folder_config(run_dir: Path, overrides: list[str], trust_remote_code: bool) -> IdentifyConfig:
    """A run folder's config with the user's overrides; the model's own code runs only if this command says so."""
    from ila.config import merge, parse_overrides

    values = merge(drop_remote_code(read_yaml(run_dir / "config.yaml"), str(run_dir)), parse_overrides(overrides))
    if trust_remote_code:
        values = merge(values, {"model": {"trust_remote_code": True}})
    return build_config(IdentifyConfig, values)


def resume_identify(run_dir: Path, command: str = "", trust_remote_code: bool = False) -> IdentifyResult:
    """Continue an interrupted identify run from its last checkpoints; finished stages are not redone."""
    if not (run_dir / "config.yaml").is_file():
        raise IlaError(f"{run_dir} is not an ila identify run folder (no config.yaml)")
    previous = read_manifest(run_dir)
    if previous.get("status") == "complete":
        raise IlaError(f"{run_dir} is already complete; nothing to resume")
    cfg = run_folder_config(run_dir, [], trust_remote_code)
    reset_peak_memory()
    timings = Timings()
    started = time.perf_counter()
    loaded, layers, data = prepare_inputs(cfg, timings)
    if data.stats.fingerprint != previous.get("data", {}).get("sha256", data.stats.fingerprint):
        raise IlaError(f"the data of {run_dir} changed since the run started (sha256 differs); start a new run")
    manifest = _manifest_base(cfg, loaded, data, layers, command)
    manifest.update(status="running", resumed=previous.get("resumed", 0) + 1)
    write_json(run_dir / "manifest.json", manifest)
    with tracking.session(cfg.run.report_to, run_dir, config_to_dict(cfg)):
        return _execute(cfg, run_dir, loaded, layers, data, timings, manifest, started)


def _execute(
    cfg: IdentifyConfig,
    run_dir: Path,
    loaded: LoadedModel,
    layers: list[Layer],
    data: SftData,
    timings: Timings,
    manifest: dict[str, Any],
    started: float,
) -> IdentifyResult:
    device = loaded.device
    pad_id = int(loaded.tokenizer.pad_token_id)
    heldout_batches = eval_batches(data.eval, cfg.stage1.batch_size, pad_id)
    heldout: dict[str, float] = {}
    try:
        if not sharding.is_deferred(loaded.model):  # else its weights exist only once sharded, after Stage 1
            with timings.measure("held-out evaluation"):
                heldout["base"] = heldout_loss(loaded.model, heldout_batches, device)
        stage1_runs: list[Stage1Result] = []
        stage1_losses: list[float] = []
        groups: list[list[Stage2Result]] = []
        model: torch.nn.Module = loaded.model
        for repeat in range(cfg.stage1.repeats):
            stage1_dir, stage2_dir = stage1_folders(run_dir, repeat)
            with timings.measure("stage 1"):
                peft_model, stage1 = run_stage1(
                    model,
                    layers,
                    data.train,
                    cfg.lora,
                    cfg.stage1,
                    stage1_seed(cfg, data, repeat),
                    pad_id,
                    device,
                    stage1_dir,
                    cfg.run.checkpoint_every,
                    cfg.run.compile,
                )
            stage1_runs.append(stage1)
            with timings.measure("held-out evaluation"):
                stage1_losses.append(heldout_loss(peft_model, heldout_batches, device))
                if "base" not in heldout:  # mask 0 is the base model
                    heldout["base"] = _mask_loss(peft_model, layers, set(), heldout_batches, device)
            adapter = "final" if repeat == 0 else f"final-{repeat}"
            first = repeat * cfg.stage2.repeats
            groups.append(_stage2_runs(cfg, loaded, peft_model, layers, data, timings, adapter, stage2_dir, first))
            if repeat + 1 < cfg.stage1.repeats:
                model = remove_lora(peft_model)  # the next Stage 1 starts again from the base model
        stage1 = stage1_runs[0]
        info = _ranking_info(cfg, loaded, data, milestone=None, stage1=stage1)
        stage2, ranking = rank_repeats(layers, groups, info)
        top = set(ranking.top_fraction(cfg.run.report_top_fraction))
        masked: list[tuple[float, float]] = []
        with timings.measure("held-out evaluation"):
            for model_i in _each_stage1_model(peft_model, stage1_runs):
                masked.append(
                    (
                        _mask_loss(model_i, layers, top, heldout_batches, device),
                        _delta_norm_mask_loss(cfg, model_i, layers, heldout_batches, device),
                    )
                )
        heldout["stage1"] = statistics.fmean(stage1_losses)
        heldout["stage1_top_mask"] = statistics.fmean(m[0] for m in masked)
        heldout["delta_norm_top_mask"] = statistics.fmean(m[1] for m in masked)
        if len(stage1_runs) > 1:
            order = [len(stage1_runs) - 1, *range(len(stage1_runs) - 1)]  # the order _each_stage1_model went in
            by_repeat = dict(zip(order, masked, strict=True))
            ranking.info["repeats"]["stage1"] = [
                {
                    "seed": stage1_seed(cfg, data, i),
                    "steps": run.steps,
                    "stopped_by": run.stopped_by,
                    "fired_at": run.fired_at,
                    "heldout_stage1": stage1_losses[i],
                    "heldout_top_mask": by_repeat[i][0],
                    "heldout_delta_norm_top_mask": by_repeat[i][1],
                }
                for i, run in enumerate(stage1_runs)
            ]
    except NonFiniteLossError as err:
        manifest.update(status="failed", error=str(err), timings=timings.seconds, memory=peak_memory())
        write_json(run_dir / "manifest.json", manifest)
        raise IlaError(f"{err} (run folder {run_dir} keeps what was saved before)") from None
    ranking.info["warnings"] = information_warnings(stage1_runs, ranking)
    with timings.measure("write artifacts"):
        ranking.info["heldout_loss"] = heldout
        ranking.save(run_dir)
        plot_heatmap(ranking, run_dir / "heatmap.png", top_fraction=cfg.run.report_top_fraction)
    timings.seconds["total"] = time.perf_counter() - started
    memory = peak_memory()
    result = IdentifyResult(run_dir, ranking, stage1, stage2, heldout, timings.seconds, memory)
    write_identify_report(run_dir / "report.md", cfg, result, data.stats, layers)
    write_html_report(run_dir / "report.md", extra_images=("heatmap.png",))
    manifest.update(
        status="complete",
        timings=timings.seconds,
        memory=memory,
        stage1=_stage1_summary(stage1),
        stage2=_loop_summary(stage2.loop),
        heldout_loss=heldout,
    )
    write_json(run_dir / "manifest.json", manifest)  # last: "complete" means every artifact is in place
    return result


def run_milestone(
    run_dir: Path,
    milestone: int,
    overwrite: bool = False,
    overrides: list[str] | None = None,
    command: str = "",
    trust_remote_code: bool = False,
) -> IdentifyResult:
    """Stage 2 on a saved Stage-1 milestone of an earlier run, without retraining Stage 1."""
    if not (run_dir / "config.yaml").is_file():
        raise IlaError(f"{run_dir} is not an ila identify run folder (no config.yaml)")
    adapter = run_dir / "stage1" / f"milestone-{milestone}"
    if not (adapter / "adapter_config.json").is_file():
        saved = sorted(p.name for p in (run_dir / "stage1").glob("milestone-*"))
        raise IlaError(f"milestone {milestone} was not saved in {run_dir}; saved: {', '.join(saved) or 'none'}")
    cfg = run_folder_config(run_dir, overrides or [], trust_remote_code)
    out = run_dir / f"milestone-{milestone}"
    cfg = replace(cfg, run=replace(cfg.run, output=str(out)))
    reset_peak_memory()
    timings = Timings()
    started = time.perf_counter()
    loaded, layers, data = prepare_inputs(cfg, timings)
    out = prepare_run_dir(str(out), "milestone", overwrite)
    peft_model = shard_if_enabled(load_lora(loaded.model, adapter))
    if cfg.run.compile:
        compile_blocks(peft_model)
    device = loaded.device
    heldout_batches = eval_batches(data.eval, cfg.stage1.batch_size, int(loaded.tokenizer.pad_token_id))
    heldout = {"base": float("nan")}
    with timings.measure("held-out evaluation"):
        heldout["stage1"] = heldout_loss(peft_model, heldout_batches, device)
        with LayerMask(peft_model, layers) as mask:
            mask.values = torch.zeros(len(layers), device=device)
            heldout["base"] = heldout_loss(peft_model, heldout_batches, device)
    info = _ranking_info(cfg, loaded, data, milestone=milestone, stage1=None)
    runs = _stage2_runs(cfg, loaded, peft_model, layers, data, timings, f"milestone-{milestone}", out / "stage2")
    stage2, ranking = rank_repeats(layers, [runs], info)
    top = set(ranking.top_fraction(cfg.run.report_top_fraction))
    heldout["stage1_top_mask"] = _mask_loss(peft_model, layers, top, heldout_batches, device)
    heldout["delta_norm_top_mask"] = _delta_norm_mask_loss(cfg, peft_model, layers, heldout_batches, device)
    ranking.info["heldout_loss"] = heldout
    ranking.info["warnings"] = information_warnings([], ranking)
    ranking.save(out)
    plot_heatmap(ranking, out / "heatmap.png", top_fraction=cfg.run.report_top_fraction)
    timings.seconds["total"] = time.perf_counter() - started
    memory = peak_memory()
    manifest = _manifest_base(cfg, loaded, data, layers, command)
    manifest.update(
        status="complete",
        milestone=milestone,
        stage1_adapter=str(adapter),
        timings=timings.seconds,
        memory=memory,
        stage2=_loop_summary(stage2.loop),
        heldout_loss=heldout,
    )
    write_yaml(out / "config.yaml", config_to_dict(cfg))
    write_json(out / "manifest.json", manifest)
    result = IdentifyResult(out, ranking, None, stage2, heldout, timings.seconds, memory)
    write_identify_report(out / "report.md", cfg, result, data.stats, layers)
    write_html_report(out / "report.md", extra_images=("heatmap.png",))
    return result


def _ranking_info(
    cfg: IdentifyConfig, loaded: LoadedModel, data: SftData, milestone: int | None, stage1: Stage1Result | None
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "model": cfg.model.name,
        "model_fingerprint": loaded.fingerprint,
        "data": data.stats.source,
        "data_sha256": data.stats.fingerprint,
        "seed": cfg.run.seed,
        "milestone": milestone if milestone is not None else 100,
        "sparsity": cfg.stage2.sparsity,
    }
    if stage1 is not None:
        info["stage1_steps"] = stage1.steps
        info["stage1_planned_steps"] = stage1.planned_steps
        info["stage1_stopped_by"] = stage1.stopped_by
        info["stage1_fired_at"] = stage1.fired_at
        info["stability_trace"] = stage1.trace
    return info


def _loop_summary(loop: Any) -> dict[str, Any]:
    times = loop.step_seconds
    return {
        "steps": loop.steps_run,
        "median_step_s": statistics.median(times) if times else None,
        "tokens_per_s": loop.tokens_per_second,
        "padding_fraction": loop.padding_fraction,
        "first_loss": loop.losses[0] if loop.losses else None,
        "last_loss": loop.losses[-1] if loop.losses else None,
    }


def _stage1_summary(stage1: Stage1Result) -> dict[str, Any]:
    out = _loop_summary(stage1.loop)
    out.update(
        stopped_by=stage1.stopped_by,
        planned_steps=stage1.planned_steps,
        fired_at=stage1.fired_at,
        milestones={str(k): str(v) for k, v in stage1.milestones.items()},
        final_r_t=stage1.trace[-1]["r_t"] if stage1.trace else None,
    )
    return out


def _manifest_base(
    cfg: IdentifyConfig, loaded: LoadedModel, data: SftData, layers: list[Layer], command: str
) -> dict[str, Any]:
    return {
        "ila_command": command or " ".join(sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_to_dict(cfg),
        "model": {
            "source": loaded.source,
            "resolved": loaded.resolved_path,
            "fingerprint": loaded.fingerprint,
            "class": type(loaded.model).__name__,
            "n_layers": len(layers),
        },
        "data": {
            "source": data.stats.source,
            "sha256": data.stats.fingerprint,
            "rows": data.stats.rows,
            "train_examples": data.stats.train_examples,
            "eval_examples": data.stats.eval_examples,
        },
        "seed": cfg.run.seed,
        "versions": package_versions(),
        "hardware": hardware(),
    }
