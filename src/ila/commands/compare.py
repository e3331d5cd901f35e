"""`ila compare`: how far rankings agree (top-K Jaccard against chance, p-values, correlations)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from ila.commands import COMMANDS
from ila.commands._shared import Subparsers
from ila.compare import (
    DEFAULT_DEPTH_BANDS,
    DEFAULT_HEATMAP_PERCENT,
    DEFAULT_K_PERCENTS,
    DEFAULT_NULL_DRAWS,
    OUTPUT_FILES,
    Comparison,
    compare_rankings,
    label_for,
    parse_k_percents,
    plot_overlap,
    plot_profiles,
)
from ila.errors import IlaError
from ila.ranking import Ranking, load_ranking
from ila.run_folder import atomic_write_text, write_json

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
        help=COMMANDS["compare"],
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


def write_comparison(
    comparison: Comparison, rankings: Sequence[Ranking], out_dir: Path, overwrite: bool = False
) -> list[Path]:
    """compare.md, compare.json, overlap.png and profiles.png in `out_dir`; other files there are left alone."""
    paths = [out_dir / name for name in OUTPUT_FILES]
    existing = [p.name for p in paths if p.exists()]
    if existing and not overwrite:
        raise IlaError(f"{out_dir} already holds {', '.join(existing)}; choose another --output or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "compare.md", comparison.markdown())
    write_json(out_dir / "compare.json", comparison.to_dict())
    plot_overlap(comparison, out_dir / "overlap.png")
    plot_profiles(rankings, [r["label"] for r in comparison.rankings], out_dir / "profiles.png")
    return paths


def compare_files(
    paths: Sequence[str | Path],
    k_percents: Sequence[float] = DEFAULT_K_PERCENTS,
    heatmap_percent: float = DEFAULT_HEATMAP_PERCENT,
    labels: Sequence[str] | None = None,
    *,
    depth_bands: int = DEFAULT_DEPTH_BANDS,
    null_draws: int = DEFAULT_NULL_DRAWS,
) -> tuple[Comparison, list[Ranking]]:
    """Load ranking files (or run folders) and compare them; labels default to the folder or file names."""
    if len(paths) < 2:
        raise IlaError(f"compare needs at least 2 rankings, got {len(paths)}")
    rankings = [load_ranking(p) for p in paths]
    names = list(labels) if labels is not None else [label_for(p) for p in paths]
    comparison = compare_rankings(
        rankings,
        names,
        k_percents,
        heatmap_percent,
        [str(p) for p in paths],
        depth_bands=depth_bands,
        null_draws=null_draws,
    )
    return comparison, rankings
