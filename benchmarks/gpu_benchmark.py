"""LoRA on all layers vs on 30% of them, on a randomly initialised Llama of realistic size (default: 1.1B).

Prints, measured side by side in one process, for each selection: median step time, tokens/s, model-FLOPs
utilisation and peak memory. The selections are LoRA on every linear layer, a seeded random 30% of the layers,
and every layer of the deepest 30% of blocks (the weights are random, so an ILA ranking would carry no meaning;
what a selection costs depends on how many layers it trains and how deep backward must go, which these two
bracket). The configurations run one after another on the same base model in one process (so that each one's
peak memory is its own); the first WARMUP steps of each are dropped.

MFU counts the model FLOPs of a LoRA step as 4·N·T (forward 2·N·T, backward through the frozen weights for the
input gradients 2·N·T; LoRA's own FLOPs are < 1% and weight gradients of frozen layers are never computed), N the
base parameters without embeddings, T the tokens of the step, divided by the step time and the GPU's peak dense
bf16 FLOP/s (--peak-tflops, default 989 for an H100/H200 SXM).

Usage: python benchmarks/gpu_benchmark.py [--steps 20] [--batch 8] [--seq 1024] [--peak-tflops 989]
       python benchmarks/gpu_benchmark.py --tiny      # a 4-block model on the CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ila.config import LoraShapeConfig
from ila.layers import Layer, discover_layers
from ila.lora_adapters import attach_lora, lora_parameters, remove_lora
from ila.sft_data import Batch
from ila.training_loop import sft_loss

FRACTION = 0.3
WARMUP = 3


def llama_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
        )
    # TinyLlama-1.1B's shape: 22 blocks, hidden 2048, GQA with 4 KV heads
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )


@dataclass
class Setup:
    name: str
    layers: list[Layer]
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0


def selections(layers: list[Layer]) -> list[Setup]:
    k = round(FRACTION * len(layers))
    n_blocks = max(layer.block for layer in layers) + 1
    deepest = set(range(n_blocks - round(FRACTION * n_blocks), n_blocks))
    return [
        Setup("all layers", layers),
        Setup("random 30%", sorted(random.Random(0).sample(layers, k), key=layers.index)),
        Setup("last 30% of blocks", [layer for layer in layers if layer.block in deepest]),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model: torch.nn.Module, params: list[torch.nn.Parameter], batch: Batch, opt: torch.optim.Optimizer) -> None:
    loss = sft_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    parser.add_argument("--tiny", action="store_true", help="a 4-block model on the CPU (a smoke test)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq = 64 if args.tiny else args.seq
    torch.manual_seed(0)
    config = llama_config(args.tiny)
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    base.requires_grad_(False)
    layers = discover_layers(base)
    n_params = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)
    ids = torch.randint(0, config.vocab_size, (args.batch, seq), device=device)
    batch = Batch(ids, torch.ones_like(ids), ids.clone())
    tokens = ids.numel()
    setups = selections(layers)
    print(f"model: random Llama, {n_params / 1e9:.2f}B parameters without embeddings, {len(layers)} linear layers")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {dtype}")
    print(f"batch {args.batch} x {seq} tokens, {args.steps} timed steps per configuration after {WARMUP} warm-up")

    for setup in setups:  # one configuration at a time in memory: attach, time its steps, detach
        model = attach_lora(base, setup.layers, LoraShapeConfig(r=16, alpha=32, dropout=0.0))
        params = lora_parameters(model, setup.layers)
        opt = torch.optim.AdamW(params, lr=1e-4)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(WARMUP + args.steps):
            sync(device)
            started = time.perf_counter()
            step(model, params, batch, opt)
            sync(device)
            if i >= WARMUP:
                setup.seconds.append(time.perf_counter() - started)
        if device.type == "cuda":
            setup.peak_bytes = torch.cuda.max_memory_allocated(device)
        base = remove_lora(model)  # type: ignore[assignment]
        del opt, params, model

    reference = setups[0]
    print()
    print("| selection | layers | lowest block | median step (s) | tokens/s | MFU | peak memory (GB) | vs all |")
    print("|---|---|---|---|---|---|---|---|")
    for setup in setups:
        median = statistics.median(setup.seconds)
        mfu = 4 * n_params * tokens / median / (args.peak_tflops * 1e12)
        ratio_step = median / statistics.median(reference.seconds)
        if reference.peak_bytes:  # CUDA only: torch's allocator counts what the step held at its peak
            peak = f"{setup.peak_bytes / 1024**3:.2f}"
            ratio_mem = f"{setup.peak_bytes / reference.peak_bytes:.2f}x"
        else:
            peak = ratio_mem = "n/a (CPU)"
        print(
            f"| {setup.name} | {len(setup.layers)} | {min(layer.block for layer in setup.layers)} | {median:.4f} | "
            f"{tokens / median:,.0f} | {mfu:.1%} | {peak} | step {ratio_step:.2f}x, memory {ratio_mem} |"
        )


if __name__ == "__main__":
    main()
