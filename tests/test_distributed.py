"""Two processes under `accelerate launch` (gloo on CPU) give the single-process ranking on the same global batch.

With accelerate 1.15 a CPU-only machine gets two real processes from `--multi_gpu --num_processes 2` (torch
distributed run, gloo backend); `--cpu` launches one process. LoRA dropout is off so both runs see the same
computation; the remaining difference is float summation order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OVERRIDES = [
    "stage1.max_steps=16",
    "stage1.window=4",
    "stage1.lr=0.01",
    "stage1.batch_size=4",
    "stage2.steps=12",
    "stage2.batch_size=4",
    "data.max_length=64",
    "run.threads=1",
    "lora.dropout=0",
]
TOLERANCE = 1e-4  # max |score difference| allowed between the single- and two-process rankings


def _scores(run: Path) -> dict[str, float]:
    return {e["name"]: e["score"] for e in json.loads((run / "ranking.json").read_text())["layers"]}


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_match_one(tiny_model_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["-m", "ila", "-q", "identify", "--model", str(tiny_model_dir), "--data", str(tiny_data), *OVERRIDES]
    single = subprocess.run(
        [sys.executable, *args, "--output", str(tmp_path / "one")], env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    double = subprocess.run(
        [*launch, *args, "--output", str(tmp_path / "two")], env=env, capture_output=True, text=True
    )
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = _scores(tmp_path / "one"), _scores(tmp_path / "two")
    assert sorted(one, key=lambda n: -one[n]) == sorted(two, key=lambda n: -two[n])
    assert max(abs(one[name] - two[name]) for name in one) < TOLERANCE
    # only the main process wrote: one manifest, no stray scratch folders in the run folder
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["status"] == "complete"
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]


def test_batch_not_divisible_by_processes_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from ila import distributed
    from ila.errors import IlaError

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard_rows(4) == slice(2, 4)
    with pytest.raises(IlaError, match="divisible by the number of processes"):
        distributed.shard_rows(3)
