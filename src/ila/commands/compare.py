"""`ila compare`: how far rankings agree (top-K Jaccard against chance, p-values, correlations)."""

from __future__ import annotations

import argparse

from ila.commands._shared import Subparsers
from ila.errors import IlaError

COMPARE_EXAMPLES = """examples:
  ila compare runs/lima runs/alpaca runs/lima-seed1 --output runs/compare-data
  ila compare runs/lima runs/snr/ranking.json runs/last runs/random-3 --k 10,30 --output runs/compare-baselines
  ila compare runs/llama-lima runs/qwen-lima          # different models: mapped by module type and relative depth

For each K (percent of the layers): pairwise Jaccard of the top-K sets beside two chance levels and their
p-values: uniform (two random K-sets; exact hypergeometric test) and type-matched (random sets that keep each
set's count per module type and depth band, so shared preferences for a type or depth do not count; Monte Carlo,
fixed seed); beside it the noise floor: the overlap of rankings that differ only in the seed (same method, model,
data and milestone), and a ranking's own Stage-2 repeats (ila identify --repeats N). Also the stable core (in the
top K of every ranking) and Spearman and Kendall correlation of the full rankings. Writes compare.md,
compare.json, overlap.png and profiles.png.
"""


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "compare",
        help="compare rankings: top-K Jaccard vs chance, p-values, correlations",
        description="Compare two or more rankings (ILA runs, baselines, other models).",
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("rankings", nargs="+", metavar="RANKING", help="ranking.json files or run folders")
    parser.add_argument("--k", default="10,25,30,50,75", help="top-K sizes in percent of the layers (10,25,30,50,75)")
    parser.add_argument("--heatmap-k", type=float, default=30.0, help="K in percent for overlap.png (default 30)")
    parser.add_argument("--labels", help="comma-separated names for the rankings (default: folder or file names)")
    parser.add_argument("--output", help="folder for the four files (default runs/compare-<timestamp>)")
    parser.add_argument("--overwrite", action="store_true", help="replace compare.* files already in --output")
    parser.add_argument(
        "--depth-bands",
        type=int,
        default=3,
        metavar="N",
        help="depth bands of the type-matched chance level: strata are module type x N bands (default 3)",
    )
    parser.add_argument(
        "--null-draws",
        type=int,
        default=2000,
        metavar="N",
        help="Monte Carlo draws of the type-matched chance level; 0 skips it (default 2000)",
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ila.compare import compare_files, parse_k_percents, write_comparison

    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.rankings):
        raise IlaError(f"--labels names {len(labels)} rankings, but {len(args.rankings)} were given")
    comparison, rankings = compare_files(
        args.rankings,
        parse_k_percents(args.k),
        args.heatmap_k,
        labels,
        depth_bands=args.depth_bands,
        null_draws=args.null_draws,
    )
    output = Path(args.output) if args.output else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    written = write_comparison(comparison, rankings, output, overwrite=args.overwrite)
    print(comparison.markdown(), end="")
    print("\nwritten: " + ", ".join(str(path) for path in written))
    return 0
