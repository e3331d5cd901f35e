"""Copy what an `ila experiment` folder measured, without weights, so a study outlives the machine it ran on.

    python experiments/keep_results.py runs/worth-it experiments/results/worth-it

Keeps, for every unit, the files that mark it complete and that the report reads (manifest.json, config.yaml,
selection.json, ranking.json, heldout.csv, and eval.json with eval_samples.jsonl where unit_accuracy.py scored it),
and the experiment's own report, tables, accuracy table and the figures its report shows; drops adapters, changed
weights, checkpoints, per-unit plots and figures the report no longer shows (a slice run with one training method
writes `ablation.png`, which the two-method report replaces). `ila experiment` skips a unit whose manifest says
complete, so copying such a folder back (`cp -r experiments/results/worth-it runs/worth-it`) and running the same
YAML with `--output runs/worth-it` continues the study where it stopped and rewrites the report over every unit.
(Units that need another unit's weights, such as a milestone ranking from a Stage-1 checkpoint, must have run.)
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

UNIT_FILES = (
    "manifest.json",
    "config.yaml",
    "selection.json",
    "ranking.json",
    "heldout.csv",
    "eval.json",  # experiments/unit_accuracy.py: accuracy and loss with their errors
    "eval_samples.jsonl",  # ... per held-out example, for paired comparisons
)
ROOT_FILES = (
    "experiment.yaml",
    "report.md",
    "finetune.json",
    "comparisons.json",
    "accuracy/accuracy.md",  # experiments/unit_accuracy.py's table
    "accuracy/accuracy.json",
)


def complete(folder: Path) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


def keep(source: Path, target: Path) -> int:
    units = 0
    for manifest in sorted(source.rglob("manifest.json")):
        folder = manifest.parent
        if folder == source or not complete(folder):
            continue
        out = target / folder.relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        for name in UNIT_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
        units += 1
    for name in ROOT_FILES:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
    report = source / "report.md"
    if report.is_file():  # without a report, which figures it shows is unknown: leave the kept ones alone
        shown = set(re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", report.read_text(encoding="utf-8")))
        for figure in sorted(shown):
            if (source / figure).is_file():
                shutil.copy2(source / figure, target / figure)
        for stale in target.glob("*.png"):  # kept by an earlier call, no longer in the report
            if stale.name not in shown:
                stale.unlink()
    return units


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python experiments/keep_results.py EXPERIMENT_FOLDER TARGET_FOLDER")
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    if not (src / "experiment.yaml").is_file():
        raise SystemExit(f"{src} is not an ila experiment folder (no experiment.yaml)")
    print(f"{keep(src, dst)} complete units kept in {dst}")
