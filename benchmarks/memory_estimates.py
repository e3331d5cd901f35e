"""ila's training-memory estimates for 7B and 70B Llama-shaped models (no weights: meta device), per selection.

Estimates, not measurements: they come from `ila.selection.estimate_training_memory` (weights, trainable state,
activations from the lowest selected block up, logits; no framework overhead). Printed as a markdown table for
docs/scaling.md.

Usage: python benchmarks/memory_estimates.py [--batch 4] [--seq 2048] [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ila.selection import ModelShapes, SelectionRule, estimate_training_memory

CONFIGS = {
    "7B (Llama-2 shape)": LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "13B (Llama-2 shape)": LlamaConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    "70B (Llama-2 shape)": LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--fsdp", type=int, nargs="*", default=[8], help="FSDP process counts for the second table")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="estimate every row as trained with checkpointing"
    )
    args = parser.parse_args()
    shapes = {}
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            shapes[name] = ModelShapes.of(LlamaForCausalLM(config))
    ckpt = args.gradient_checkpointing
    print(
        f"Estimated training memory (GB), batch {args.batch} x {args.seq} tokens, bf16 weights, Adam"
        f"{', gradient checkpointing' if ckpt else ''}\n"
    )
    header = "| model | method | all layers | last 30% of blocks | random 30% of layers | first 30% of blocks |"
    print(header)
    print("|---|---|---|---|---|---|")
    for name, shape in shapes.items():
        for method in ("lora", "qlora", "full"):
            print(f"| {name} | {method} | " + " | ".join(_cells(shape, method, args.batch, args.seq, 1, ckpt)) + " |")
    for n in args.fsdp:
        print(
            f"\nPer process under FSDP across {n} processes (fp32 master weights, bf16 compute, global batch "
            f"{args.batch} x {args.seq} tokens split across processes, shards filled from disk)\n"
        )
        print(header.replace("| method |", "| processes | method |"))
        print("|---|---|---|---|---|---|---|")
        for name, shape in shapes.items():
            for method in ("lora", "full"):
                print(
                    f"| {name} | {n} | {method} | "
                    + " | ".join(_cells(shape, method, args.batch, args.seq, n, ckpt))
                    + " |"
                )


def _cells(shapes: ModelShapes, method: str, batch: int, seq: int, processes: int, ckpt: bool) -> list[str]:
    n = len(shapes.layers)
    cut = round(0.3 * shapes.n_blocks)
    sets = {
        "all": shapes.layers,
        "last": [la for la in shapes.layers if la.block >= shapes.n_blocks - cut],
        "random": random.Random(0).sample(shapes.layers, round(0.3 * n)),
        "first": [la for la in shapes.layers if la.block < cut],
    }
    rule = SelectionRule(
        "top_fraction",
        0.3,
        method=method,  # type: ignore[arg-type]
        batch_size=batch,
        seq_len=seq,
        fsdp_processes=processes,
        gradient_checkpointing=ckpt,
    )
    return [f"{estimate_training_memory(chosen, shapes, rule)['total_gb']:.1f}" for chosen in sets.values()]


if __name__ == "__main__":
    main()
