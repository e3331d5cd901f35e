"""`ila identify`: the ILA pipeline end to end (load, Stage 1, Stage 2, ranking, heatmap, report, manifest).

Reads a model and SFT data; writes a run folder (see README). Everything that can be wrong with the input is
checked before the run folder is created, so a bad call leaves nothing behind.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ila import distributed, fsdp, tracking
from ila.commands import COMMANDS
from ila.commands._shared import COMMON_FLAGS, Subparsers, add_config_flags, add_run_flags, config_values, print_config
from ila.config import (
    BUNDLED_DATA,
    DEFAULT_MODEL,
    IdentifyConfig,
    build_config,
    config_to_dict,
    drop_remote_code,
    load_config,
    read_yaml,
)
from ila.errors import EXIT_NO_INFORMATION, IlaError, NonFiniteLossError
from ila.fsdp import shard_if_enabled
from ila.html_report import write_html_report
from ila.identify_report import write_identify_report
from ila.layers import Layer
from ila.lora_adapters import LayerMask, load_lora, remove_lora
from ila.manifest import Manifest
from ila.model_loading import LoadedModel
from ila.plots import plot_heatmap
from ila.run_folder import (
    Timings,
    peak_memory,
    prepare_run_dir,
    reset_peak_memory,
    write_yaml,
)
from ila.sft_data import SftData, eval_batches
from ila.stage1_lora import Stage1Result, run_stage1
from ila.stage2_mask import Stage2Result
from ila.stages import (
    NO_SPREAD,
    IdentifyResult,
    delta_norm_mask_loss,
    each_stage1_model,
    information_warnings,
    mask_loss,
    prepare_inputs,
    rank_repeats,
    stage1_folders,
    stage1_seed,
    stage2_runs,
)
from ila.training_loop import compile_blocks, heldout_loss, loop_summary

IDENTIFY_EXAMPLES = f"""examples:
  ila identify                                   # default model ({DEFAULT_MODEL}) on the bundled data
  ila identify --model ./my-llama --data train.jsonl --output runs/llama-lima
  ila identify --config run.yaml stage1.max_epochs=2 stage2.budget=0.2
  ila identify --repeats 3                      # Stage 2 under 3 batch orders: rank intervals, noise floor
  ila identify --repeats 3 --repeat-stage1      # Stage 1 and Stage 2 under 3 seeds: the ranking averages them
  ila identify --from-run runs/llama-lima --milestone 25   # Stage 2 on the 25% checkpoint, no retraining
  ila identify --resume runs/llama-lima                    # continue after an interruption (kill -9 included)

config sections: model, data, lora, stage1, stage2, run (see `ila identify --print-config`)
"""


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "identify",
        help=COMMANDS["identify"],
        description="Run ILA: Stage 1 trains LoRA on every linear layer until the update "
        "is ε-stable; Stage 2 learns one mask score per layer; writes a ranking, a heatmap, "
        "a report and a manifest to a run folder.",
        epilog=IDENTIFY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--data", help=f"JSON/JSONL file or hub data set id (default: {BUNDLED_DATA}, ila's own alignment set)"
    )
    parser.add_argument("--output", help="run folder (default runs/identify-<timestamp>)")
    parser.add_argument("--seed", type=int, help="random seed (run.seed)")
    parser.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help="Stage 2 under N batch orders on one Stage 1 (stage2.repeats): mean scores, each layer's rank "
        "interval and the Stage-2 noise floor in ranking.json",
    )
    parser.add_argument(
        "--repeat-stage1",
        action="store_true",
        help="with --repeats N: rerun Stage 1 under N seeds too, each with one Stage 2 (stage1.repeats=N); the "
        "ranking sorts the mean score and the floor covers both stages",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run folder")
    add_run_flags(parser, report_to=True)
    parser.add_argument("--from-run", help="an earlier identify run folder (with --milestone)")
    parser.add_argument(
        "--milestone",
        type=int,
        help="rank from the Stage-1 adapter after this percent of the steps "
        "Stage 1 ran, without retraining (needs --from-run)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run from its checkpoints "
        "(its config.yaml is used; finished stages are not redone)",
    )
    add_config_flags(parser, "model, data, lora, stage1, stage2, run")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    if args.milestone is not None or args.from_run:
        if args.milestone is None or not args.from_run:
            raise IlaError("--milestone and --from-run go together: ila identify --from-run RUN --milestone 25")
        result = run_milestone(
            Path(args.from_run),
            args.milestone,
            args.overwrite,
            args.overrides,
            trust_remote_code=args.trust_remote_code,
        )
        _print_summary(result)
        return exit_status(result)
    if args.resume:
        if args.model or args.data or args.config or args.overrides or args.output:
            raise IlaError(
                "--resume RUN continues with the run's own config; drop --model/--data/--config/--output and overrides"
            )
        result = resume_identify(Path(args.resume), trust_remote_code=args.trust_remote_code)
        _print_summary(result)
        return exit_status(result)
    extra = config_values(args, COMMON_FLAGS)
    if args.repeat_stage1 and args.repeats is None:
        raise IlaError("--repeat-stage1 needs --repeats N (how many Stage-1 seeds)")
    if args.repeats is not None:
        extra.setdefault("stage1" if args.repeat_stage1 else "stage2", {})["repeats"] = args.repeats
    cfg = load_config(IdentifyConfig, args.config, args.overrides, extra)
    if args.print_config:
        return print_config(cfg)
    result = run_identify(cfg, overwrite=args.overwrite)
    _print_summary(result)
    return exit_status(result)


def exit_status(result: IdentifyResult) -> int:
    """0, or EXIT_NO_INFORMATION when the ranking cannot mean anything; every warning goes to stderr, one line each."""
    warnings = result.ranking.info.get("warnings", [])
    if distributed.is_main():
        for warning in warnings:
            sys.stderr.write(f"ila: warning: {warning} (run folder {result.run_dir})\n")
    return EXIT_NO_INFORMATION if NO_SPREAD in warnings else 0


def _print_summary(result: IdentifyResult) -> None:
    if not distributed.is_main():
        return
    print(f"run folder: {result.run_dir}")
    print("held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in result.heldout.items()))
    if result.stage1 is not None and result.stage1.loop.step_seconds:
        s1 = statistics.median(result.stage1.loop.step_seconds)
        s2 = statistics.median(result.stage2.loop.step_seconds)
        print(
            f"stage 1: {result.stage1.steps} of {result.stage1.planned_steps} planned steps, stopped by "
            f"{result.stage1.stopped_by}, median step {s1:.2f} s, {result.stage1.loop.tokens_per_second:.0f} tokens/s"
        )
        converged = result.stage2.converged_at
        print(
            f"stage 2: {result.stage2.loop.steps_run} steps "
            f"({f'top set stable from step {converged}' if converged else 'step cap'}), median step {s2:.2f} s "
            f"(ratio to stage 1 {s2 / s1:.2f})"
        )
    repeats = result.ranking.info.get("repeats")
    if repeats:
        floor = ", ".join(f"top {k}% {v:.3f}" for k, v in repeats["top_overlap"].items())
        varies = repeats.get("varies", "stage 2 batch order")
        print(f"noise floor over {repeats['n']} runs differing in {varies} (mean Jaccard): {floor}")
    print("where the time went: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    print("peak memory: " + ", ".join(f"{k} {v:.2f}" for k, v in result.memory.items()))
    print("top 10 layers:")
    for entry in result.ranking.layers[:10]:
        gamma = f"  γ={entry.gamma:.3f}" if entry.gamma is not None else ""
        print(f"  {entry.rank:>3}. {entry.name}  score={entry.score:.3f}{gamma}")


def run_identify(cfg: IdentifyConfig, overwrite: bool = False, command: str = "") -> IdentifyResult:
    """Stage 1 + Stage 2 on a fresh run folder; returns the ranking and what was measured."""
    reset_peak_memory()
    timings = Timings()
    started = time.perf_counter()
    loaded, layers, data = prepare_inputs(cfg, timings)
    run_dir = prepare_run_dir(cfg.run.output, "identify", overwrite)
    write_yaml(run_dir / "config.yaml", config_to_dict(cfg))
    manifest = Manifest.for_training("identify", cfg, loaded, data, len(layers), command)
    manifest.write(run_dir)
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
    previous = Manifest.read(run_dir)
    if previous is not None and previous.complete:
        raise IlaError(f"{run_dir} is already complete; nothing to resume")
    cfg = run_folder_config(run_dir, [], trust_remote_code)
    reset_peak_memory()
    timings = Timings()
    started = time.perf_counter()
    loaded, layers, data = prepare_inputs(cfg, timings)
    started_on = previous.data.sha256 if previous is not None and previous.data is not None else None
    if started_on is not None and data.stats.fingerprint != started_on:
        raise IlaError(f"the data of {run_dir} changed since the run started (sha256 differs); start a new run")
    manifest = Manifest.for_training("identify", cfg, loaded, data, len(layers), command)
    manifest.resumed = (previous.resumed if previous is not None else 0) + 1
    manifest.write(run_dir)
    with tracking.session(cfg.run.report_to, run_dir, config_to_dict(cfg)):
        return _execute(cfg, run_dir, loaded, layers, data, timings, manifest, started)


def _execute(
    cfg: IdentifyConfig,
    run_dir: Path,
    loaded: LoadedModel,
    layers: list[Layer],
    data: SftData,
    timings: Timings,
    manifest: Manifest,
    started: float,
) -> IdentifyResult:
    device = loaded.device
    pad_id = int(loaded.tokenizer.pad_token_id)
    heldout_batches = eval_batches(data.eval, cfg.stage1.batch_size, pad_id)
    heldout: dict[str, float] = {}
    try:
        if not fsdp.is_deferred(loaded.model):  # else its weights exist only once sharded, after Stage 1
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
                    heldout["base"] = mask_loss(peft_model, layers, set(), heldout_batches, device)
            adapter = "final" if repeat == 0 else f"final-{repeat}"
            first = repeat * cfg.stage2.repeats
            groups.append(stage2_runs(cfg, loaded, peft_model, layers, data, timings, adapter, stage2_dir, first))
            if repeat + 1 < cfg.stage1.repeats:
                model = remove_lora(peft_model)  # the next Stage 1 starts again from the base model
        stage1 = stage1_runs[0]
        info = _ranking_info(cfg, loaded, data, milestone=None, stage1=stage1)
        stage2, ranking = rank_repeats(layers, groups, info)
        top = set(ranking.top_fraction(cfg.run.report_top_fraction))
        masked: list[tuple[float, float]] = []
        with timings.measure("held-out evaluation"):
            for model_i in each_stage1_model(peft_model, stage1_runs):
                masked.append(
                    (
                        mask_loss(model_i, layers, top, heldout_batches, device),
                        delta_norm_mask_loss(cfg, model_i, layers, heldout_batches, device),
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
        manifest.fail(run_dir, str(err), timings.seconds, peak_memory())
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
    manifest.finish(
        run_dir,
        timings.seconds,
        memory,
        stage1=_stage1_summary(stage1),
        stage2=loop_summary(stage2.loop),
        heldout_loss=heldout,
    )
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
    runs = stage2_runs(cfg, loaded, peft_model, layers, data, timings, f"milestone-{milestone}", out / "stage2")
    stage2, ranking = rank_repeats(layers, [runs], info)
    top = set(ranking.top_fraction(cfg.run.report_top_fraction))
    heldout["stage1_top_mask"] = mask_loss(peft_model, layers, top, heldout_batches, device)
    heldout["delta_norm_top_mask"] = delta_norm_mask_loss(cfg, peft_model, layers, heldout_batches, device)
    ranking.info["heldout_loss"] = heldout
    ranking.info["warnings"] = information_warnings([], ranking)
    ranking.save(out)
    plot_heatmap(ranking, out / "heatmap.png", top_fraction=cfg.run.report_top_fraction)
    timings.seconds["total"] = time.perf_counter() - started
    memory = peak_memory()
    write_yaml(out / "config.yaml", config_to_dict(cfg))
    result = IdentifyResult(out, ranking, None, stage2, heldout, timings.seconds, memory)
    write_identify_report(out / "report.md", cfg, result, data.stats, layers)
    write_html_report(out / "report.md", extra_images=("heatmap.png",))
    manifest = Manifest.for_training("milestone", cfg, loaded, data, len(layers), command)
    manifest.sections.update(milestone=milestone, stage1_adapter=str(adapter))
    manifest.finish(out, timings.seconds, memory, stage2=loop_summary(stage2.loop), heldout_loss=heldout)
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


def _stage1_summary(stage1: Stage1Result) -> dict[str, Any]:
    out = loop_summary(stage1.loop)
    out.update(
        stopped_by=stage1.stopped_by,
        planned_steps=stage1.planned_steps,
        fired_at=stage1.fired_at,
        milestones={str(k): str(v) for k, v in stage1.milestones.items()},
        final_r_t=stage1.trace[-1]["r_t"] if stage1.trace else None,
    )
    return out
