"""Benchmark of `ila identify` on the default model (SmolLM2-135M-Instruct, bundled data).

Prints, measured side by side in one run:
  1. Stage-2 / Stage-1 step-time ratio on the same batches (interleaved, medians), with where each step's time goes
     (forward, backward, optimizer);
  2. padding waste of length-grouped batches vs random batches over one epoch;
  3. (unless --skip-run) the wall time and peak RSS of the whole default `ila identify` in a subprocess, with the
     time per part from its manifest.

Usage: python benchmarks/identify_benchmark.py [--steps 8] [--skip-run] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ila.config import DataConfig, LoraShapeConfig, ModelConfig, Stage2Config
from ila.layers import discover_layers
from ila.lora_adapters import LayerMask, attach_lora, lora_parameters
from ila.model_loading import load_model
from ila.sft_data import batch_stream, collate, length_grouped_order, load_sft_data
from ila.training_loop import sft_loss


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def step_ratio(steps: int) -> None:
    loaded = load_model(ModelConfig())
    data = load_sft_data(DataConfig(), loaded.tokenizer, seed=0)
    layers = discover_layers(loaded.model)
    peft_model = attach_lora(loaded.model, layers, LoraShapeConfig())
    lora_params = lora_parameters(peft_model, layers)
    for p in lora_params:  # a trained-looking update, so Stage 2 sees a non-zero branch
        torch.nn.init.normal_(p, std=0.01)
    opt1 = torch.optim.AdamW(lora_params, lr=1e-4)
    scores = torch.nn.Parameter(torch.full((len(layers),), Stage2Config().init_score))
    opt2 = torch.optim.Adam([scores], lr=0.1)
    pad = int(loaded.tokenizer.pad_token_id)
    batches = batch_stream(data.train, 4, pad, seed=0)
    mask = LayerMask(peft_model, layers)
    parts: dict[str, dict[str, list[float]]] = {"stage1": {}, "stage2": {}}

    def record(stage: str, name: str, seconds: float) -> None:
        parts[stage].setdefault(name, []).append(seconds)

    for i in range(steps + 1):  # the first pair is a warm-up and is not recorded
        batch = next(batches)
        # Stage 1: LoRA factors train, dropout on
        for p in lora_params:
            p.requires_grad_(True)
        peft_model.train()
        mask.values = None
        loss, t_fwd = timed(lambda: sft_loss(peft_model, batch))  # noqa: B023
        _, t_bwd = timed(loss.backward)
        _, t_opt = timed(lambda: (opt1.step(), opt1.zero_grad(set_to_none=True)))
        if i:
            for name, t in (("forward", t_fwd), ("backward", t_bwd), ("optimizer", t_opt)):
                record("stage1", name, t)
            record("stage1", "total", t_fwd + t_bwd + t_opt)
        # Stage 2: only the scores train, dropout off
        for p in lora_params:
            p.requires_grad_(False)
        peft_model.eval()

        def stage2_forward() -> torch.Tensor:
            gamma = torch.sigmoid(scores)
            mask.values = gamma
            return sft_loss(peft_model, batch) + 1.0 * gamma.mean()  # noqa: B023

        loss, t_fwd = timed(stage2_forward)
        _, t_bwd = timed(loss.backward)
        _, t_opt = timed(lambda: (opt2.step(), opt2.zero_grad(set_to_none=True)))
        if i:
            for name, t in (("forward", t_fwd), ("backward", t_bwd), ("optimizer", t_opt)):
                record("stage2", name, t)
            record("stage2", "total", t_fwd + t_bwd + t_opt)
    mask.remove()
    print(f"\n## Stage-2 vs Stage-1 step ({steps} interleaved pairs, batch 4, bundled data, medians)\n")
    print("| part | stage 1 (s) | stage 2 (s) | ratio |")
    print("|---|---|---|---|")
    for name in ("forward", "backward", "optimizer", "total"):
        a, b = statistics.median(parts["stage1"][name]), statistics.median(parts["stage2"][name])
        print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f} |")


def padding(batch_size: int = 4) -> None:
    loaded = load_model(ModelConfig())
    data = load_sft_data(DataConfig(), loaded.tokenizer, seed=0)
    lengths = [len(e.input_ids) for e in data.train]
    pad = int(loaded.tokenizer.pad_token_id)
    grouped = length_grouped_order(lengths, batch_size, random.Random(0))
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    plain = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def waste(batches: list[list[int]]) -> float:
        real = sum(lengths[i] for b in batches for i in b)
        padded = sum(collate([data.train[i] for i in b], pad).input_ids.numel() for b in batches)
        return 1 - real / padded

    print(f"\n## Padding over one epoch ({len(lengths)} examples, batch {batch_size})\n")
    print(f"- random batches: {waste(plain):.1%} of tokens are padding")
    print(f"- length-grouped batches (ila): {waste(grouped):.1%} of tokens are padding")


def default_run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "ila", "-q", "identify", "--output", str(out)], capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        if proc.returncode != 0:
            print(proc.stderr[-2000:])
            raise SystemExit("the default run failed")
        manifest = json.loads((out / "manifest.json").read_text())
        print("\n## Default `ila identify` (subprocess, wall clock)\n")
        print(f"- wall time {wall:.0f} s (target <= 600 s), peak RSS {peak_gb:.2f} GB (target < 8 GB)")
        print("- where the time went: " + ", ".join(f"{k} {v:.1f} s" for k, v in manifest["timings"].items()))
        s1, s2 = manifest["stage1"], manifest["stage2"]
        print(
            f"- stage 1: {s1['steps']} steps ({s1['stopped_by']}), median {s1['median_step_s']:.2f} s/step, "
            f"{s1['tokens_per_s']:.0f} tokens/s, padding {s1['padding_fraction']:.1%}"
        )
        print(
            f"- stage 2: {s2['steps']} steps, median {s2['median_step_s']:.2f} s/step "
            f"(ratio to stage 1 in this run: {s2['median_step_s'] / s1['median_step_s']:.2f})"
        )
        print("- held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in manifest["heldout_loss"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-run", action="store_true", help="skip the full default identify run")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    step_ratio(args.steps)
    padding()
    if not args.skip_run:
        default_run()


if __name__ == "__main__":
    main()
