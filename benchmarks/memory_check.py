"""ila's training-memory estimate (`ila select --memory-budget`) against the peak measured on this machine.

For the default model (SmolLM2-135M-Instruct) and a random-weight model of about 300M parameters with the same
tokenizer (`--big-params`), LoRA and full fine-tuning of all layers, the last 30% of blocks and a seeded random
30% of layers: one subprocess each loads the model in fp32, trains MEMORY_STEPS steps on the widest batches of
the bundled data (batch 4) and reports its resident-memory peak (VmHWM) minus its resident memory before the
model was loaded (Python, torch and the libraries). The estimate is `estimate_training_memory` for the same
layers at fp32 and the measured batch width. Prints one markdown table with the estimate's error.

    python benchmarks/memory_check.py [--big-params 300e6] [--threads 2] [--gradient-checkpointing] [--save F]
    python benchmarks/memory_check.py --measured measured.json     # the table again, with today's estimate

On a CPU the measure is resident memory, so it includes what an estimate leaves out (allocator caches, autograd
buffers, the tokenizer); on a GPU the same comparison would use peak_cuda_gb.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

import torch
from finetune_benchmark import BATCH, MEMORY_STEPS, SEED, make_trainee, rss_peak_gb, widest_batches

from ila.config import DataConfig, LoraShapeConfig, ModelConfig
from ila.layers import Layer, discover_layers
from ila.model_loading import load_model, load_model_skeleton, resolve_model_path
from ila.run_folder import resident_gb
from ila.selection import ModelShapes, SelectionRule, estimate_training_memory
from ila.sft_data import load_sft_data
from ila.training_loop import enable_gradient_checkpointing

PLACEMENTS = ("all layers", "last 30% of blocks", "random 30% of layers")
DEFAULT, BIG = "SmolLM2-135M", "random ~300M"


def chosen_layers(layers: list[Layer], n_blocks: int, which: str) -> list[Layer]:
    if which == "all layers":
        return layers
    if which == "last 30% of blocks":
        return [layer for layer in layers if layer.block >= n_blocks - round(0.3 * n_blocks)]
    picked = sorted(random.Random(SEED).sample(range(len(layers)), round(0.3 * len(layers))))
    return [layers[i] for i in picked]


def child(model: str, method: str, which: str, checkpointing: bool) -> None:
    """Subprocess body: RSS before loading, then load, train, peak; one JSON line."""
    before = resident_gb()
    assert before is not None, "this benchmark reads /proc/self/status (Linux only)"
    loaded = load_model(ModelConfig(name=model, dtype="float32"))
    if checkpointing:
        enable_gradient_checkpointing(loaded.model)
    data = load_sft_data(DataConfig(), loaded.tokenizer, SEED)
    batches = widest_batches(data, int(loaded.tokenizer.pad_token_id), MEMORY_STEPS)
    shapes = ModelShapes.of(loaded.model)
    layers = chosen_layers(discover_layers(loaded.model), shapes.n_blocks, which)
    trainee = make_trainee(method, which, loaded.model, layers, iter(batches), loaded.device)
    for _ in range(MEMORY_STEPS):
        trainee.step()
    width = int(batches[0].input_ids.shape[1])
    measured = {"measured_gb": rss_peak_gb() - before, "width": width, "params": shapes.total_params}
    print(json.dumps({**measured, "checkpointing": checkpointing}))


def estimate(shapes: ModelShapes, method: str, which: str, width: int, checkpointing: bool) -> float:
    """selection.py's estimate for the configuration: fp32 weights, batch 4 x the measured width."""
    layers = chosen_layers(shapes.layers, shapes.n_blocks, which)
    rule = SelectionRule(
        "all",
        method=method,  # type: ignore[arg-type]
        lora_r=LoraShapeConfig().r,
        batch_size=BATCH,
        seq_len=width,
        weight_bytes=4.0,
        gradient_checkpointing=checkpointing,
    )
    return estimate_training_memory(layers, shapes, rule)["total_gb"]


def big_config(params: float) -> Any:
    """A Llama config of about `params` parameters with the default model's vocabulary."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(ModelConfig().name)[0])
    hidden, inner = 1024, 2816
    per_block = 4 * hidden * hidden + 3 * hidden * inner
    config.update(
        {
            "hidden_size": hidden,
            "intermediate_size": inner,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "head_dim": 64,
            "num_hidden_layers": max(1, round((params - config.vocab_size * hidden) / per_block)),
        }
    )
    return config


def build_big(folder: Path, params: float) -> Path:
    """The random-weight model, saved with the default model's tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(SEED)
    LlamaForCausalLM(big_config(params)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig().name)[0]).save_pretrained(folder)
    return folder


def shapes_of(label: str, params: float) -> ModelShapes:
    from transformers import LlamaForCausalLM

    if label == DEFAULT:
        return ModelShapes.of(load_model_skeleton(ModelConfig()))
    with torch.device("meta"):
        return ModelShapes.of(LlamaForCausalLM(big_config(params)))


def measure_all(params: float, threads: int | None, checkpointing: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {DEFAULT: ModelConfig().name, BIG: str(build_big(Path(tmp) / "big", params))}
        for label, model in models.items():
            for method in ("lora", "full"):
                for which in PLACEMENTS:
                    command = [sys.executable, __file__, "--child", model, method, which]
                    if threads:
                        command += ["--threads", str(threads)]
                    if checkpointing:
                        command.append("--gradient-checkpointing")
                    proc = subprocess.run(command, capture_output=True, text=True)
                    if proc.returncode:
                        raise SystemExit(f"{label} {method} {which}: {proc.stderr[-2000:]}")
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    rows.append({"model": label, "method": method, "which": which, **row})
                    print(f"  {label} {method} {which}: {row['measured_gb']:.2f} GB", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-params", type=float, default=300e6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="train every configuration with checkpointing"
    )
    parser.add_argument("--save", type=Path, help="write the measurements to this JSON file")
    parser.add_argument("--measured", type=Path, help="print the table for measurements saved with --save")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "METHOD", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        model, method, which = args.child
        return child(model, method, which, args.gradient_checkpointing)
    if args.measured:
        rows = json.loads(args.measured.read_text())
    else:
        rows = measure_all(args.big_params, args.threads, args.gradient_checkpointing)
        if args.save:
            args.save.write_text(json.dumps(rows, indent=1))
    shapes = {label: shapes_of(label, args.big_params) for label in (DEFAULT, BIG)}
    print(
        "| model | parameters | method | layers | checkpointing | batch width | estimate (GB) | measured (GB) | error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    errors: dict[str, list[float]] = {"lora": [], "full": []}
    for row in rows:
        checkpointing = row.get("checkpointing", False)  # files saved before it was recorded: without
        guess = estimate(shapes[row["model"]], row["method"], row["which"], row["width"], checkpointing)
        error = guess / row["measured_gb"] - 1
        errors[row["method"]].append(error)
        print(
            f"| {row['model']} | {row['params'] / 1e6:.0f}M | {row['method']} | {row['which']} | "
            f"{'yes' if checkpointing else 'no'} | {row['width']} | "
            f"{guess:.2f} | {row['measured_gb']:.2f} | {error:+.0%} |"
        )
    for method, found in errors.items():
        print(f"\n{method}: error from {min(found):+.0%} to {max(found):+.0%}, median {median(found):+.0%}", end="")
    print()


if __name__ == "__main__":
    main()
