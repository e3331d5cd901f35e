"""Run folders side by side (what `ila report` shows): each folder's manifest.json (identify, finetune or evaluate
runs) and eval.json when present, read defensively (a missing key is shown as "-"), as table rows, markdown and a
plot (held-out loss and median step time per run). Measured values show "± stderr" where eval.json has one, and a
mark where a run is within two combined standard errors of the first run: not distinguishable from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ila.errors import IlaError
from ila.manifest import Manifest

MISSING = "-"
CLOSE = "≈"  # marks a value not distinguishable from the first run's
STDERR_LEGEND = (
    f"- **±**: one standard error; **{CLOSE}**: within two combined standard errors of the first run showing that "
    "column (|a-b| < 2·sqrt(sa²+sb²)), so not distinguishable from it (conservative for runs scored on the same "
    "examples)."
)
ILA_MMLU_NOTE = "ila's own MMLU prompt, not lm-eval's mmlu task"  # for eval.json files written before labels


@dataclass
class RunSummary:
    """What one run folder says about itself; None where its files do not say it."""

    name: str
    path: str
    kind: str  # identify (a milestone too) | finetune | rank | evaluate | report | unknown
    status: str | None = None
    method: str | None = None
    selected_layers: int | None = None
    total_layers: int | None = None
    selected_fraction: float | None = None
    trainable_params: int | None = None
    median_step_s: float | None = None
    peak_rss_gb: float | None = None
    peak_cuda_gb: float | None = None
    base_loss: float | None = None  # held-out loss before training
    heldout_loss: float | None = None  # held-out loss of the trained model (finetune: last; identify: Stage 1)
    eval_split: str | None = None
    eval_loss: float | None = None  # from eval.json (`ila evaluate`)
    eval_loss_stderr: float | None = None  # None: an eval.json from before standard errors
    eval_perplexity: float | None = None
    eval_perplexity_stderr: float | None = None
    eval_token_accuracy: float | None = None  # None: an eval.json from before next-token accuracy
    eval_token_accuracy_stderr: float | None = None
    benchmarks: dict[str, float | None] = field(default_factory=dict)  # by column label; the judge's win rate too
    benchmark_stderrs: dict[str, float | None] = field(default_factory=dict)
    benchmark_notes: dict[str, str] = field(default_factory=dict)  # column -> what it is, for ila's own prompts
    model: str | None = None
    data: str | None = None


def _dig(data: Any, *keys: str) -> Any:
    """data[k1][k2]...; None as soon as a key is missing or a level is not a mapping."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _integer(value: Any) -> int | None:
    if isinstance(value, dict):  # finetune: {"count": N, ...}
        value = value.get("count")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def read_run(folder: str | Path) -> RunSummary:
    """Summarise one run folder; an IlaError only when the folder is missing or holds no ila run at all."""
    path = Path(folder)
    if not path.is_dir():
        raise IlaError(f"run folder not found: {folder}")
    manifest, evaluation = Manifest.read(path), Manifest.read(path, "eval.json")
    if manifest is None and evaluation is None:
        raise IlaError(f"{folder} is not an ila run folder (no manifest.json or eval.json)")
    first = manifest or evaluation
    assert first is not None
    kind = "identify" if first.kind == "milestone" else first.kind
    run = RunSummary(name=path.name or str(path), path=str(path), kind=kind)
    run.status = first.status if first.status != "unknown" else None
    run.model = first.model.source if first.model else None
    if manifest is not None:
        run.data = manifest.data.source if manifest.data else None
        run.base_loss, run.heldout_loss = manifest.heldout_losses()
    if run.data is None and evaluation is not None:
        run.data = _text(evaluation.get("sft", "data"))
    memory = (manifest.memory if manifest else {}) or (evaluation.memory if evaluation else {})
    run.peak_rss_gb, run.peak_cuda_gb = _number(memory.get("peak_rss_gb")), _number(memory.get("peak_cuda_gb"))
    if kind == "finetune" and manifest is not None:
        run.method = _text(manifest.get("method")) or _text(manifest.get("config", "finetune", "method"))
        run.selected_layers = _integer(manifest.get("selection", "n_selected"))
        run.total_layers = _integer(manifest.get("selection", "n_layers"))
        if run.selected_layers is not None and run.total_layers:
            run.selected_fraction = run.selected_layers / run.total_layers
        run.trainable_params = manifest.trainable_params
        run.median_step_s = manifest.median_step_s
    elif kind == "identify" and manifest is not None:
        sparsity = manifest.get("config", "stage2", "sparsity")
        run.method = f"ila ({sparsity})" if sparsity else "ila"
        run.selected_fraction = _number(manifest.get("config", "run", "report_top_fraction"))
        run.total_layers = manifest.model.n_layers if manifest.model else None
        if run.selected_fraction is not None and run.total_layers:
            run.selected_layers = max(1, round(run.selected_fraction * run.total_layers))
        run.median_step_s = manifest.median_step_s
    elif kind == "rank" and manifest is not None:
        run.method = f"rank ({_text(manifest.get('method')) or '?'})"
        run.total_layers = manifest.model.n_layers if manifest.model else None
    elif kind == "evaluate":
        adapter = _text(first.get("adapter", "kind"))
        run.method = f"evaluate ({adapter})" if adapter else "evaluate (base model)"
    if evaluation is not None:
        _read_evaluation(run, evaluation)
    return run


def _read_evaluation(run: RunSummary, evaluation: Manifest) -> None:
    """eval.json's SFT metrics, benchmark scores and judge win rate, each with its standard error."""
    sft = evaluation.get("sft")
    run.eval_split = _text(_dig(sft, "split"))
    run.eval_loss = _number(_dig(sft, "loss"))
    run.eval_loss_stderr = _number(_dig(sft, "loss_stderr"))
    run.eval_perplexity = _number(_dig(sft, "perplexity"))
    run.eval_perplexity_stderr = _number(_dig(sft, "perplexity_stderr"))
    run.eval_token_accuracy = _number(_dig(sft, "token_accuracy"))
    run.eval_token_accuracy_stderr = _number(_dig(sft, "token_accuracy_stderr"))
    benchmarks = evaluation.get("benchmarks")
    if isinstance(benchmarks, dict):
        for name, entry in benchmarks.items():
            column = _benchmark_column(str(name), entry)
            run.benchmarks[column] = _number(_dig(entry, "score"))
            run.benchmark_stderrs[column] = _number(_dig(entry, "score_stderr"))
            if _dig(entry, "task") == "ila_mmlu":
                run.benchmark_notes[column] = str(_dig(entry, "description") or ILA_MMLU_NOTE)
    win_rate = _number(evaluation.get("judge", "win_rate"))
    if win_rate is not None:
        run.benchmarks["judge win rate"] = win_rate
        run.benchmark_stderrs["judge win rate"] = _number(evaluation.get("judge", "win_rate_stderr"))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _benchmark_column(name: str, entry: Any) -> str:
    """eval.json's label; older files' local MMLU gets the label evaluation.mmlu_label gives it today."""
    label = _dig(entry, "label")
    if isinstance(label, str) and label:
        return label
    if _dig(entry, "task") == "ila_mmlu":
        return f"mmlu (ila {_integer(_dig(entry, 'num_fewshot')) or 0}-shot prompt)"
    return name


# ------------------------------------------------------------------------------------------ formatting


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def indistinguishable(a: float, a_stderr: float, b: float, b_stderr: float) -> bool:
    """|a - b| < 2 sqrt(sa² + sb²): the difference is smaller than two standard errors of the difference."""
    return abs(a - b) < 2 * math.hypot(a_stderr, b_stderr)


def _with_errors(measured: Sequence[tuple[float | None, float | None]], digits: int) -> list[str]:
    """'value ± stderr' per run; CLOSE where a run cannot be told apart from the first run having both numbers."""
    reference = next((i for i, (v, e) in enumerate(measured) if v is not None and e is not None), None)
    cells = []
    for index, (value, stderr) in enumerate(measured):
        cell = _fmt(value, digits)
        if value is not None and stderr is not None:
            cell += f" ± {stderr:.{digits}f}"
            ref_value, ref_stderr = measured[reference] if reference is not None else (None, None)
            if index != reference and ref_value is not None and ref_stderr is not None:
                cell += f" {CLOSE}" if indistinguishable(value, stderr, ref_value, ref_stderr) else ""
        cells.append(cell)
    return cells


def _selected(run: RunSummary) -> str:
    if run.selected_fraction is None:
        return MISSING
    share = f"{run.selected_fraction:.0%}"
    top = "top " if run.kind == "identify" else ""  # identify: the top-K mask its report evaluated
    if run.selected_layers is not None and run.total_layers:
        return f"{top}{run.selected_layers}/{run.total_layers} ({share})"
    return top + share


def table_rows(runs: Sequence[RunSummary]) -> list[dict[str, str]]:
    """One row per run, as the strings report.md and report.csv show; step times also relative to the first."""
    reference = next((r.median_step_s for r in runs if r.median_step_s), None)
    show_cuda = any(r.peak_cuda_gb is not None for r in runs)
    bench_names = list(dict.fromkeys(name for r in runs for name in r.benchmarks))
    eval_loss = _with_errors([(r.eval_loss, r.eval_loss_stderr) for r in runs], 4)
    eval_ppl = _with_errors([(r.eval_perplexity, r.eval_perplexity_stderr) for r in runs], 2)
    eval_accuracy = _with_errors([(r.eval_token_accuracy, r.eval_token_accuracy_stderr) for r in runs], 4)
    bench = {
        name: _with_errors([(r.benchmarks.get(name), r.benchmark_stderrs.get(name)) for r in runs], 3)
        for name in bench_names
    }
    rows = []
    for index, run in enumerate(runs):
        ratio = run.median_step_s / reference if run.median_step_s is not None and reference else None
        row = {
            "run": run.name,
            "kind": run.kind,
            "method": _fmt(run.method),
            "selected layers": _selected(run),
            "trainable params": _fmt(run.trainable_params),
            "median step (s)": _fmt(run.median_step_s, 3),
            "step time ratio": _fmt(ratio, 2),
            "peak RSS (GB)": _fmt(run.peak_rss_gb, 2),
        }
        if show_cuda:
            row["peak CUDA (GB)"] = _fmt(run.peak_cuda_gb, 2)
        row["base loss"] = _fmt(run.base_loss)
        row["held-out loss"] = _fmt(run.heldout_loss)
        row["eval loss"] = eval_loss[index]
        row["perplexity"] = eval_ppl[index]
        row["next-token accuracy"] = eval_accuracy[index]
        for name in bench_names:
            row[name] = bench[name][index]
        rows.append(row)
    return rows


def legend(runs: Sequence[RunSummary]) -> list[str]:
    """The lines explaining ± and the mark (when a run has a standard error) and ila's own benchmark prompts."""
    sft_errors = [(r.eval_loss_stderr, r.eval_perplexity_stderr, r.eval_token_accuracy_stderr) for r in runs]
    errors = [e for sft, r in zip(sft_errors, runs, strict=True) for e in (*sft, *r.benchmark_stderrs.values())]
    lines = [STDERR_LEGEND] if any(e is not None for e in errors) else []
    notes: dict[str, str] = {}
    for run in runs:
        for column, note in run.benchmark_notes.items():
            notes.setdefault(column, note)  # the first run's words: a newer eval.json says more than an old one
    return lines + [f"- **{column}**: {note}." for column, note in notes.items()]


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(runs: Sequence[RunSummary], plot_name: str | None = "report.png") -> str:
    rows = table_rows(runs)
    lines = [
        "# Runs side by side",
        "",
        markdown_table(rows),
        "",
        "- **held-out loss**: the SFT loss on the run's held-out examples after training (identify: the Stage-1 "
        "LoRA model; finetune: the last evaluation); **base loss**: the same before training.",
        "- **eval loss / perplexity / next-token accuracy / benchmarks**: from `eval.json` (`ila evaluate`) when the "
        "folder holds one; next-token accuracy is the share of answer tokens the model's most likely next token gets "
        "right.",
        "- **median step** (identify: Stage 1) and its ratio to the first run that has one: shared machines make "
        "single step times noisy, so compare runs measured side by side.",
        *legend(runs),
        "",
    ]
    if plot_name:
        lines += [f"![held-out loss and median step time]({plot_name})", ""]
    lines += ["## Runs", ""]
    for run in runs:
        notes = [f"model `{run.model}`" if run.model else None, f"data `{run.data}`" if run.data else None]
        if run.eval_split:
            notes.append(f"eval split {run.eval_split}")
        if run.status and run.status != "complete":
            notes.append(f"**status {run.status}**")
        detail = ", ".join(n for n in notes if n)
        lines.append(f"- `{run.name}`: `{run.path}`" + (f"; {detail}" if detail else ""))
    return "\n".join(lines) + "\n"


def plot_report(runs: Sequence[RunSummary], path: Path) -> None:
    """Bars of held-out loss (eval loss where a run has no curve) with median step time on a second axis."""
    import matplotlib.pyplot as plt

    from ila.plots import save_figure

    names = [r.name for r in runs]
    losses = [r.heldout_loss if r.heldout_loss is not None else r.eval_loss for r in runs]
    # one standard error where the bar is eval.json's loss (a finetune curve point carries none)
    errors = [(r.eval_loss_stderr or 0.0) if r.heldout_loss is None else 0.0 for r in runs]
    steps = [r.median_step_s for r in runs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(runs) + 2), 4))
    xs = list(range(len(runs)))
    width = 0.38
    ax.bar(
        [x - width / 2 for x in xs],
        [v if v is not None else 0.0 for v in losses],
        width,
        yerr=errors,
        color="tab:blue",
        label="held-out loss",
    )
    ax.set_ylabel("held-out SFT loss", color="tab:blue")
    right = ax.twinx()
    right.bar(
        [x + width / 2 for x in xs],
        [v if v is not None else 0.0 for v in steps],
        width,
        color="tab:orange",
        label="median step (s)",
    )
    right.set_ylabel("median step time (s)", color="tab:orange")
    for x, loss, step in zip(xs, losses, steps, strict=True):
        if loss is None:
            ax.text(x - width / 2, 0, MISSING, ha="center", va="bottom")
        if step is None:
            right.text(x + width / 2, 0, MISSING, ha="center", va="bottom")
    ax.set_xticks(xs, [n[:24] for n in names], rotation=20, ha="right")
    ax.set_title("held-out loss (blue) and median step time (orange)")
    save_figure(fig, path)
