"""ILA's two stages run together: their seeds and folders, Stage 2 repeated and merged into one ranking with its
noise floor, held-out losses under a top-K mask, and the warnings that say a ranking carries little information.
`ila identify` (ila.commands.identify) runs them into a run folder.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ila import distributed, tracking
from ila.compare import jaccard
from ila.config import IdentifyConfig
from ila.errors import IlaError
from ila.layers import Layer, discover_layers
from ila.lora_adapters import LayerMask, load_lora, remove_lora
from ila.model_loading import LoadedModel, load_model, pick_device
from ila.ranking import Ranking, rank_layers
from ila.run_folder import Timings, write_csv
from ila.seeds import derive_seed
from ila.sft_data import SftData, load_sft_data
from ila.stage1_lora import Stage1Result
from ila.stage2_mask import Stage2Result, run_stage2
from ila.training_loop import enable_gradient_checkpointing, heldout_loss


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
    if cfg.stage1.repeats > 1 and distributed.fsdp_enabled():
        raise IlaError(
            "stage1.repeats > 1 is not supported under FSDP (a sharded model cannot drop its LoRA layers); "
            "run one identify per seed (--seed) and average with ila compare, or launch without FSDP"
        )
    tracking.check_available(cfg.run.report_to)
    device = setup_runtime(cfg)
    with timings.measure("load model"):
        loaded = load_model(cfg.model, device, defer=distributed.ram_efficient_loading())
    layers = discover_layers(loaded.model, cfg.model.include_lm_head)
    if cfg.run.gradient_checkpointing or distributed.activation_checkpointing():
        enable_gradient_checkpointing(loaded.model)
    with timings.measure("load data"):
        data = load_sft_data(cfg.data, loaded.tokenizer, cfg.run.seed)
    return loaded, layers, data


def mask_loss(
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


def delta_norm_mask_loss(
    cfg: IdentifyConfig, model: torch.nn.Module, layers: list[Layer], batches: list[Any], device: torch.device
) -> float:
    """The same hard mask on the layers with the largest Stage-1 updates (RMS of Δθ_i): the free ranking that
    Stage 2 has to beat for its cost to be worth paying."""
    from ila.ranking_methods import delta_norm_scores

    by_size = rank_layers(layers, delta_norm_scores(model, layers), "delta-norm")
    return mask_loss(model, layers, set(by_size.top_fraction(cfg.run.report_top_fraction)), batches, device)


def stage2_runs(
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


def each_stage1_model(peft_model: torch.nn.Module, runs: list[Stage1Result]) -> Iterator[torch.nn.Module]:
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
