"""The one training loop, shared by every stage that trains (Stage 1 LoRA, Stage 2 mask scores).

Stages differ only in which parameters train, the loss and the stop rule, so they pass those in: `loss_fn`
computes a batch's loss, `after_step` checks stability, saves milestones and may stop the run. Also home of
the SFT loss, computed on assistant tokens only.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ila import distributed, fsdp, tracking
from ila.errors import IlaError, NonFiniteLossError
from ila.lora_adapters import unwrap
from ila.sft_data import IGNORE_INDEX, Batch

log = logging.getLogger(__name__)


def sft_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over assistant tokens.

    The output head runs only on positions that carry a label: on a 49k-token vocabulary that skips most of the
    head's cost for prompt and padding tokens. Models that post-process logits (soft-capping, logit scale) take
    the plain path through the full forward, and so do FSDP runs: the root module's hooks gather the embeddings
    and the head only when the whole model runs.
    """
    lm = unwrap(model)
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    config = getattr(lm, "config", None)
    plain = getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None  # type: ignore[operator]
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None  # type: ignore[operator]
    if plain or distributed.fsdp_enabled() or head is None or decoder is None or decoder is lm:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), targets[keep])
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


@dataclass
class LoopResult:
    steps_run: int
    stopped_early: bool
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    tokens: int = 0  # real (non-padding) tokens processed
    padded_tokens: int = 0  # tokens including padding

    @property
    def tokens_per_second(self) -> float:
        total = sum(self.step_seconds)
        return self.tokens / total if total > 0 else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


def train(
    *,
    stage: str,
    params: Sequence[nn.Parameter],
    batches: Iterator[Batch],
    loss_fn: Callable[[Batch], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    after_step: Callable[[int, float], bool] | None = None,
    before_zero_grad: Callable[[int], None] | None = None,
    start_step: int = 0,
    accumulation: int = 1,
) -> LoopResult:
    """Run up to `max_steps` optimizer steps; `after_step(step, loss)` returning True stops early.

    With `accumulation` > 1 each step takes that many batches from `batches`; their gradients add up weighted by
    each batch's share of the step's target tokens, so the step is the one a single large batch would give.

    `before_zero_grad(step)` runs after the optimizer step while the gradients still exist (AdaLoRA's
    `update_and_allocate` reads them to score and prune ranks).

    `start_step` resumes a checkpointed run: steps start_step+1 .. max_steps run (the caller restores the
    weights, optimizer, scheduler and RNG state, and fast-forwards `batches`).

    A non-finite loss stops the loop before the optimizer touches the weights and raises `NonFiniteLossError`
    naming the step, so whatever was saved before stays valid.
    """
    world = distributed.world_size()
    sharded = [p for p in params if distributed.is_sharded(p)]  # FSDP reduces these itself
    replicated = [p for p in params if not distributed.is_sharded(p)]
    result = LoopResult(steps_run=0, stopped_early=False)
    bar = tqdm(
        total=max_steps,
        initial=start_step,
        desc=stage,
        unit="step",
        dynamic_ncols=True,
        leave=False,
        disable=None if distributed.is_main() else True,
    )
    try:
        for step in range(start_step + 1, max_steps + 1):
            micro = [next(batches) for _ in range(accumulation)]
            step_targets = max(sum(_targets(b.labels) for b in micro), 1)
            started = time.perf_counter()
            value = 0.0
            for batch in micro:
                weight = _targets(batch.labels) / step_targets if accumulation > 1 else 1.0
                if world > 1:  # this process's rows, weighted by its share of the global batch's target tokens
                    rows = distributed.shard_rows(batch.input_ids.shape[0])
                    weight *= _targets(batch.labels[rows]) / max(_targets(batch.labels), 1)
                    batch = Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows])
                batch = batch.to(device)
                loss = loss_fn(batch)
                if weight != 1.0:
                    loss = loss * weight
                part = distributed.sum_across(float(loss.detach()))
                if not math.isfinite(part):
                    raise NonFiniteLossError(
                        f"{stage}: non-finite loss ({part}) at step {step}; stopped before updating the weights "
                        "(lower the learning rate or check the model weights and data)",
                        step,
                    )
                loss.backward()
                value += part
                result.tokens += batch.real_tokens
                result.padded_tokens += batch.input_ids.numel()
            distributed.sum_gradients(replicated)  # summed shares = the global batch's gradient
            fsdp.sum_sharded_gradients(sharded)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if before_zero_grad is not None:
                before_zero_grad(step)
            optimizer.zero_grad(set_to_none=True)
            result.step_seconds.append(time.perf_counter() - started)
            result.losses.append(value)
            result.steps_run = step
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            tracking.log_step(stage, step, {"loss": value, "lr": float(optimizer.param_groups[0]["lr"])})
            if after_step is not None and after_step(step, value):
                result.stopped_early = step < max_steps
                break
    finally:
        bar.close()
    return result


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (transformers' own implementation).

    Non-reentrant checkpointing: with a frozen base model the block inputs need no requires_grad trick, so the
    one transformers adds (the embeddings' output requires grad) is removed. With it, backward would recompute and
    run through every block, not only those from the lowest trainable layer up (the depth saving of a selection).
    It is active only in train mode, so Stage 2 (eval mode, dropout off) keeps its activations.
    """
    lm = unwrap(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise IlaError(f"run.gradient_checkpointing=true, but {type(lm).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # newer transformers renamed it
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    lm.disable_input_require_grads()  # type: ignore[operator]


def compile_blocks(model: nn.Module) -> None:
    """torch.compile every transformer block in place (regional compilation: one graph reused by all blocks).

    Call it after LoRA is attached and after FSDP sharding, so the compiled graphs see the final modules.
    """
    from ila.layers import find_block_list

    _, blocks = find_block_list(unwrap(model))
    for block in blocks:
        block.compile()
    log.info("torch.compile: %d blocks", len(blocks))


def _targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> float:
    """Token-weighted mean SFT loss over held-out batches, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = tqdm(
        batches, desc="held-out loss", unit="batch", leave=False, disable=None if distributed.is_main() else True
    )
    try:
        for batch in bar:
            batch = batch.to(device)
            n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(sft_loss(model, batch)) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def loop_summary(loop: LoopResult) -> dict[str, Any]:
    """A training loop's figures as a manifest records them."""
    times = loop.step_seconds
    return {
        "steps": loop.steps_run,
        "median_step_s": statistics.median(times) if times else None,
        "tokens_per_s": loop.tokens_per_second,
        "padding_fraction": loop.padding_fraction,
        "first_loss": loop.losses[0] if loop.losses else None,
        "last_loss": loop.losses[-1] if loop.losses else None,
    }


def warmup_then(step: int, warmup: int, total: int, decay: bool = True) -> float:
    """The learning-rate factor at `step`: linear warm-up over `warmup` steps, then linear decay to 0 at `total`
    (or, without `decay`, constant)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup)) if decay else 1.0
