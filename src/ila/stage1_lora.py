"""Stage 1: LoRA on every linear layer of every block, trained until the update is ε-stable.

Reads the base model, the layers and the SFT data; writes `stage1/adapter` (PEFT format), one adapter per
milestone (`stage1/milestone-25` ...), and `stage1/trace.csv` with both stability statistics.

ε-stability (see docs/method.md): every `window` steps r_t = |Δθ_t − Δθ_{t−w}|_F / |Δθ_t|_F over all adapted
layers; stable after `patience` consecutive checks with r_t < ε. The loss-plateau statistic is logged beside it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel

from ila.checkpoints import load_checkpoint, restore_rng, rng_state, save_checkpoint
from ila.config import LoraSettings, Stage1Config
from ila.layers import Layer
from ila.lora_adapters import (
    LoraFactors,
    attach_lora,
    change_sq_norms,
    lora_factors,
    lora_parameters,
    snapshot,
    update_sq_norms,
)
from ila.run_folder import atomic_dir, write_csv
from ila.sft_data import Example, batch_stream
from ila.sharding import copy_full_into, full, load_optimizer_state, lora_state_dict, optimizer_state, shard_if_enabled
from ila.training_loop import LoopResult, compile_blocks, sft_loss, train

log = logging.getLogger(__name__)


@dataclass
class Stage1Result:
    adapter_dir: Path
    milestones: dict[int, Path]  # percent -> adapter folder
    stopped_by: str  # "epsilon", "plateau", "step cap"
    loop: LoopResult
    trace: list[dict[str, float]] = field(default_factory=list)  # one row per stability check

    @property
    def steps(self) -> int:
        return self.loop.steps_run


def milestone_steps(max_steps: int, percents: Sequence[int]) -> dict[int, int]:
    """Step at which each milestone percentage of the planned steps is reached."""
    return {p: max(1, math.ceil(max_steps * p / 100)) for p in percents}


def save_adapter(model: PeftModel, folder: Path) -> None:
    state = lora_state_dict(model)  # gathered on every process under FSDP, before the main process writes
    with atomic_dir(folder) as staging:
        model.save_pretrained(str(staging), state_dict=state)


def run_stage1(
    model: torch.nn.Module,
    layers: Sequence[Layer],
    train_examples: list[Example],
    lora: LoraSettings,
    cfg: Stage1Config,
    seed: int,
    pad_id: int,
    device: torch.device,
    out_dir: Path,
    checkpoint_every: int = 0,
    compile_model: bool = False,
) -> tuple[PeftModel, Stage1Result]:
    """Train LoRA on `layers` and return the PEFT model with its result; artifacts go under `out_dir`.

    With `checkpoint_every` > 0 the stage saves `out_dir/checkpoint.pt` every that many steps and, when such a
    checkpoint exists, continues from it: the result equals an uninterrupted run's.
    """
    torch.manual_seed(seed)
    peft_model = attach_lora(model, layers, lora)  # type: ignore[arg-type]
    peft_model.train()
    shard_if_enabled(peft_model)  # before the optimizer exists: it must hold the sharded parameters
    if compile_model:
        compile_blocks(peft_model)
    params = lora_parameters(peft_model, layers)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to 0 at the step cap
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    factors = lora_factors(peft_model, layers)
    previous = snapshot(factors)
    milestone_at: dict[int, list[int]] = {}  # a list: with few steps two percentages can fall on one step
    for percent, at_step in milestone_steps(cfg.max_steps, cfg.milestones).items():
        milestone_at.setdefault(at_step, []).append(percent)
    milestones: dict[int, Path] = {}
    trace: list[dict[str, float]] = []
    losses: list[float] = []
    below = {"update": 0, "loss": 0}
    stopped_by = ["step cap"]
    checkpoint_path = out_dir / "checkpoint.pt"
    start, stopped = 0, False
    state = load_checkpoint(checkpoint_path) if checkpoint_every > 0 else None
    if state is not None:
        with torch.no_grad():
            for param, saved in zip(params, state["params"], strict=True):
                copy_full_into(param, saved)
        load_optimizer_state(peft_model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        previous = [LoraFactors(a, b, f.scaling) for (a, b), f in zip(state["previous"], factors, strict=True)]
        losses += state["losses"]
        trace += state["trace"]
        below.update(state["below"])
        milestones.update({int(p): out_dir / f"milestone-{p}" for p in state["milestones"]})
        start, stopped = int(state["step"]), bool(state["stopped"])
        stopped_by[0] = str(state["stopped_by"])
        restore_rng(state["rng"])
        log.info("stage 1: resuming from the checkpoint at step %d", start)

    def after_step(step: int, loss: float) -> bool:
        losses.append(loss)
        stop = _check(step)
        if checkpoint_every > 0 and (step % checkpoint_every == 0 or stop):
            save_checkpoint(
                checkpoint_path,
                {
                    "step": step,
                    "stopped": stop,
                    "stopped_by": stopped_by[0],
                    "params": [full(p).detach().cpu().clone() for p in params],
                    "optimizer": optimizer_state(peft_model, optimizer),
                    "scheduler": scheduler.state_dict(),
                    "previous": [(f.a, f.b) for f in previous],
                    "losses": list(losses),
                    "trace": trace,
                    "below": dict(below),
                    "milestones": sorted(milestones),
                    "rng": rng_state(),
                },
            )
        return stop

    def _check(step: int) -> bool:
        nonlocal previous
        for percent in milestone_at.get(step, []):
            milestones[percent] = out_dir / f"milestone-{percent}"
            save_adapter(peft_model, milestones[percent])
        if step % cfg.window:
            return False
        now_sq = sum(update_sq_norms(factors))
        change_sq = sum(change_sq_norms(factors, previous))
        previous = snapshot(factors)
        r_t = math.sqrt(change_sq / now_sq) if now_sq > 0 else float("inf")
        w = cfg.window
        recent = sum(losses[-w:]) / len(losses[-w:])
        before = losses[-2 * w : -w]
        plateau = (
            abs(recent - sum(before) / len(before)) / max(abs(sum(before) / len(before)), 1e-12)
            if before
            else float("inf")
        )
        below["update"] = below["update"] + 1 if r_t < cfg.epsilon else 0
        below["loss"] = below["loss"] + 1 if plateau < cfg.plateau_tolerance else 0
        trace.append(
            {
                "step": step,
                "r_t": r_t,
                "loss_plateau": plateau,
                "window_loss": recent,
                "update_norm": math.sqrt(now_sq),
                "lr": float(scheduler.get_last_lr()[0]),
            }
        )
        log.info(
            "stage 1 step %d: r_t=%.4f (epsilon %.3g), loss plateau %.4f, window loss %.4f",
            step,
            r_t,
            cfg.epsilon,
            plateau,
            recent,
        )
        update_stable = below["update"] >= cfg.patience
        loss_stable = below["loss"] >= cfg.patience
        stop = {"update": update_stable, "loss": loss_stable, "either": update_stable or loss_stable, "steps": False}[
            cfg.stop_rule
        ]
        if stop:
            stopped_by[0] = "epsilon" if update_stable else "plateau"
        return stop

    loop = train(
        stage="stage 1 (LoRA)",
        params=params,
        batches=batch_stream(train_examples, cfg.batch_size, pad_id, seed, skip=start),
        loss_fn=lambda batch: sft_loss(peft_model, batch),
        optimizer=optimizer,
        scheduler=scheduler,
        max_steps=start if stopped else cfg.max_steps,
        device=device,
        grad_clip=cfg.grad_clip,
        after_step=after_step,
        start_step=start,
    )
    if start:  # times and tokens/s cover this process's steps; the loss history covers the whole stage
        loop.losses = losses[:]
        loop.steps_run = max(loop.steps_run, start)
    adapter_dir = out_dir / "adapter"
    save_adapter(peft_model, adapter_dir)
    write_csv(out_dir / "trace.csv", trace)
    # after a resume, step times exist only for the steps this process ran
    seconds: list[float | None] = [None] * (len(loop.losses) - len(loop.step_seconds)) + list(loop.step_seconds)
    write_csv(
        out_dir / "losses.csv",
        [{"step": i + 1, "loss": v, "seconds": t} for i, (v, t) in enumerate(zip(loop.losses, seconds, strict=True))],
    )
    return peft_model, Stage1Result(adapter_dir, milestones, stopped_by[0], loop, trace)
