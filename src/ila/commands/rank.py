"""`ila rank`: rank layers with a baseline method, in the format of `ila identify`."""

from __future__ import annotations

import argparse

from ila.commands._shared import Subparsers
from ila.config import BUNDLED_DATA, DEFAULT_MODEL

RANK_EXAMPLES = """examples:
  ila rank --method last --model ./my-llama --output runs/last           # deepest blocks first (no data, no weights)
  ila rank --method random --seed 3 --model ./my-llama --output runs/random-3
  ila rank --method snr --model ./my-llama --output runs/snr              # ila's SNR of the weights, one global order
  ila rank --method spectrum --model ./my-llama --output runs/spectrum    # Spectrum's exact score, order per type
  ila rank --method delta-norm --adapter runs/llama-lima --output runs/dnorm   # |Δθ| of the Stage-1 adapter
  ila rank --method grad-norm --model ./my-llama --data train.jsonl --batches 8 --output runs/gnorm

random, first, last, snr and spectrum never read data; delta-norm reads the adapter of an identify run (the run
folder or its stage1/adapter; the model defaults to the adapter's base model); grad-norm reads SFT data. The run
folder holds ranking.json, ranking.csv and manifest.json, in the same format as `ila identify`, for `ila select` and
`ila compare`.

snr vs spectrum: snr is ila's scale-free SNR (median noise estimate, Marchenko-Pastur edge), one global order, so it
compares matrices of different shapes. spectrum is Spectrum's score as its spectrum.py computes it (IQR/1.349 noise
estimate, threshold sigma*(1+sqrt(beta)), divided by the largest singular value), ordered within each module type
and interleaved across types; `ila select --top 0.25 --per-type` on it is Spectrum's --top-percent 25 selection.
"""


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "rank",
        help="rank layers with a baseline (random, first, last, delta-norm, grad-norm, snr, spectrum)",
        description="Rank layers with a baseline method, in the same ranking format as "
        "`ila identify`; writes ranking.json, ranking.csv and manifest.json to a run folder.",
        epilog=RANK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--method", required=True, help="random | first | last | delta-norm | grad-norm | snr | spectrum"
    )
    parser.add_argument(
        "--model",
        help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL}; "
        "delta-norm: the adapter's base model)",
    )
    parser.add_argument("--data", help=f"grad-norm only: JSON/JSONL file or hub data set id (default {BUNDLED_DATA})")
    parser.add_argument("--adapter", help="delta-norm only: a PEFT adapter folder or an identify run folder")
    parser.add_argument("--seed", type=int, default=0, help="random: the order; grad-norm: LoRA init and batches (0)")
    parser.add_argument("--batches", type=int, default=8, help="grad-norm: batches of backward passes (default 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="grad-norm: sequences per batch (default 4)")
    parser.add_argument("--max-length", type=int, default=256, help="grad-norm: tokens per sequence (default 256)")
    parser.add_argument("--lora-r", type=int, default=8, help="grad-norm: rank of the fresh LoRA adapter (default 8)")
    parser.add_argument("--lora-alpha", type=int, default=16, help="grad-norm: its alpha (default 16)")
    parser.add_argument(
        "--no-normalize",
        action="store_true",
        help="delta-norm, grad-norm: raw Frobenius norms instead of per-entry RMS (bigger matrices then win by size)",
    )
    parser.add_argument(
        "--snr-spectrum-ratio",
        action="store_true",
        help="snr: also divide by the largest singular value, as Spectrum does (not comparable across matrix "
        "shapes; noise estimate and threshold stay ila's: for Spectrum's own score use --method spectrum)",
    )
    parser.add_argument("--include-lm-head", action="store_true", help="also rank the output head")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to compute (auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    parser.add_argument("--output", help="run folder (default runs/rank-<method>-<timestamp>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run folder")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from ila.baselines import BaselineSettings, check_method, run_rank
    from ila.config import LoraSettings

    check_method(args.method)
    settings = BaselineSettings(
        seed=args.seed,
        normalize=not args.no_normalize,
        grad_batches=args.batches,
        batch_size=args.batch_size,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha),
        snr_divide_by_max=args.snr_spectrum_ratio,
    )
    result = run_rank(
        args.method,
        args.model,
        data=args.data,
        adapter=args.adapter,
        output=args.output,
        settings=settings,
        max_length=args.max_length,
        include_lm_head=args.include_lm_head,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    print(f"run folder: {result.run_dir}")
    print(f"{args.method}: {len(result.ranking.layers)} layers ranked in {result.timings['total']:.1f} s; top 10:")
    if args.method == "spectrum":
        print("  (ordered within each module type; Spectrum's scores compare within a type only)")
    for entry in result.ranking.layers[:10]:
        print(f"  {entry.rank:>3}. {entry.name}  score={entry.score:.4g}")
    return 0
