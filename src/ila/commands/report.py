"""`ila report`: run folders side by side (markdown table, CSV, plot)."""

from __future__ import annotations

import argparse

from ila.commands._shared import Subparsers

REPORT_EXAMPLES = """examples:
  ila report runs/identify-llama runs/ft-ila runs/ft-all --output runs/report
  ila report runs/ft-*                                         # every finetune run, side by side

Reads each folder's manifest.json and eval.json (from `ila evaluate`); a value a run does not record shows as "-".
eval.json values show "± standard error"; ≈ marks a run within two combined standard errors of the first run
(|a-b| < 2·sqrt(sa²+sb²)): not distinguishable from it.
"""


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "report",
        help="put run folders side by side (markdown table + plot)",
        description="Compare identify, finetune and evaluate run folders: method, selected "
        "layers, trainable parameters, median step time, peak memory, held-out loss and "
        "benchmark scores; writes report.md, report.csv, report.png and a manifest.",
        epilog=REPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    parser.add_argument("--output", help="report folder (default runs/report-<timestamp>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty report folder")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from ila.run_report import legend, markdown_table, run_report, table_rows

    result = run_report(args.runs, args.output, overwrite=args.overwrite)
    print(markdown_table(table_rows(result.runs)))
    for line in legend(result.runs):
        print(line)
    print(f"\nwritten: {result.run_dir / 'report.md'}, report.csv, report.png, manifest.json")
    return 0
