"""`ila rank`: rank layers with another method (random, first, last, delta-norm, grad-norm, snr, spectrum), in the
ranking format of `ila identify`; writes a run folder with ranking.json, ranking.csv and manifest.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ila.commands import COMMANDS
from ila.commands._shared import Subparsers
from ila.config import BUNDLED_DATA, DEFAULT_MODEL, DataConfig, LoraShapeConfig, ModelConfig
from ila.errors import IlaError, reading
from ila.evaluation import resolve_lora_adapter
from ila.layers import discover_layers
from ila.manifest import DataRecord, Manifest, ModelRecord, invoked
from ila.model_loading import fingerprint_model_files, load_model, load_model_skeleton, pick_device, resolve_model_path
from ila.ranking import Ranking
from ila.ranking_methods import DATA_FREE, NEEDS_WEIGHTS, RankConfig, check_method, rank_with
from ila.run_folder import peak_memory, prepare_run_dir, reset_peak_memory
from ila.sft_data import Example, load_sft_data

log = logging.getLogger(__name__)

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
        help=COMMANDS["rank"],
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
    parser.add_argument(
        "--adapter",
        help="delta-norm only: a PEFT adapter folder, an identify run folder or a LoRA finetune run folder",
    )
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
    check_method(args.method)
    settings = RankConfig(
        seed=args.seed,
        normalize=not args.no_normalize,
        grad_batches=args.batches,
        batch_size=args.batch_size,
        lora=LoraShapeConfig(r=args.lora_r, alpha=args.lora_alpha),
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


@dataclass
class RankResult:
    run_dir: Path
    ranking: Ranking
    timings: dict[str, float]


def _adapter_base_model(adapter: str | Path) -> str | None:
    """The base model an adapter names (None when it names none); an unreadable adapter config is an error, not a
    silent fall-back to the default model."""
    path = resolve_lora_adapter(adapter) / "adapter_config.json"
    with reading(path, "a PEFT adapter config (JSON)"):
        config = json.loads(path.read_text(encoding="utf-8"))
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(name) if name else None


def run_rank(
    method: str,
    model_name: str | None = None,
    *,
    data: str | None = None,
    adapter: str | None = None,
    output: str | None = None,
    settings: RankConfig | None = None,
    max_length: int = 256,
    include_lm_head: bool = False,
    trust_remote_code: bool = False,
    device: str = "auto",
    threads: int | None = None,
    overwrite: bool = False,
    command: str = "",
) -> RankResult:
    """`ila rank`: load what the method needs (data only for grad-norm), rank, write the run folder.

    Without `model_name`, delta-norm uses the adapter's base model and every other method the default model.
    `threads` sets torch's CPU threads (as run.threads does for identify). Inputs are checked before the run
    folder is created.
    """
    check_method(method)
    settings = settings or RankConfig()
    if threads:
        torch.set_num_threads(threads)
    reset_peak_memory()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if method != "delta-norm" and adapter is not None:
        log.warning("--adapter is used by delta-norm only; method %s ignores it", method)
        adapter = None
    if method == "delta-norm":
        if adapter is None:
            raise IlaError(
                "method delta-norm needs a Stage-1 adapter: --adapter RUN/stage1/adapter (or the run folder)"
            )
        resolve_lora_adapter(adapter)
        model_name = model_name or _adapter_base_model(adapter)
    if method in DATA_FREE and data is not None:
        log.warning("method %s is data-free; --data %s is not read", method, data)
    if settings.snr_divide_by_max and method != "snr":
        log.warning("--snr-spectrum-ratio is used by snr only; method %s ignores it", method)
    model_name = model_name or DEFAULT_MODEL
    model_cfg = ModelConfig(name=model_name, include_lm_head=include_lm_head, trust_remote_code=trust_remote_code)
    torch.manual_seed(settings.seed)
    clock = time.perf_counter()
    model: nn.Module
    if method in NEEDS_WEIGHTS:
        loaded = load_model(model_cfg, pick_device(device))
        model, resolved, fingerprint = loaded.model, loaded.resolved_path, loaded.fingerprint
    else:  # the module tree is enough: built on the meta device, no weights read
        loaded = None
        model = load_model_skeleton(model_cfg)
        resolved, is_local = resolve_model_path(model_name)
        fingerprint = fingerprint_model_files(Path(resolved)) if is_local else f"hub:{resolved}"
    timings["load model"] = time.perf_counter() - clock
    layers = discover_layers(model, include_lm_head)
    model_record = ModelRecord(model_name, resolved, fingerprint, type(model).__name__, len(layers))
    examples: list[Example] | None = None
    data_record: DataRecord | None = None
    pad_id = 0
    if method == "grad-norm":
        assert loaded is not None
        clock = time.perf_counter()
        sft = load_sft_data(
            DataConfig(path=data or BUNDLED_DATA, max_length=max_length), loaded.tokenizer, settings.seed
        )
        timings["load data"] = time.perf_counter() - clock
        examples, pad_id = sft.train, int(loaded.tokenizer.pad_token_id)
        data_record = DataRecord(sft.stats.source, sft.stats.fingerprint, train_examples=sft.stats.train_examples)
    run_dir = prepare_run_dir(output, f"rank-{method}", overwrite)
    try:
        clock = time.perf_counter()
        ranking = rank_with(method, layers, model, adapter=adapter, examples=examples, pad_id=pad_id, settings=settings)
        timings["rank"] = time.perf_counter() - clock
    except BaseException:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed ranking leaves no empty run folder behind
        raise
    ranking.info.update({"model": model_name, "model_fingerprint": fingerprint})
    if data_record is not None:
        ranking.info.update({"data": data_record.source, "data_sha256": data_record.sha256})
    ranking.save(run_dir)
    timings["total"] = time.perf_counter() - started
    manifest = Manifest("rank", command=invoked(command), model=model_record, data=data_record, seed=settings.seed)
    manifest.sections.update(
        method=method,
        settings=asdict(settings),
        adapter=str(resolve_lora_adapter(adapter)) if adapter is not None else None,
    )
    manifest.finish(run_dir, timings, peak_memory())  # last: its presence means the ranking is in place
    return RankResult(run_dir, ranking, timings)
