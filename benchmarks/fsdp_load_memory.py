"""Per-process memory while loading a model under FSDP: whole model per process vs shards filled from disk.

Builds a random-weight Llama of about `--params` parameters, saves it as a multi-file safetensors checkpoint, and
loads it three ways, each in fresh processes: one process (the whole model), two FSDP processes that each load the
whole model before sharding (`fsdp_cpu_ram_efficient_loading: false`), and two FSDP processes that build the model
on the meta device and fill their shards from the checkpoint (configs/fsdp.yaml). Each process reports its own
resident-memory peak during the load (VmHWM after the load and a pass over its weights, minus resident memory
before it), against the model's fp32 size, and a checksum of the weights it holds (summed over processes).
Measured, not estimated. `tests/test_distributed.py` runs it small and asserts the bound.

    python benchmarks/fsdp_load_memory.py --params 300e6            # prints a markdown table
    python benchmarks/fsdp_load_memory.py --params 60e6 --json      # one JSON object

Worker mode (what each launched process runs): --worker MODEL_DIR --reports DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from ila.run_folder import resident_gb

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
FSDP = ["accelerate", "launch", "--config_file", str(REPO / "configs" / "fsdp.yaml"), *COMMON]
WAYS = {
    "one process": [sys.executable],
    "FSDP x2, whole model per process": [*FSDP, "--fsdp_cpu_ram_efficient_loading", "false"],
    "FSDP x2, shards from disk": FSDP,
}


def build(folder: Path, params: float, shard_mb: int) -> int:
    """A random Llama of about `params` parameters saved in `shard_mb` MB files; returns its fp32 bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 1024
    per_block = 4 * hidden * hidden + 3 * hidden * 2816
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=hidden,
        intermediate_size=2816,
        num_hidden_layers=max(1, round((params - 8192 * hidden) / per_block)),
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size=f"{shard_mb}MB")
    _word_tokenizer().save_pretrained(folder)
    return sum(p.numel() * 4 for p in model.parameters())


def _word_tokenizer() -> object:
    """A minimal tokenizer: loading needs one, the measurement does not use it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<pad>": 1, "</s>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def worker(model_dir: Path, reports: Path) -> None:
    """Load and shard the way `ila identify` does; write this process's load peak to reports/rank-N.json (a file
    per process: the processes share stdout, where their lines can interleave)."""
    import torch

    from ila import distributed, fsdp
    from ila.config import ModelConfig
    from ila.model_loading import load_model
    from ila.run_folder import peak_memory, reset_peak_memory

    device = distributed.local_device() or torch.device("cpu")
    distributed.barrier()  # the process group exists before the measurement starts
    reset_peak_memory()
    before = resident_gb()
    assert before is not None, "this benchmark reads /proc/self/status (Linux only)"
    loaded = load_model(ModelConfig(name=str(model_dir)), device, defer=distributed.ram_efficient_loading())
    fsdp.shard_if_enabled(loaded.model)
    # reading every local value also pages in weights that transformers left memory-mapped, as training would
    local = [p.to_local() if distributed.is_sharded(p) else p for p in loaded.model.parameters()]
    checksum = distributed.sum_across(sum(float(t.double().sum()) for t in local))
    peak = peak_memory()["peak_rss_gb"]
    report = {"rank": distributed.rank(), "load_gb": peak - before, "checksum": checksum}
    (reports / f"rank-{distributed.rank()}.json").write_text(json.dumps(report))


def measure(model_dir: Path, ways: dict[str, list[str]] = WAYS) -> dict[str, list[dict[str, float]]]:
    """Each way's per-process reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = {}
    for name, launch in ways.items():
        with tempfile.TemporaryDirectory() as reports:
            proc = subprocess.run(
                [*launch, str(Path(__file__).resolve()), "--worker", str(model_dir), "--reports", reports],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
            found = [json.loads(path.read_text()) for path in Path(reports).glob("rank-*.json")]
        out[name] = sorted(found, key=lambda r: r["rank"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=300e6)
    parser.add_argument("--shard-mb", type=int, default=50, help="size of each checkpoint file")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reports", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.reports)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        size = build(folder, args.params, args.shard_mb)
        files = len(list(folder.glob("*.safetensors")))
        reports = measure(folder)
    if args.json:
        print(json.dumps({"model_bytes": size, "files": files, "reports": reports}))
        return
    gb = size / 1024**3
    print(f"model: {size / 4 / 1e6:.0f}M parameters, {gb:.3f} GB in fp32, {files} safetensors files\n")
    print("| loading | process | load peak (GB) | of the whole model |")
    print("|---|---|---|---|")
    for name, rows in reports.items():
        for row in rows:
            print(f"| {name} | {row['rank']} | {row['load_gb']:.3f} | {row['load_gb'] / gb:.2f}x |")
    print(
        f"\nmedian per process, shards from disk vs whole model: "
        f"{median(r['load_gb'] for r in reports['FSDP x2, shards from disk']) / gb:.2f}x of the model"
    )


if __name__ == "__main__":
    main()
