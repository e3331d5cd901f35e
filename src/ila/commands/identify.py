"""`ila identify`: rank the layers of a model by importance (Stage 1 LoRA, Stage 2 mask)."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from ila.commands._shared import COMMON_FLAGS, Subparsers, add_config_flags, add_run_flags, config_values, print_config
from ila.config import BUNDLED_DATA, DEFAULT_MODEL, IdentifyConfig, load_config
from ila.errors import EXIT_NO_INFORMATION, IlaError

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
        help="rank layers by importance (Stage 1 LoRA + Stage 2 mask)",
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
    from ila import identify

    if args.milestone is not None or args.from_run:
        if args.milestone is None or not args.from_run:
            raise IlaError("--milestone and --from-run go together: ila identify --from-run RUN --milestone 25")
        result = identify.run_milestone(
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
        result = identify.resume_identify(Path(args.resume), trust_remote_code=args.trust_remote_code)
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
    result = identify.run_identify(cfg, overwrite=args.overwrite)
    _print_summary(result)
    return exit_status(result)


def exit_status(result: object) -> int:
    """0, or EXIT_NO_INFORMATION when the ranking cannot mean anything; every warning goes to stderr, one line each."""
    from ila import distributed
    from ila.identify import NO_SPREAD, IdentifyResult

    assert isinstance(result, IdentifyResult)
    warnings = result.ranking.info.get("warnings", [])
    if distributed.is_main():
        for warning in warnings:
            sys.stderr.write(f"ila: warning: {warning} (run folder {result.run_dir})\n")
    return EXIT_NO_INFORMATION if NO_SPREAD in warnings else 0


def _print_summary(result: object) -> None:
    from ila import distributed
    from ila.identify import IdentifyResult

    assert isinstance(result, IdentifyResult)
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
