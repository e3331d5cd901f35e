"""Plots of rankings: the blocks x module-types heatmap of an ILA run (matplotlib, written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: ila never opens a window
import matplotlib.pyplot as plt
import numpy as np

from ila.ranking import Ranking
from ila.run_folder import atomic_write_bytes


def save_figure(fig: matplotlib.figure.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_heatmap(ranking: Ranking, path: Path, value: str = "gamma", top_fraction: float = 0.3) -> None:
    """Heatmap of γ (or score) per block (rows) and module type (columns); top-K cells are outlined."""
    seen = list(dict.fromkeys(e.module_type for e in ranking.layers if e.block >= 0))
    model_order = [t for t in ranking.info.get("module_types", []) if t in seen]  # columns in the model's order
    types = model_order + [t for t in seen if t not in model_order]
    blocks = sorted({e.block for e in ranking.layers if e.block >= 0})
    grid = np.full((len(blocks), len(types)), np.nan)
    top = set(ranking.top_fraction(top_fraction))
    outlined = []
    for entry in ranking.layers:
        if entry.block < 0:
            continue
        row, col = blocks.index(entry.block), types.index(entry.module_type)
        shown = entry.gamma if value == "gamma" and entry.gamma is not None else entry.score
        grid[row, col] = shown
        if entry.name in top:
            outlined.append((row, col))
    fig, ax = plt.subplots(figsize=(1.1 * len(types) + 2.5, 0.22 * len(blocks) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for row, col in outlined:
        ax.add_patch(matplotlib.patches.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    short = [t.split(".")[-1] for t in types]  # "q_proj" unless two types share it (GPT-2's c_proj)
    ax.set_xticks(
        range(len(types)),
        [s if short.count(s) == 1 else t for s, t in zip(short, types, strict=True)],
        rotation=45,
        ha="right",
    )
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_ylabel("block")
    label = "γ = σ(score)" if value == "gamma" else "score"
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(f"{ranking.method}: layer importance (red: top {top_fraction:.0%})")
    save_figure(fig, path)
