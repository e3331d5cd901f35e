"""Stage 2: learn one importance score per layer with θ0 and the Stage-1 LoRA factors frozen.

γ_i = σ(s_i) scales layer i's LoRA branch, so the model is θ0 + γ ⊙ Δθ. Only the scores train, dropout is off,
and sparsity comes from a penalty λ·mean(γ) (default; λ may be scaled to the measured Stage-1 loss gain), a hard
budget Σγ ≤ H enforced by projection after every step, or a straight-through top-H mask. Every `check_every`
steps the top-K set is compared with the previous check; the stage stops when it has stopped changing. The
ranking is the layers sorted by score (averaged over the last checks), highest first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ila.checkpoints import load_checkpoint, restore_rng, rng_state, save_checkpoint
from ila.compare import jaccard
from ila.config import Stage2Config
from ila.errors import reading
from ila.layers import Layer
from ila.lora_adapters import LayerMask
from ila.sft_data import Batch, Example, batch_stream
from ila.training_loop import LoopResult, sft_loss, train

log = logging.getLogger(__name__)

GAIN_BATCHES = 4  # batches on which the Stage-1 gain L(γ=0) − L(γ=1) is measured for penalty_scale=gain


@dataclass
class Stage2Result:
    scores: list[float]  # averaged over the last `average_checks` checks
    gammas: list[float]
    loop: LoopResult
    trace: list[dict[str, float | None]]  # per step: loss, mean/spread of γ; at checks the top-K Jaccard
    converged_at: int | None = None  # the step where the top-K set was stable for stop_patience checks
    penalty: float = 0.0  # the λ actually used (after scaling to the gain)
    gain: float | None = None  # the measured Stage-1 gain on training batches, for penalty_scale=gain
    seed: int = 0  # the batch-order seed
    checks: list[list[float]] = field(default_factory=list)  # the averaged score vectors


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam whose second moment is one number shared by every score.

    Per-score Adam moves each score by about lr per step in the sign of its gradient whatever the gradient's
    size, so layers with noisy gradients fall fastest. Sharing the scale keeps the step proportional to each
    layer's gradient (like SGD with momentum) while the learning rate stays free of the loss's units.
    """

    def __init__(
        self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            grads = [p for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            mean_sq = torch.stack([p.grad.float().pow(2).mean() for p in grads]).mean()
            for p in grads:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((), device=p.device)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_(mean_sq, alpha=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
                v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))


def make_optimizer(scores: nn.Parameter, cfg: Stage2Config) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam-shared":
        return SharedScaleAdam([scores], lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([scores], lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam([scores], lr=cfg.lr)


def project_to_budget(scores: torch.Tensor, budget: float) -> None:
    """Shift all scores by one τ so that Σσ(s − τ) ≤ budget (in place); bisection on τ, exact to 1e-6."""
    if float(torch.sigmoid(scores).sum()) <= budget:
        return
    low, high = 0.0, 1.0
    while float(torch.sigmoid(scores - high).sum()) > budget:
        high *= 2.0
    for _ in range(60):
        mid = (low + high) / 2
        if float(torch.sigmoid(scores - mid).sum()) > budget:
            low = mid
        else:
            high = mid
    scores.sub_(high)


def straight_through_topk(gamma: torch.Tensor, k: int) -> torch.Tensor:
    """Hard top-k mask in the forward pass, the sigmoid's gradient in the backward pass."""
    hard = torch.zeros_like(gamma)
    hard[torch.topk(gamma.detach(), k).indices] = 1.0
    return hard + gamma - gamma.detach()


def top_set(scores: Sequence[float], k: int) -> frozenset[int]:
    """Indices of the k highest scores; ties broken by position, as the ranking breaks them."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return frozenset(order[:k])


@torch.no_grad()
def measure_gain(
    peft_model: nn.Module, mask: LayerMask, n: int, batches: Sequence[Batch], device: torch.device
) -> float:
    """Mean training loss with no layer's update minus with every layer's update: what Stage 1 gained."""
    total = 0.0
    for batch in batches:
        batch = batch.to(device)
        mask.values = torch.zeros(n, device=device)
        without = float(sft_loss(peft_model, batch))
        mask.values = torch.ones(n, device=device)
        total += without - float(sft_loss(peft_model, batch))
    mask.values = None
    return total / max(len(batches), 1)


def run_stage2(
    peft_model: nn.Module,
    layers: Sequence[Layer],
    train_examples: list[Example],
    cfg: Stage2Config,
    seed: int,
    pad_id: int,
    device: torch.device,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
) -> Stage2Result:
    """Learn the scores with batch order `seed`; the model's own parameters are frozen and left bit-identical.

    With a `checkpoint` path and `checkpoint_every` > 0 the scores, optimizer and trace are saved every that many
    steps, and an existing checkpoint is continued from.
    """
    torch.manual_seed(seed)
    frozen = [p for p in peft_model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # no weight gradients: only the scores train
    peft_model.eval()  # dropout off: the mask is learned on the deterministic Stage-1 model
    n = len(layers)
    budget_layers = max(1, round(cfg.budget * n))
    watch_k = max(1, round(cfg.stop_fraction * n))
    scores = nn.Parameter(torch.full((n,), cfg.init_score, device=device))
    optimizer = make_optimizer(scores, cfg)
    trace: list[dict[str, float | None]] = []
    checks: list[list[float]] = []  # score vectors at the checks, for the stop rule and the average
    stable = [0]
    converged: list[int | None] = [None]
    mask = LayerMask(peft_model, layers)
    state = load_checkpoint(checkpoint) if checkpoint is not None and checkpoint_every > 0 else None
    start = 0
    gain: float | None = None
    if state is not None:
        with reading(str(checkpoint), "a Stage-2 checkpoint of this run (delete it to restart the stage)"):
            with torch.no_grad():
                scores.copy_(state["scores"].to(device))
            optimizer.load_state_dict(state["optimizer"])
            trace += state["trace"]
            checks += state["checks"]
            stable[0], converged[0], gain = int(state["stable"]), state["converged"], state["gain"]
            start = int(state["step"])
            restore_rng(state["rng"])
        log.info("stage 2: resuming from the checkpoint at step %d", start)
    elif cfg.sparsity == "penalty" and cfg.penalty_scale == "gain":
        stream = batch_stream(train_examples, cfg.batch_size, pad_id, seed + 7919)
        gain = measure_gain(peft_model, mask, n, [next(stream) for _ in range(GAIN_BATCHES)], device)
        if gain <= 0:
            log.warning("stage 2: the Stage-1 update does not lower the training loss (gain %.4g)", gain)
    penalty = cfg.penalty * max(gain, 1e-6) if gain is not None else cfg.penalty

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        gamma = torch.sigmoid(scores)
        mask.values = straight_through_topk(gamma, budget_layers) if cfg.sparsity == "topk" else gamma
        loss = sft_loss(peft_model, batch)  # type: ignore[arg-type]
        if cfg.sparsity == "penalty":
            return loss + penalty * gamma.mean()
        return loss

    def after_step(step: int, loss: float) -> bool:
        if cfg.sparsity == "budget":
            with torch.no_grad():
                project_to_budget(scores.data, float(budget_layers))
        gamma = torch.sigmoid(scores.detach())
        row = {
            "step": step,
            "loss": loss,
            "mean_gamma": float(gamma.mean()),
            "std_gamma": float(gamma.std()),
            "min_gamma": float(gamma.min()),
            "max_gamma": float(gamma.max()),
            "topk_jaccard": None,  # filled in at the checks
        }
        stop = False
        if step % cfg.check_every == 0 or step == cfg.steps:
            now = scores.detach().float().cpu().tolist()
            if checks:
                agreement = jaccard(top_set(checks[-1], watch_k), top_set(now, watch_k))
                row["topk_jaccard"] = agreement
                stable[0] = stable[0] + 1 if agreement >= cfg.stop_jaccard else 0
                if cfg.stop_patience and stable[0] >= cfg.stop_patience and converged[0] is None:
                    converged[0] = step
                    stop = True
            checks.append(now)
            del checks[: -max(cfg.average_checks, 2)]
        trace.append(row)
        if checkpoint is not None and checkpoint_every > 0 and (step % checkpoint_every == 0 or stop):
            save_checkpoint(
                checkpoint,
                {
                    "step": step,
                    "scores": scores.detach().cpu().clone(),
                    "optimizer": optimizer.state_dict(),
                    "trace": trace,
                    "checks": checks,
                    "stable": stable[0],
                    "converged": converged[0],
                    "gain": gain,
                    "rng": rng_state(),
                },
            )
        return stop

    try:
        loop = train(
            stage="stage 2 (mask)",
            params=[scores],
            batches=batch_stream(train_examples, cfg.batch_size, pad_id, seed, skip=start * cfg.accumulation),
            loss_fn=loss_fn,  # type: ignore[arg-type]
            optimizer=optimizer,
            max_steps=start if converged[0] is not None else cfg.steps,
            device=device,
            after_step=after_step,
            start_step=start,
            accumulation=cfg.accumulation,
        )
    finally:
        mask.remove()
        for p in frozen:
            p.requires_grad_(True)
    averaged = checks[-cfg.average_checks :] or [scores.detach().float().cpu().tolist()]
    final = [sum(values) / len(averaged) for values in zip(*averaged, strict=True)]
    last = trace[-1] if trace else {}
    log.info(
        "stage 2 done after %d steps (%s): mean gamma %.3f (std %.3f, min %.3f, max %.3f)",
        loop.steps_run,
        f"top-{watch_k} stable from step {converged[0]}" if converged[0] else "step cap",
        last.get("mean_gamma", 0),
        last.get("std_gamma", 0),
        last.get("min_gamma", 0),
        last.get("max_gamma", 0),
    )
    gammas = [1.0 / (1.0 + math.exp(-s)) for s in final]
    return Stage2Result(final, gammas, loop, trace, converged[0], penalty, gain, seed, averaged)
