"""`ila experiment`: run a declared grid of identify, rank and fine-tune units (resumable)."""

from __future__ import annotations

import argparse

from ila.commands._shared import Subparsers, add_run_flags


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "experiment",
        help="run a declared grid of identify/rank/finetune units (resumable)",
        description="Run the grid an experiment YAML declares (data sets x seeds x "
        "milestones x methods, optional fine-tuning), one folder per unit; complete units "
        "are skipped, so an interrupted experiment resumes where it stopped. Writes "
        "report.md with overlap tables (chance levels, p-values) and a fine-tuning table.",
        epilog="examples:\n  ila experiment experiments/paper_small.yaml --output "
        "runs/paper-small\n  ila experiment my_grid.yaml   # again: recomputes nothing "
        "that finished",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="experiment YAML (paths in it are relative to its folder)")
    add_run_flags(parser)
    parser.add_argument(
        "--output", help="experiment folder (default: the YAML's output, else runs/experiment-<config name>)"
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ila.experiment import load_experiment, run_experiment

    cfg = load_experiment(args.config, trust_remote_code=args.trust_remote_code)
    output = args.output or cfg.output or str(Path("runs") / f"experiment-{Path(args.config).stem}")
    result = run_experiment(cfg, output)
    print(f"experiment folder: {result.root}")
    print(
        f"units computed: {len(result.computed)}, already complete: {len(result.skipped)}, "
        f"missing: {len(result.missing)}"
    )
    for item in result.missing:
        print(f"  missing: {item}")
    print(f"report: {result.report}")
    return 0
