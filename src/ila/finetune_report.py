"""The run folder's report of `ila finetune`: its result, the loss curves and report.md."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ila.config import FinetuneConfig
from ila.run_folder import atomic_write_text
from ila.selection import Selection
from ila.sft_data import SftData
from ila.trainable import CHANGED_WEIGHTS
from ila.training_loop import LoopResult


@dataclass
class FinetuneResult:
    run_dir: Path
    model: nn.Module  # the trained model (a PEFT model for lora, adalora and qlora)
    selection: Selection
    loop: LoopResult
    heldout: list[dict[str, float]]  # {"step", "loss"}; step 0 is the base model
    trainable_params: int
    trainable_names: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)


def plot_loss_curves(
    train_losses: Sequence[float], heldout: Sequence[dict[str, float]], path: Path, title: str
) -> None:
    """Train loss per step and held-out loss at each evaluation, in one PNG."""
    import matplotlib.pyplot as plt

    from ila.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(train_losses) + 1), train_losses, lw=1, alpha=0.8, label="train (batch)")
    ax.plot([row["step"] for row in heldout], [row["loss"] for row in heldout], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("SFT loss (assistant tokens)")
    ax.set_title(title[:90])
    ax.legend()
    save_figure(fig, path)


def write_finetune_report(
    path: Path, cfg: FinetuneConfig, result: FinetuneResult, data: SftData, artifacts: dict[str, str]
) -> None:
    loop, selection = result.loop, result.selection
    times = loop.step_seconds
    base, final = result.heldout[0]["loss"], result.heldout[-1]["loss"]
    lines = [
        f"# Selective fine-tuning: {cfg.finetune.method} on {cfg.model.name}",
        "",
        f"- Selection: {selection.description} (ranking method `{selection.ranking_method}`"
        + (f", `{selection.ranking_path}`" if selection.ranking_path else "")
        + ")",
        f"- Lowest selected block: {selection.lowest_block} of {selection.n_blocks}; the backward pass runs "
        f"through {selection.backward_blocks} blocks (the depth cost)",
        f"- Trainable parameters: {result.trainable_params:,} in {len(result.trainable_names)} tensors",
        f"- Data: `{data.stats.source}` ({data.stats.train_examples} train, {data.stats.eval_examples} held out; "
        f"sha256 `{data.stats.fingerprint[:16]}`); {data.stats.truncated} truncated, "
        f"{data.stats.dropped_too_long} dropped as too long",
        f"- Training: {loop.steps_run} steps of batch {cfg.finetune.batch_size}, lr {cfg.finetune.learning_rate:g}; "
        f"train loss {loop.losses[0]:.3f} -> {loop.losses[-1]:.3f}; median step "
        f"{statistics.median(times) if times else float('nan'):.3f} s, {loop.tokens_per_second:.0f} tokens/s",
        f"- Held-out loss: base {base:.4f} -> {final:.4f} (evaluated every {cfg.finetune.eval_every} steps and at "
        "the end; `heldout.csv`, `loss_curves.png`)",
        "- Peak memory: " + ", ".join(f"{k} {v:.2f}" for k, v in result.memory.items()),
        "",
        "## Where the time went",
        "",
        "| part | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in result.timings.items()]
    lines += ["", "## Files", ""]
    if "adapter" in artifacts:
        lines.append("- `adapter/`: the PEFT adapter; load it with `PeftModel.from_pretrained(base_model, 'adapter')`")
    else:
        lines.append(f"- `{CHANGED_WEIGHTS}`: only the trained weight matrices; `APPLY.md` says how to load them")
        if "model" in artifacts:
            lines.append("- `model/`: the whole fine-tuned model (save_pretrained)")
    lines += ["- `selection.json`, `config.yaml`, `manifest.json`, `losses.csv`, `heldout.csv`, `loss_curves.png`", ""]
    atomic_write_text(path, "\n".join(lines))
