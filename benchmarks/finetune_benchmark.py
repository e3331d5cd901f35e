"""Benchmark of `ila finetune` on the default model (SmolLM2-135M-Instruct, bundled data, batch 4, fp32): LoRA, or
with `--method full` full fine-tuning of the selected layers' weights (the way Spectrum trains), where every selected
weight carries its gradient and AdamW's two moments.

Prints, measured side by side in one run:
  1. LoRA on all 210 layers vs LoRA on 30% of them: (a) ILA's top 30% from --ranking, (b) every layer of the deepest
     30% of blocks, (c) a seeded random 30%, and with --ranking (d) what selection.py's depth-aware memory-budget
     rule picks from the ranking for 0.7x the all-layers memory estimate (what it picks for the budget the ILA top
     30% is estimated to need is reported in a note). For each:
       - the median step time (forward + backward + clip + optimizer, timed by ila's `training_loop.train`); every
         configuration is a LoRA copy of the same base model in this process, all trained on the same batches and
         interleaved step by step (the order flips every step), the first step dropped as a warm-up;
       - the peak RSS of a subprocess that loads the model and data and trains only that configuration for
         MEMORY_STEPS steps on the widest batches of an epoch (its own VmHWM; one subprocess per
         configuration, one after another), beside a subprocess that only runs the forward passes without gradients;
       - the lowest selected block (the backward pass must run down to it: the depth cost) and selection.py's
         memory estimate for the selection (fp32 weights, batch 4 x max length).
  2. ila's LoRA loop vs TRL's SFTTrainer + PEFT (needs `pip install trl`; skipped when it is not importable), both
     with LoRA on all layers from the same LoraConfig, fp32, no gradient checkpointing, AdamW (torch) at the same
     learning rate and clipping, no evaluation, saving or logging. TRL gets ila's own tokenized examples (input_ids
     and assistant-only labels) as a pre-tokenized `datasets.Dataset` in ila's batch order with a sequential
     sampler, so both see identical padded batches (checked). A TRL callback times each TRL step from
     `on_step_begin` to `on_step_end` and then runs one ila step, so the two interleave step by step. Tokens/s
     counts real (non-padding) tokens.

Usage: python benchmarks/finetune_benchmark.py [--steps 6] [--ranking RUN_DIR_OR_RANKING_JSON] [--skip-trl]
                                               [--threads N] [--method lora|full] [--gradient-checkpointing]
(--method full compares the selections only: the TRL part is LoRA's. --gradient-checkpointing recomputes every
block's activations in backward in every configuration, as `run.gradient_checkpointing=true` does.)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ila.config import DataConfig, LoraShapeConfig, ModelConfig
from ila.errors import IlaError
from ila.layers import Layer, discover_layers
from ila.lora_adapters import attach_lora, lora_config_for
from ila.model_loading import load_model
from ila.ranking import load_ranking
from ila.selection import ModelShapes, SelectionRule, estimate_training_memory, lora_param_count, select
from ila.sft_data import Batch, SftData, batch_stream, collate, length_grouped_order, load_sft_data
from ila.training_loop import enable_gradient_checkpointing, sft_loss, train

FRACTION = 0.3  # the share of layers (and of blocks) every selection trains
BATCH = 4
LEARNING_RATE = 1e-3  # ila finetune's LoRA default
FULL_LEARNING_RATE = 1e-5  # ila finetune's full default
GRAD_CLIP = 1.0  # ila finetune's default
SEED = 0
MEMORY_STEPS = 3  # step 1 allocates Adam's moments; the peak is reached by step 2
NO_TRAINING = "forward only, no gradients"
GB = 1024**3
TARGET_STEP_RATIO = 0.6
TARGET_MEMORY_RATIO = 0.7
TARGET_TRL_RATIO = 1.0


@dataclass
class Placement:
    """Which layers carry LoRA in one configuration."""

    name: str
    layers: list[Layer]

    @property
    def lowest_block(self) -> int:
        return min(layer.block for layer in self.layers)


@dataclass
class Trainee:
    """One LoRA model with its optimizer and batches, stepped through ila's training loop one step at a time."""

    name: str
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    batches: Iterator[Batch]
    device: torch.device
    steps: int = 0
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def step(self) -> float:
        """One optimizer step of `training_loop.train`; returns its timed seconds (batch collation not included)."""
        result = train(
            stage=self.name,
            params=self.params,
            batches=self.batches,
            loss_fn=lambda batch: sft_loss(self.model, batch),
            optimizer=self.optimizer,
            max_steps=self.steps + 1,
            start_step=self.steps,
            device=self.device,
            grad_clip=GRAD_CLIP,
        )
        self.steps += 1
        self.seconds.append(result.step_seconds[0])
        self.tokens.append(result.tokens)
        return result.step_seconds[0]


def lora_trainee(
    name: str, model: nn.Module, layers: Sequence[Layer], batches: Iterator[Batch], device: torch.device
) -> Trainee:
    """LoRA (ila's defaults: r=8, alpha 16, dropout 0.05) on `layers` of `model`, with AdamW as `ila finetune`."""
    torch.manual_seed(SEED)
    peft_model = attach_lora(model, layers, LoraShapeConfig())  # type: ignore[arg-type]
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    return Trainee(name, peft_model, params, optimizer, batches, device)


def full_trainee(
    name: str, model: nn.Module, layers: Sequence[Layer], batches: Iterator[Batch], device: torch.device
) -> Trainee:
    """Full fine-tuning of `layers`' weights (as `ila finetune --method full`): every other parameter frozen."""
    model.requires_grad_(False)
    for layer in layers:
        model.get_submodule(layer.name).weight.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=FULL_LEARNING_RATE, weight_decay=0.0)
    return Trainee(name, model, params, optimizer, batches, device)


def make_trainee(
    method: str, name: str, model: nn.Module, layers: Sequence[Layer], batches: Iterator[Batch], device: torch.device
) -> Trainee:
    return (full_trainee if method == "full" else lora_trainee)(name, model, layers, batches, device)


def trained_params(method: str, layers: Sequence[Layer], r: int) -> int:
    """What a configuration trains: LoRA factors, or the selected weights themselves."""
    if method == "full":
        return sum(layer.in_features * layer.out_features for layer in layers)
    return sum(lora_param_count(layer, r) for layer in layers)


def rss_peak_gb() -> float:
    """This process's peak RSS since it started (its address space's high-water mark, VmHWM).

    Not `ru_maxrss`: Linux carries that across exec, so a subprocess started by this (multi-GB) benchmark would
    report at least the parent's RSS at the time it was spawned.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def memory_rule(
    kind: str = "top_fraction", value: float = FRACTION, method: str = "lora", checkpointing: bool = False
) -> SelectionRule:
    """selection.py's rule for this benchmark's setting: LoRA r=8 (or full), fp32 weights, batch 4 x the data's max
    length, with or without gradient checkpointing."""
    return SelectionRule(
        kind,
        value,
        method=method,  # type: ignore[arg-type]
        lora_r=LoraShapeConfig().r,
        batch_size=BATCH,  # type: ignore[arg-type]
        seq_len=DataConfig().max_length,
        weight_bytes=4.0,
        gradient_checkpointing=checkpointing,
    )


# ------------------------------------------------------------------------------------------ configurations


def placements(
    layers: list[Layer],
    shapes: ModelShapes,
    ranking_path: str | None,
    method: str = "lora",
    checkpointing: bool = False,
) -> tuple[list[Placement], str]:
    """All layers and the 30% selections (and, with a ranking, a depth-aware memory-budget selection), plus a note
    on what selection.py's memory-budget rule picks for the budget the ILA top 30% is estimated to need."""
    n_pick = round(FRACTION * len(layers))
    by_name = shapes.by_name()
    out = [Placement("all layers", list(layers))]
    note = ""
    if ranking_path:
        ranking = load_ranking(ranking_path)
        rule = memory_rule(method=method, checkpointing=checkpointing)
        top = select(ranking, rule, shapes, ranking_path)
        out.append(Placement("ILA top 30%", [by_name[name] for name in top.names()]))
        assert top.memory_estimate is not None
        same = select(
            ranking, replace(rule, kind="memory_budget", value=top.memory_estimate["total_gb"]), shapes, ranking_path
        )
        # The same budget can only give back the same layers (every prefix of the ranking fits), so the row that is
        # timed uses the memory target instead: 0.7 x the all-layers estimate.
        all_gb = estimate_training_memory(layers, shapes, rule)["total_gb"]
        budget = replace(rule, kind="memory_budget", value=TARGET_MEMORY_RATIO * all_gb)
        assert same.memory_estimate is not None
        note = (
            f"selection.py's memory-budget rule is depth-aware: it counts activations only from the lowest selected "
            f"block up ({'full' if method == 'full' else 'LoRA r=8'}, fp32, batch {BATCH} x "
            f"{DataConfig().max_length}{', gradient checkpointing' if checkpointing else ''}). At the budget the ILA "
            f"top 30% is estimated to need ({top.memory_estimate['total_gb']:.2f} GB) it picks {len(same.layers)} "
            f"layers, lowest block {same.lowest_block} (backward through {same.backward_blocks} blocks), "
            f"{'the same layers as the top 30%' if same.names() == top.names() else 'other layers than the top 30%'}"
            f" (ILA top 30%: {len(top.layers)} layers, lowest block {top.lowest_block}): the top 30% already reaches "
            f"block {top.lowest_block}, so that budget buys no depth saving. "
        )
        try:
            target = select(ranking, budget, shapes, ranking_path)
        except IlaError as err:  # with checkpointing the fixed part can exceed 0.7x of everything
            note += f"At {TARGET_MEMORY_RATIO}x the all-layers estimate no selection fits ({err}): no such row."
        else:
            out.append(Placement(f"ILA, memory budget {TARGET_MEMORY_RATIO}x", [by_name[n] for n in target.names()]))
            assert target.memory_estimate is not None
            note += (
                f"At {TARGET_MEMORY_RATIO}x the all-layers estimate ({TARGET_MEMORY_RATIO * all_gb:.2f} GB) it picks "
                f"{len(target.layers)} layers, lowest block {target.lowest_block} (backward through "
                f"{target.backward_blocks} blocks, estimate {target.memory_estimate['total_gb']:.2f} GB): the row "
                f"'ILA, memory budget {TARGET_MEMORY_RATIO}x'."
            )
    deepest = shapes.n_blocks - round(FRACTION * shapes.n_blocks)
    out.append(Placement("last 30% of blocks", [layer for layer in layers if layer.block >= deepest]))
    picked = sorted(random.Random(SEED).sample(range(len(layers)), n_pick))
    out.append(Placement(f"random 30% (seed {SEED})", [layers[i] for i in picked]))
    return out, note


# ------------------------------------------------------------------------------------ 1a. interleaved timing


def time_placements(
    base: nn.Module,
    chosen: list[Placement],
    data: SftData,
    pad_id: int,
    device: torch.device,
    steps: int,
    method: str = "lora",
) -> dict[str, list[float]]:
    """Median-ready step times: each configuration on its own copy of `base`, identical batches, interleaved."""
    trainees = [
        make_trainee(
            method, p.name, copy.deepcopy(base), p.layers, batch_stream(data.train, BATCH, pad_id, SEED), device
        )
        for p in chosen
    ]
    for step in range(steps + 1):  # step 0 is a warm-up
        for trainee in trainees if step % 2 == 0 else reversed(trainees):
            trainee.step()
        print(f"  step {step}: " + ", ".join(f"{t.name} {t.seconds[-1]:.2f} s" for t in trainees), flush=True)
    out = {t.name: t.seconds[1:] for t in trainees}
    del trainees
    gc.collect()
    return out


# ------------------------------------------------------------------------ 1b. peak memory, one subprocess each


def widest_batches(data: SftData, pad_id: int, n: int) -> list[Batch]:
    """The `n` widest batches of one length-grouped epoch, widest first: the peak a whole run would reach."""
    lengths = [len(e.input_ids) for e in data.train]
    epoch = length_grouped_order(lengths, BATCH, random.Random(SEED))
    epoch.sort(key=lambda rows: max(lengths[i] for i in rows), reverse=True)
    return [collate([data.train[i] for i in rows], pad_id) for rows in epoch[:n]]


def memory_child(name: str, spec_path: Path) -> None:
    """Subprocess body: load, train one configuration (or only run forwards), print one JSON line with peak RSS."""
    loaded = load_model(ModelConfig(dtype="float32"))
    data = load_sft_data(DataConfig(), loaded.tokenizer, SEED)
    pad_id = int(loaded.tokenizer.pad_token_id)
    batches = widest_batches(data, pad_id, MEMORY_STEPS)
    spec = json.loads(spec_path.read_text())
    if spec["checkpointing"]:
        enable_gradient_checkpointing(loaded.model)
    out: dict[str, Any] = {"after_load_gb": rss_peak_gb(), "batch_width": int(batches[0].input_ids.shape[1])}
    if name == NO_TRAINING:  # the same batches without gradients: every weight is paged in, no training state
        with torch.no_grad():
            for batch in batches:
                sft_loss(loaded.model, batch.to(loaded.device))
    else:
        by_name = {layer.name: layer for layer in discover_layers(loaded.model)}
        layers = [by_name[n] for n in spec["placements"][name]]
        trainee = make_trainee(spec["method"], name, loaded.model, layers, iter(batches), loaded.device)
        for _ in range(MEMORY_STEPS):
            trainee.step()
    out["peak_gb"] = rss_peak_gb()
    if loaded.device.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / GB
    print(json.dumps(out))


def measure_memory(
    chosen: list[Placement], threads: int | None, method: str = "lora", checkpointing: bool = False
) -> dict[str, dict[str, Any]]:
    """Run `memory_child` once per configuration (and once forward-only); each reports its own peak RSS."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "placements.json"
        placed = {p.name: [layer.name for layer in p.layers] for p in chosen}
        spec.write_text(json.dumps({"method": method, "checkpointing": checkpointing, "placements": placed}))
        for name in [NO_TRAINING, *(p.name for p in chosen)]:
            command = [sys.executable, __file__, "--memory-child", name, "--memory-spec", str(spec)]
            if threads:
                command += ["--threads", str(threads)]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                raise SystemExit(f"the memory subprocess for '{name}' failed")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {name}: peak RSS {results[name]['peak_gb']:.2f} GB", flush=True)
    return results


def selective_lora(
    base: nn.Module,
    layers: list[Layer],
    shapes: ModelShapes,
    data: SftData,
    pad_id: int,
    device: torch.device,
    steps: int,
    ranking: str | None,
    threads: int | None,
    method: str = "lora",
    checkpointing: bool = False,
) -> None:
    chosen, note = placements(layers, shapes, ranking, method, checkpointing)
    what = "Full fine-tuning of" if method == "full" else "LoRA on"
    print(
        f"\n## 1. {what} all layers vs 30% selections ({steps} interleaved steps after 1 warm-up, batch {BATCH}, "
        f"max length {DataConfig().max_length}, bundled data"
        f"{', gradient checkpointing' if checkpointing else ''})\n"
    )
    if not ranking:
        print("(no --ranking given: the ILA top-30% rows are skipped)\n")
    print("timing, interleaved in this process:", flush=True)
    seconds = time_placements(base, chosen, data, pad_id, device, steps, method)
    print(f"peak memory, one subprocess per configuration ({MEMORY_STEPS} steps on the widest batches):", flush=True)
    memory = measure_memory(chosen, threads, method, checkpointing)
    forward_gb = memory[NO_TRAINING]["peak_gb"]
    base_time = statistics.median(seconds[chosen[0].name])
    base_mem = memory[chosen[0].name]["peak_gb"]
    r = LoraShapeConfig().r
    trained = "trained weights" if method == "full" else "LoRA params"
    print()
    print(
        f"| configuration | layers | {trained} | lowest block | median step (s) | step ratio | peak RSS (GB) "
        "| RSS ratio | RSS above forward-only (GB) | estimate (GB) | targets met (time, memory) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rule = memory_rule(method=method, checkpointing=checkpointing)
    for p in chosen:
        step = statistics.median(seconds[p.name])
        peak = memory[p.name]["peak_gb"]
        estimate = estimate_training_memory(p.layers, shapes, rule)["total_gb"]
        met = (
            "-"
            if p is chosen[0]
            else (
                f"{'yes' if step / base_time <= TARGET_STEP_RATIO else 'no'}, "
                f"{'yes' if peak / base_mem <= TARGET_MEMORY_RATIO else 'no'}"
            )
        )
        print(
            f"| {p.name} | {len(p.layers)} | {trained_params(method, p.layers, r):,} | "
            f"{p.lowest_block} | {step:.2f} | {step / base_time:.2f} | {peak:.2f} | {peak / base_mem:.2f} | "
            f"{peak - forward_gb:.2f} | {estimate:.2f} | {met} |"
        )
    print(f"\n- targets: step time <= {TARGET_STEP_RATIO}x and peak memory <= {TARGET_MEMORY_RATIO}x all layers")
    print(f"- step times: median of {steps} steps each; ratios are to 'all layers' measured in the same run")
    print(
        f"- peak RSS: high-water mark (VmHWM) of each subprocess (model, data, {MEMORY_STEPS} training steps on "
        f"batches {memory[NO_TRAINING]['batch_width']} tokens wide); forward passes on the same batches "
        f"without gradients reach {forward_gb:.2f} GB; 'RSS above forward-only' subtracts that"
    )
    if "peak_cuda_gb" in memory[chosen[0].name]:
        print(
            "- peak CUDA allocated (GB): " + ", ".join(f"{p.name} {memory[p.name]['peak_cuda_gb']:.2f}" for p in chosen)
        )
    print(
        f"- estimate: selection.py's `estimate_training_memory` ({'full' if method == 'full' else 'LoRA r=8'}, "
        "fp32 weights, batch "
        f"{BATCH} x {DataConfig().max_length}{', gradient checkpointing' if checkpointing else ''})"
    )
    if note:
        print(f"- depth-aware budget: {note}")


# ------------------------------------------------------------------------------------------------ 2. vs TRL


def trl_comparison(
    base: nn.Module, layers: list[Layer], data: SftData, tokenizer: Any, device: torch.device, steps: int
) -> None:
    print(
        f"\n## 2. ila's LoRA loop vs TRL SFTTrainer + PEFT (LoRA on all {len(layers)} layers, {steps} interleaved "
        f"steps after 1 warm-up, batch {BATCH})\n"
    )
    try:
        import datasets
        import trl
        from transformers import PrinterCallback, TrainerCallback
        from trl import SFTConfig, SFTTrainer
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    except ImportError as err:
        print(f"skipped: TRL is not importable ({err}); `pip install trl` to run this part")
        return
    pad_id = int(tokenizer.pad_token_id)
    stream = batch_stream(data.train, BATCH, pad_id, SEED)
    batches = [next(stream) for _ in range(steps + 1)]
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for batch in batches:  # ila's examples, unpadded, in ila's batch order
        for i in range(BATCH):
            n = int(batch.attention_mask[i].sum())
            rows["input_ids"].append(batch.input_ids[i, :n].tolist())
            rows["labels"].append(batch.labels[i, :n].tolist())
    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict(rows)
    ila = lora_trainee("ila", copy.deepcopy(base), layers, iter(batches), device)
    trl_seconds: list[float] = []
    trl_batches: list[dict[str, torch.Tensor]] = []
    threads_seen: set[int] = set()
    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id)

    def recording_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = collator(examples)
        trl_batches.append(out)
        return out

    class Interleave(TrainerCallback):  # type: ignore[misc]
        """Times each TRL step, then runs one ila step outside TRL's timed region."""

        started = 0.0

        def on_step_begin(self, *_args: Any, **_kwargs: Any) -> None:
            threads_seen.add(torch.get_num_threads())
            self.started = time.perf_counter()

        def on_step_end(self, *_args: Any, **_kwargs: Any) -> None:
            trl_seconds.append(time.perf_counter() - self.started)
            ila.step()
            print(
                f"  step {len(trl_seconds) - 1}: TRL {trl_seconds[-1]:.2f} s, ila {ila.seconds[-1]:.2f} s", flush=True
            )

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_steps=steps + 1,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=GRAD_CLIP,
            optim="adamw_torch",
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=device.type == "cpu",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            train_sampling_strategy="sequential",
            max_length=DataConfig().max_length,
            packing=False,
            padding_free=False,
            seed=SEED,
        )
        threads = torch.get_num_threads()
        trainer = SFTTrainer(
            model=copy.deepcopy(base),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config_for(layers, LoraShapeConfig()),
            data_collator=recording_collator,
            callbacks=[Interleave()],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
        torch.set_num_threads(threads)
        trl_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    threads_seen.add(torch.get_num_threads())
    identical = len(trl_batches) == len(batches) and all(
        torch.equal(t["input_ids"], b.input_ids)
        and torch.equal(t["labels"], b.labels)
        and torch.equal(t["attention_mask"], b.attention_mask)
        for t, b in zip(trl_batches, batches, strict=False)
    )
    trl_tokens = [int(t["attention_mask"].sum()) for t in trl_batches]
    ila_rate = [n / s for n, s in zip(ila.tokens[1:], ila.seconds[1:], strict=True)]
    trl_rate = [n / s for n, s in zip(trl_tokens[1:], trl_seconds[1:], strict=True)]
    ila_params = sum(p.numel() for p in ila.params)
    print()
    print("| loop | trainable params | median step (s) | median tokens/s | tokens/s over all timed steps |")
    print("|---|---|---|---|---|")
    for name, params, seconds, tokens, rate in (
        ("ila (training_loop.train)", ila_params, ila.seconds[1:], ila.tokens[1:], ila_rate),
        (f"TRL {trl.__version__} SFTTrainer + PEFT", trl_params, trl_seconds[1:], trl_tokens[1:], trl_rate),
    ):
        print(
            f"| {name} | {params:,} | {statistics.median(seconds):.2f} | {statistics.median(rate):.0f} | "
            f"{sum(tokens) / sum(seconds):.0f} |"
        )
    ratio = statistics.median(ila_rate) / statistics.median(trl_rate)
    print(
        f"\n- tokens/s ratio ila / TRL (medians): {ratio:.2f} (target >= {TARGET_TRL_RATIO}: "
        f"{'met' if ratio >= TARGET_TRL_RATIO else 'not met'}); over all timed steps: "
        f"{(sum(ila.tokens[1:]) / sum(ila.seconds[1:])) / (sum(trl_tokens[1:]) / sum(trl_seconds[1:])):.2f}"
    )
    print(
        f"- identical padded batches on both sides: {'yes' if identical else 'NO'}; "
        f"{sum(ila.tokens[1:]):,} real tokens in the timed steps; torch threads seen: {sorted(threads_seen)}"
    )
    print(
        "- same for both: fp32, LoRA r=8 alpha 16 dropout 0.05 from one LoraConfig, AdamW (torch) lr 1e-3 wd 0, "
        "clip 1.0, no gradient checkpointing; TRL: no eval, no saving, no logging, sequential sampler"
    )


# ---------------------------------------------------------------------------------------------- entry point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--ranking", help="an identify run folder or ranking.json of the default model")
    parser.add_argument("--skip-trl", action="store_true", help="skip the comparison with TRL's SFTTrainer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--method", choices=("lora", "full"), default="lora", help="how the selections train")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute block activations in backward (every run)"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: one memory subprocess
    parser.add_argument("--memory-spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, not results
    try:
        if args.memory_child:
            memory_child(args.memory_child, args.memory_spec)
            return
        if args.steps < 1:
            raise IlaError(f"--steps={args.steps} must be >= 1")
        loaded = load_model(ModelConfig(dtype="float32"))
        data = load_sft_data(DataConfig(), loaded.tokenizer, SEED)
        layers = discover_layers(loaded.model)
        shapes = ModelShapes.of(loaded.model)
        print(
            f"model {ModelConfig().name}: {len(layers)} linear layers in {shapes.n_blocks} blocks; "
            f"{len(data.train)} training examples; device {loaded.device}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        pad_id = int(loaded.tokenizer.pad_token_id)
        if args.gradient_checkpointing:  # before the copies: every configuration inherits it
            enable_gradient_checkpointing(loaded.model)
        selective_lora(
            loaded.model,
            layers,
            shapes,
            data,
            pad_id,
            loaded.device,
            args.steps,
            args.ranking,
            args.threads,
            args.method,
            args.gradient_checkpointing,
        )
        if args.skip_trl or args.method == "full" or args.gradient_checkpointing:
            print("\n## 2. ila vs TRL: skipped (--skip-trl, --method full or --gradient-checkpointing)")
        else:
            trl_comparison(loaded.model, layers, data, loaded.tokenizer, loaded.device, args.steps)
    except IlaError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
