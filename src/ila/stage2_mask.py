"""Stage 2: learn one importance score per layer with θ0 and the Stage-1 LoRA factors frozen.

γ_i = σ(s_i) scales layer i's LoRA branch, so the model is θ0 + γ ⊙ Δθ. Only the scores train (Adam), dropout is
off, and sparsity comes from a penalty λ·mean(γ) (default), a hard budget Σγ ≤ H enforced by projection after
every step, or a straight-through top-H mask. The ranking is the layers sorted by score, highest first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ila.checkpoints import load_checkpoint, restore_rng, rng_state, save_checkpoint
from ila.config import Stage2Config
from ila.layers import Layer
from ila.lora_adapters import LayerMask
from ila.sft_data import Example, batch_stream
from ila.training_loop import LoopResult, sft_loss, train

log = logging.getLogger(__name__)


@dataclass
class Stage2Result:
    scores: list[float]
    gammas: list[float]
    loop: LoopResult
    trace: list[dict[str, float]]  # per step: loss, mean gamma, spread of gamma


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
    """Learn the scores; the model's own parameters are frozen and left bit-identical.

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
    scores = nn.Parameter(torch.full((n,), cfg.init_score, device=device))
    optimizer = torch.optim.Adam([scores], lr=cfg.lr)
    trace: list[dict[str, float]] = []
    state = load_checkpoint(checkpoint) if checkpoint is not None and checkpoint_every > 0 else None
    start = 0
    if state is not None:
        with torch.no_grad():
            scores.copy_(state["scores"].to(device))
        optimizer.load_state_dict(state["optimizer"])
        trace += state["trace"]
        start = int(state["step"])
        restore_rng(state["rng"])
        log.info("stage 2: resuming from the checkpoint at step %d", start)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        gamma = torch.sigmoid(scores)
        mask.values = straight_through_topk(gamma, budget_layers) if cfg.sparsity == "topk" else gamma
        loss = sft_loss(peft_model, batch)  # type: ignore[arg-type]
        if cfg.sparsity == "penalty":
            return loss + cfg.penalty * gamma.mean()
        return loss

    def after_step(step: int, loss: float) -> bool:
        if cfg.sparsity == "budget":
            with torch.no_grad():
                project_to_budget(scores.data, float(budget_layers))
        gamma = torch.sigmoid(scores.detach())
        trace.append(
            {
                "step": step,
                "loss": loss,
                "mean_gamma": float(gamma.mean()),
                "std_gamma": float(gamma.std()),
                "min_gamma": float(gamma.min()),
                "max_gamma": float(gamma.max()),
            }
        )
        if checkpoint is not None and checkpoint_every > 0 and (step % checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(
                checkpoint,
                {
                    "step": step,
                    "scores": scores.detach().cpu().clone(),
                    "optimizer": optimizer.state_dict(),
                    "trace": trace,
                    "rng": rng_state(),
                },
            )
        return False

    mask = LayerMask(peft_model, layers)
    try:
        loop = train(
            stage="stage 2 (mask)",
            params=[scores],
            batches=batch_stream(train_examples, cfg.batch_size, pad_id, seed + 1, skip=start),
            loss_fn=loss_fn,  # type: ignore[arg-type]
            optimizer=optimizer,
            max_steps=cfg.steps,
            device=device,
            after_step=after_step,
            start_step=start,
        )
    finally:
        mask.remove()
        for p in frozen:
            p.requires_grad_(True)
    final = scores.detach().float().cpu()
    last = trace[-1] if trace else {}
    log.info(
        "stage 2 done: mean gamma %.3f (std %.3f, min %.3f, max %.3f)",
        last.get("mean_gamma", 0),
        last.get("std_gamma", 0),
        last.get("min_gamma", 0),
        last.get("max_gamma", 0),
    )
    return Stage2Result(final.tolist(), torch.sigmoid(final).tolist(), loop, trace)
