"""report.md of an identify run: what ran, how long, what was cut, the top layers and the held-out losses."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import TYPE_CHECKING

from ila.config import IdentifyConfig
from ila.layers import Layer
from ila.run_folder import atomic_write_text
from ila.sft_data import DataStats

if TYPE_CHECKING:
    from pathlib import Path

    from ila.stages import IdentifyResult


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_identify_report(
    path: Path, cfg: IdentifyConfig, result: IdentifyResult, stats: DataStats, layers: list[Layer]
) -> None:
    ranking, stage1, stage2 = result.ranking, result.stage1, result.stage2
    k = max(1, round(cfg.run.report_top_fraction * len(layers)))
    lines = [
        f"# ILA layer importance: {cfg.model.name}",
        "",
        f"- Data: `{stats.source}` ({stats.rows} rows; formats {dict(stats.format_counts)}; sha256 "
        f"`{stats.fingerprint[:16]}`)",
        f"- Examples: {stats.train_examples} train, {stats.eval_examples} held out; length policy: {stats.policy}; "
        f"**{stats.truncated} truncated, {stats.dropped_too_long} dropped as too long, "
        f"{stats.dropped_no_response} without an answer**",
        f"- Layers scored: {len(layers)} linear layers in {ranking.n_blocks} blocks; seed {cfg.run.seed}",
    ]
    for warning in ranking.info.get("warnings", []):  # first, where nobody can miss it
        lines.insert(2, f"> **Warning: {warning}.**\n")
    if stage1 is not None:
        last = stage1.trace[-1] if stage1.trace else {}
        fired = f"at step {stage1.fired_at}" if stage1.fired_at else f"after {stage1.steps} steps"
        epochs = stage1.steps * cfg.stage1.batch_size / max(stats.train_examples, 1)
        lines += [
            f"- Stage 1 (LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, lr {cfg.stage1.lr}, {cfg.stage1.lr_schedule} "
            f"after {cfg.stage1.warmup_steps} warm-up steps): {stage1.steps} of {stage1.planned_steps} planned steps "
            f"of batch {cfg.stage1.batch_size} ({epochs:.2f} epochs), stopped by **{stage1.stopped_by}** {fired} "
            f"(rule `{cfg.stage1.stop_rule}`, "
            f"ε={cfg.stage1.epsilon}, window {cfg.stage1.window}, patience {cfg.stage1.patience}); last profile change "
            f"{last.get('profile_change', float('nan')):.4f}, r_t {last.get('r_t', float('nan')):.4f}, loss plateau "
            f"{last.get('loss_plateau', float('nan')):.4f}; train loss {stage1.loop.losses[0]:.3f} -> "
            f"{stage1.loop.losses[-1]:.3f}; median step {_median(stage1.loop.step_seconds):.2f} s, "
            f"{stage1.loop.tokens_per_second:.0f} tokens/s, padding {stage1.loop.padding_fraction:.1%}",
            f"- Milestones saved (share of the steps run): "
            f"{', '.join(f'{p}%' for p in sorted(stage1.milestones)) or 'none'}",
        ]
    final = stage2.trace[-1] if stage2.trace else {}
    s2 = cfg.stage2
    penalty = (
        f"penalty λ={stage2.penalty:.4g}"
        + (f" ({s2.penalty} × measured Stage-1 gain {stage2.gain:.4f})" if stage2.gain is not None else "")
        if s2.sparsity == "penalty"
        else f"{s2.sparsity} H={s2.budget:g}"
    )
    converged = (
        f"top {s2.stop_fraction:.0%} set stable (Jaccard ≥ {s2.stop_jaccard}) for {s2.stop_patience} checks at "
        f"step {stage2.converged_at}"
        if stage2.converged_at
        else "step cap"
    )
    lines += [
        f"- Stage 2 ({penalty}, {s2.optimizer} lr {s2.lr}, batch {s2.batch_size}×{s2.accumulation}, init score "
        f"{s2.init_score}): {stage2.loop.steps_run} steps, stopped by {converged}; scores averaged over the last "
        f"{len(stage2.checks) or 1} checks; mean γ {final.get('mean_gamma', float('nan')):.3f} "
        f"(std {final.get('std_gamma', float('nan')):.3f}, range {final.get('min_gamma', float('nan')):.3f}-"
        f"{final.get('max_gamma', float('nan')):.3f}); median step {_median(stage2.loop.step_seconds):.2f} s",
    ]
    repeats = ranking.info.get("repeats")
    if repeats:
        floor = ", ".join(f"top {k}% {v:.3f}" for k, v in repeats["top_overlap"].items())
        varies = repeats.get("varies", "stage 2 batch order")
        lines.append(
            f"- {repeats['n']} runs differing in {varies}; the ranking sorts the mean score. Noise floor "
            f"(mean Jaccard between runs): {floor}. `ranking.csv` gives each layer's rank interval."
        )
        if "stage2_top_overlap" in repeats:
            within = ", ".join(f"top {k}% {v:.3f}" for k, v in repeats["stage2_top_overlap"].items())
            lines.append(f"- Stage-2 floor alone (runs on one Stage 1): {within}.")
        for i, run in enumerate(repeats.get("stage1", [])):
            fired = f"fired at step {run['fired_at']}" if run["fired_at"] else run["stopped_by"]
            lines.append(
                f"- Stage-1 seed {run['seed']} (`stage1{'' if i == 0 else f'-{i}'}/`): {run['steps']} steps, "
                f"{fired}; held-out loss {run['heldout_stage1']:.4f}, top {cfg.run.report_top_fraction:.0%} only "
                f"{run['heldout_top_mask']:.4f}"
            )
    if stage1 is not None and stage1.loop.step_seconds and stage2.loop.step_seconds:
        ratio = _median(stage2.loop.step_seconds) / _median(stage1.loop.step_seconds)
        lines.append(f"- Stage-2 / Stage-1 median step time: {ratio:.2f}")
    lines += ["", "## Held-out loss (assistant tokens)", "", "| model | loss |", "|---|---|"]
    labels = {
        "base": "base model θ0",
        "stage1": "Stage-1 LoRA model θ0 + Δθ",
        "stage1_top_mask": f"θ0 + Δθ on the top {cfg.run.report_top_fraction:.0%} layers only (hard mask)",
        "delta_norm_top_mask": f"θ0 + Δθ on the {cfg.run.report_top_fraction:.0%} largest updates (delta-norm)",
    }
    for key, value in result.heldout.items():
        lines.append(f"| {labels.get(key, key)} | {value:.4f} |")
    if cfg.stage1.repeats > 1:
        lines.append(f"\nThe Stage-1 rows are means over the {cfg.stage1.repeats} Stage-1 seeds, each masked alike.")
    base, full, top = (result.heldout.get(k_) for k_ in ("base", "stage1", "stage1_top_mask"))
    if base is not None and full is not None and top is not None and base - full > 1e-9:
        by_size = result.heldout.get("delta_norm_top_mask")
        lines.append(
            f"\nThe top-{cfg.run.report_top_fraction:.0%} mask keeps {(base - top) / (base - full):.0%} "
            "of the held-out loss reduction of Stage 1"
            + (
                f"; the same share of the largest updates keeps {(base - by_size) / (base - full):.0%}."
                if by_size
                else "."
            )
        )
    elif base is not None and full is not None and base - full <= 1e-9:
        lines.append("\n**Stage 1 did not lower the held-out loss: this ranking carries no information about it.**")
    types = Counter(e.module_type for e in ranking.layers[:k])
    lines += [
        "",
        f"## Top {min(k, 20)} layers",
        "",
        "| rank | layer | block | type | score | γ |",
        "|---|---|---|---|---|---|",
    ]
    for entry in ranking.layers[: min(k, 20)]:
        gamma = f"{entry.gamma:.3f}" if entry.gamma is not None else "-"
        lines.append(
            f"| {entry.rank} | `{entry.name}` | {entry.block} | {entry.module_type} | {entry.score:.3f} | {gamma} |"
        )
    lines += ["", f"Module types in the top {k}: " + ", ".join(f"{t} {n}" for t, n in types.most_common()), ""]
    lines += ["## Where the time went", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in result.timings.items()]
    lines += [
        "",
        "Peak memory: " + ", ".join(f"{k_} {v:.2f}" for k_, v in result.memory.items()),
        "",
        "Files: `ranking.json`, `ranking.csv`, `heatmap.png`, `manifest.json`, `config.yaml`, "
        "`stage1/adapter` (PEFT), `stage1/milestone-*`, `stage1/trace.csv`.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
