"""Stage 1: LoRA on every linear layer of every block, trained until the update is ε-stable.

Reads the base model, the layers and the SFT data; writes `stage1/adapter` (PEFT format), one adapter per
milestone (`stage1/milestone-25` ...: that share of the steps Stage 1 ran), and `stage1/trace.csv` with the
stability statistics of every check.

ε-stability (see docs/method.md): every `window` steps r_t = |Δθ_t − Δθ_{t−w}|_F / |Δθ_t|_F over all adapted
layers; stable after `patience` consecutive checks with r_t < ε. The learning rate is constant after warm-up, so
r_t falls only when the update settles; the loss-plateau statistic and the update's change of direction are
logged beside it. The epoch budget and the step cap are the limits when the rule does not fire.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel

from ila import distributed
from ila.checkpoints import load_checkpoint, restore_rng, rng_state, save_checkpoint
from ila.config import LoraShapeConfig, Stage1Config
from ila.distributed import full
from ila.errors import reading
from ila.fsdp import copy_full_into, load_optimizer_state, lora_state_dict, optimizer_state, shard_if_enabled
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
from ila.training_loop import LoopResult, compile_blocks, sft_loss, train, warmup_then

log = logging.getLogger(__name__)


@dataclass
class Stage1Result:
    adapter_dir: Path
    milestones: dict[int, Path]  # percent -> adapter folder
    stopped_by: str  # "epsilon", "plateau", "step cap", "epoch budget"
    loop: LoopResult
    trace: list[dict[str, float]] = field(default_factory=list)  # one row per stability check
    planned_steps: int = 0  # the budget: epochs in steps, at most the step cap
    fired_at: int | None = None  # the step where the stop rule fired; None when a limit stopped the stage

    @property
    def steps(self) -> int:
        return self.loop.steps_run


def milestone_steps(steps_run: int, window: int, percents: Sequence[int]) -> dict[int, int]:
    """For each milestone percentage of the steps Stage 1 ran, the stability check nearest to it (100: the end).

    Adapters are kept at every check because the stop step is known only when the rule fires.
    """
    out = {}
    for p in percents:
        target = steps_run * p / 100
        out[p] = steps_run if p == 100 else min(steps_run, max(window, window * round(target / window)))
    return out


def profile_change(now_sq: Sequence[float], before_sq: Sequence[float]) -> float:
    """|p_t − p_{t−w}|_2 for the unit vectors p of per-layer update sizes |Δθ_i|_F: how far the layers' shares
    of the update moved, whatever the update's total size (0 when every layer grew by the same factor)."""
    now = [math.sqrt(v) for v in now_sq]
    before = [math.sqrt(v) for v in before_sq]
    now_norm, before_norm = math.sqrt(sum(now_sq)), math.sqrt(sum(before_sq))
    if now_norm == 0 or before_norm == 0:
        return float("inf")
    return math.sqrt(sum((a / now_norm - b / before_norm) ** 2 for a, b in zip(now, before, strict=True)))


def lr_factor(step: int, cfg: Stage1Config, planned: int) -> float:
    """Linear warm-up, then constant (the ε rule is watched at a fixed step size) or linear decay to 0."""
    return warmup_then(step, cfg.warmup_steps, planned, decay=cfg.lr_schedule == "linear")


def save_adapter(model: PeftModel, folder: Path) -> None:
    state = lora_state_dict(model)  # gathered on every process under FSDP, before the main process writes
    with atomic_dir(folder) as staging:
        model.save_pretrained(str(staging), state_dict=state)


def run_stage1(
    model: torch.nn.Module,
    layers: Sequence[Layer],
    train_examples: list[Example],
    lora: LoraShapeConfig,
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
    planned = cfg.planned_steps(len(train_examples))
    limit = "step cap" if planned == cfg.max_steps else "epoch budget"
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, planned))
    factors = lora_factors(peft_model, layers)
    previous = snapshot(factors)
    previous_sq = update_sq_norms(previous)
    checks_dir = out_dir / "checks"  # the adapter at every check, until the milestones are known
    trace: list[dict[str, float]] = []
    losses: list[float] = []
    below = {"profile": 0, "update": 0, "loss": 0}
    stopped_by = [limit]
    checkpoint_path = out_dir / "checkpoint.pt"
    start, stopped = 0, False
    state = load_checkpoint(checkpoint_path) if checkpoint_every > 0 else None
    if state is not None:
        with reading(checkpoint_path, "a Stage-1 checkpoint of this run (delete it to restart the stage)"):
            with torch.no_grad():
                for param, saved in zip(params, state["params"], strict=True):
                    copy_full_into(param, saved)
            load_optimizer_state(peft_model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            previous = [LoraFactors(a, b, f.scaling) for (a, b), f in zip(state["previous"], factors, strict=True)]
            previous_sq[:] = update_sq_norms(previous)
            losses += state["losses"]
            trace += state["trace"]
            below.update(state["below"])
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
                    "rng": rng_state(),
                },
            )
        return stop

    def _check(step: int) -> bool:
        nonlocal previous
        if step % cfg.window:
            return False
        if cfg.milestones:
            save_adapter(peft_model, checks_dir / f"step-{step}")
            _prune_checks(checks_dir, step, cfg)
        layer_sq = update_sq_norms(factors)
        now_sq, before_sq = sum(layer_sq), sum(previous_sq)
        change_sq = sum(change_sq_norms(factors, previous))
        previous = snapshot(factors)
        r_t = math.sqrt(change_sq / now_sq) if now_sq > 0 else float("inf")
        # the angle-free part of r_t: how far the update's direction moved (0 = pure growth along one direction)
        cosine = (now_sq + before_sq - change_sq) / (2 * math.sqrt(now_sq * before_sq)) if now_sq * before_sq else 0
        direction = math.sqrt(max(0.0, 2.0 - 2.0 * cosine))
        profile = profile_change(layer_sq, previous_sq)
        previous_sq[:] = layer_sq
        w = cfg.window
        recent = sum(losses[-w:]) / len(losses[-w:])
        before = losses[-2 * w : -w]
        plateau = (
            abs(recent - sum(before) / len(before)) / max(abs(sum(before) / len(before)), 1e-12)
            if before
            else float("inf")
        )
        below["profile"] = below["profile"] + 1 if profile < cfg.epsilon else 0
        below["update"] = below["update"] + 1 if r_t < cfg.epsilon else 0
        below["loss"] = below["loss"] + 1 if plateau < cfg.plateau_tolerance else 0
        trace.append(
            {
                "step": step,
                "r_t": r_t,
                "direction_change": direction,
                "profile_change": profile,
                "loss_plateau": plateau,
                "window_loss": recent,
                "update_norm": math.sqrt(now_sq),
                "lr": float(scheduler.get_last_lr()[0]),
            }
        )
        log.info(
            "stage 1 step %d: profile change %.4f, r_t %.4f (epsilon %.3g), loss plateau %.4f, window loss %.4f",
            step,
            profile,
            r_t,
            cfg.epsilon,
            plateau,
            recent,
        )
        stable = {rule: below[rule] >= cfg.patience for rule in below}
        watched = {"profile": stable["profile"], "update": stable["update"], "loss": stable["loss"]}
        watched["either"] = stable["profile"] or stable["loss"]
        watched["steps"] = False
        stop = watched[cfg.stop_rule]
        if stop:
            fired = {"profile": "epsilon", "update": "epsilon", "loss": "plateau"}
            stopped_by[0] = fired.get(cfg.stop_rule, "epsilon" if stable["profile"] else "plateau")
        return stop

    loop = train(
        stage="stage 1 (LoRA)",
        params=params,
        batches=batch_stream(train_examples, cfg.batch_size, pad_id, seed, skip=start),
        loss_fn=lambda batch: sft_loss(peft_model, batch),
        optimizer=optimizer,
        scheduler=scheduler,
        max_steps=start if stopped else planned,
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
    milestones = _keep_milestones(out_dir, checks_dir, adapter_dir, loop.steps_run, cfg)
    write_csv(out_dir / "trace.csv", trace)
    # after a resume, step times exist only for the steps this process ran
    seconds: list[float | None] = [None] * (len(loop.losses) - len(loop.step_seconds)) + list(loop.step_seconds)
    write_csv(
        out_dir / "losses.csv",
        [{"step": i + 1, "loss": v, "seconds": t} for i, (v, t) in enumerate(zip(loop.losses, seconds, strict=True))],
    )
    fired_at = loop.steps_run if stopped_by[0] in ("epsilon", "plateau") else None
    log.info("stage 1: %d of %d planned steps, stopped by %s", loop.steps_run, planned, stopped_by[0])
    return peft_model, Stage1Result(adapter_dir, milestones, stopped_by[0], loop, trace, planned, fired_at)


def _prune_checks(checks_dir: Path, step: int, cfg: Stage1Config) -> None:
    """Drop check adapters that can no longer become a milestone: the stop step is at least `step`, so the
    smallest milestone lies at or after min(milestones)% of it."""
    if not distributed.is_main():
        return
    earliest = min(cfg.milestones) / 100 * step - cfg.window
    for folder in checks_dir.glob("step-*"):
        if int(folder.name.removeprefix("step-")) < earliest:
            shutil.rmtree(folder, ignore_errors=True)


def _keep_milestones(
    out_dir: Path, checks_dir: Path, adapter_dir: Path, steps_run: int, cfg: Stage1Config
) -> dict[int, Path]:
    """Turn the check adapters nearest to each milestone into `milestone-P` folders; drop the rest."""
    milestones: dict[int, Path] = {}
    for percent, at_step in milestone_steps(steps_run, cfg.window, cfg.milestones).items():
        source = adapter_dir if at_step == steps_run else checks_dir / f"step-{at_step}"
        target = out_dir / f"milestone-{percent}"
        if distributed.is_main():
            if not (source / "adapter_config.json").is_file():
                log.warning("stage 1: no adapter was kept at step %d; milestone %d%% is skipped", at_step, percent)
                continue
            with atomic_dir(target) as staging:
                shutil.copytree(source, staging, dirs_exist_ok=True)
        milestones[percent] = target
    if distributed.is_main():
        shutil.rmtree(checks_dir, ignore_errors=True)
    return milestones
