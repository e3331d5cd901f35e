"""Next-token accuracy beside the held-out loss for an `ila experiment`'s fine-tuning units, with paired errors.

    python experiments/unit_accuracy.py runs/worth-it --units all full-all '*-top30' --reference ila-top30

For every finetune unit whose folder name matches a pattern and holds its adapter or changed weights, `ila
evaluate` scores the unit's own held-out examples (its train seed's split) and writes eval.json and
eval_samples.jsonl into the unit folder (skipped when they are there, so kept results without weights are
tabulated again from their samples); the base model is scored on each train seed's split too
(accuracy/base-seed<N>/). Then one table: per selection, the next-token accuracy on the answer tokens and the
held-out loss, averaged over train seeds, and the paired difference to the reference selection (same examples,
same seed), with the standard error of the per-seed difference pooled over seeds (examples as the sampled units)
and the per-seed differences. Written to accuracy/accuracy.md and accuracy.json.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from ila.commands.evaluate import evaluate_config, run_evaluate
from ila.evaluation import EVAL_FILE, SAMPLES_FILE, token_mean_stderr
from ila.run_folder import atomic_write_text, write_json

SEED_SUFFIX = re.compile(r"-train-seed(\d+)$")


def selection_and_seed(unit: str) -> tuple[str, int]:
    found = SEED_SUFFIX.search(unit)
    return (unit[: found.start()], int(found.group(1))) if found else (unit, 0)


def evaluate(unit: Path, output: Path | None = None, base: bool = False) -> dict[str, Any]:
    """Score a unit folder (or, with `base`, the base model on the unit's split) once; read the samples back."""
    folder = output or unit
    if not (folder / SAMPLES_FILE).is_file():
        extra: dict[str, dict[str, Any]] = {}
        if base:
            extra["evaluate"] = {"adapter": None}
        if output is not None:
            extra["run"] = {"output": str(output)}
        cfg = evaluate_config(from_run=str(unit), extra=extra)
        run_evaluate(cfg, overwrite=True, log_samples=True, command="experiments/unit_accuracy.py")
    saved = json.loads((folder / EVAL_FILE).read_text(encoding="utf-8"))
    samples = [json.loads(line) for line in (folder / SAMPLES_FILE).read_text(encoding="utf-8").splitlines()]
    sft = sorted((s for s in samples if s["source"] == "sft"), key=lambda s: s["index"])
    return {
        "loss": saved["sft"]["loss"],
        "accuracy": saved["sft"]["token_accuracy"],
        "accuracy_stderr": saved["sft"]["token_accuracy_stderr"],
        "correct": [s["correct"] for s in sft],
        "tokens": [s["tokens"] for s in sft],
    }


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float | None]:
    """Accuracy of a minus accuracy of b on the same examples, with the paired standard error."""
    if a["tokens"] != b["tokens"]:
        raise SystemExit("two units of one train seed scored different examples; was the data changed?")
    diffs = [float(x - y) for x, y in zip(a["correct"], b["correct"], strict=True)]
    return token_mean_stderr(diffs, a["tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--units", nargs="+", required=True, help="glob patterns of unit names (seed suffix aside)")
    parser.add_argument("--reference", default="ila-top30", help="the selection the others are paired with")
    args = parser.parse_args()
    finetune = args.experiment / "finetune"
    units = sorted(
        p
        for p in finetune.iterdir()
        if (p / "manifest.json").is_file()
        and any(fnmatch.fnmatch(selection_and_seed(p.name)[0], pattern) for pattern in args.units)
        and ((p / SAMPLES_FILE).is_file() or (p / "adapter").is_dir() or (p / "selected_weights.safetensors").is_file())
    )
    out = args.experiment / "accuracy"
    scores: dict[str, dict[int, dict[str, Any]]] = {}
    for unit in units:
        name, seed = selection_and_seed(unit.name)
        print(f"evaluating {unit.name}", flush=True)
        scores.setdefault(name, {})[seed] = evaluate(unit)
        if seed not in scores.get("base model", {}):
            scores.setdefault("base model", {})[seed] = evaluate(unit, out / f"base-seed{seed}", base=True)
    reference = scores.get(args.reference)
    rows, lines = (
        [],
        [
            f"| selection | seeds | next-token accuracy | held-out loss | minus {args.reference} (paired) | per seed |",
            "|---|---|---|---|---|---|",
        ],
    )
    for name, by_seed in sorted(
        scores.items(), key=lambda kv: -statistics.fmean(s["accuracy"] for s in kv[1].values())
    ):
        seeds = sorted(by_seed)
        accuracy = statistics.fmean(by_seed[s]["accuracy"] for s in seeds)
        stderr = math.sqrt(sum(by_seed[s]["accuracy_stderr"] ** 2 for s in seeds)) / len(seeds)
        loss = statistics.fmean(by_seed[s]["loss"] for s in seeds)
        row: dict[str, Any] = {"selection": name, "seeds": seeds, "accuracy": accuracy, "accuracy_stderr": stderr}
        row["loss"] = loss
        cell, per_seed = "-", "-"
        shared = [s for s in seeds if reference and s in reference]
        if reference is not None and name != args.reference and shared:
            diffs = [paired(by_seed[s], reference[s]) for s in shared]
            mean = statistics.fmean(d for d, _ in diffs)
            pooled = math.sqrt(sum((e or 0.0) ** 2 for _, e in diffs)) / len(diffs)
            row |= {"minus_reference": mean, "minus_reference_stderr": pooled, "per_seed": [d for d, _ in diffs]}
            cell = f"{mean:+.4f} ± {pooled:.4f}"
            per_seed = ", ".join(f"{d:+.4f}" for d, _ in diffs)
        rows.append(row)
        lines.append(f"| {name} | {len(seeds)} | {accuracy:.4f} ± {stderr:.4f} | {loss:.4f} | {cell} | {per_seed} |")
    lines += [
        "",
        "Next-token accuracy: the share of answer tokens the model's most likely next token gets right, on each train "
        "seed's held-out examples, averaged over the seeds; ± is one standard error (examples as the sampled units, "
        "pooled over seeds). The paired column compares two selections on the same examples of the same seed.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "accuracy.md", "\n".join(lines) + "\n")
    write_json(out / "accuracy.json", rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
