"""`ila report`: run folders side by side; writes report.md (one table), report.csv, report.png and manifest.json
to the output folder (the rows and their formatting: ila.side_by_side)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ila.commands import COMMANDS
from ila.commands._shared import Subparsers
from ila.errors import IlaError
from ila.html_report import write_html_report
from ila.manifest import Manifest, invoked
from ila.run_folder import atomic_write_text, peak_memory, prepare_run_dir, write_csv
from ila.side_by_side import RunSummary, legend, markdown_table, plot_report, read_run, report_markdown, table_rows

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
        help=COMMANDS["report"],
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
    result = run_report(args.runs, args.output, overwrite=args.overwrite)
    print(markdown_table(table_rows(result.runs)))
    for line in legend(result.runs):
        print(line)
    print(f"\nwritten: {result.run_dir / 'report.md'}, report.csv, report.png, manifest.json")
    return 0


@dataclass
class RunReport:
    run_dir: Path
    runs: list[RunSummary]
    markdown: str


def run_report(
    folders: Sequence[str | Path], output: str | None = None, overwrite: bool = False, command: str = ""
) -> RunReport:
    """Read every run folder (all of them before anything is written), then write the report folder."""
    started = time.perf_counter()
    if not folders:
        raise IlaError("give at least one run folder: ila report RUN [RUN ...]")
    runs = [read_run(folder) for folder in folders]
    run_dir = prepare_run_dir(output, "report", overwrite)
    markdown = report_markdown(runs)
    atomic_write_text(run_dir / "report.md", markdown)
    write_csv(run_dir / "report.csv", table_rows(runs))
    plot_report(runs, run_dir / "report.png")
    write_html_report(run_dir / "report.md")  # report.md shows report.png itself
    manifest = Manifest("report", command=invoked(command))
    manifest.finish(
        run_dir, {"total": time.perf_counter() - started}, peak_memory(), runs=[asdict(run) for run in runs]
    )
    return RunReport(run_dir, runs, markdown)
