"""Kill a real `ila identify` process with SIGKILL mid-stage, resume it, and get the uninterrupted ranking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

OVERRIDES = [
    "stage1.max_steps=80",
    "stage1.window=8",
    "stage1.lr=0.01",
    "stage1.batch_size=4",
    "stage2.steps=60",
    "stage2.batch_size=4",
    "data.max_length=64",
    "run.threads=1",
    "run.checkpoint_every=5",
]


def _cmd(model: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ila",
        "-q",
        "identify",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        *OVERRIDES,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _ranking(run: Path) -> list[tuple[str, float]]:
    data = json.loads((run / "ranking.json").read_text())
    return [(entry["name"], entry["score"]) for entry in data["layers"]]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(tiny_model_dir, tiny_data, out), check=True, env=_env(), capture_output=True)
    return out


def _kill_when(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_kill_9_then_resume_gives_the_uninterrupted_ranking(
    stage: str, reference: Path, tiny_model_dir: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(tiny_model_dir, tiny_data, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _kill_when(out / stage / "checkpoint.pt", proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "ranking.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"

    resumed = subprocess.run(
        [sys.executable, "-m", "ila", "-q", "identify", "--resume", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "manifest.json").read_text())["resumed"] == 1
    got, want = _ranking(out), _ranking(reference)
    assert [name for name, _ in got] == [name for name, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_resume_of_a_complete_run_is_refused(reference: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ila", "-q", "identify", "--resume", str(reference)],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "already complete" in proc.stderr


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import torch

    from ila import checkpoints
    from ila.errors import IlaError

    path = tmp_path / "stage1" / "checkpoint.pt"
    checkpoints.save_checkpoint(path, {"step": 10, "scores": torch.ones(3)})

    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(IlaError, match=r"No space left on device.*previous checkpoint is intact"):
        checkpoints.save_checkpoint(path, {"step": 20, "scores": torch.zeros(3)})
    monkeypatch.undo()
    state = checkpoints.load_checkpoint(path)
    assert state is not None and state["step"] == 10 and torch.equal(state["scores"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no half-written temporary file


def test_damaged_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    from ila import checkpoints
    from ila.errors import IlaError

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(IlaError, match="cannot be read"):
        checkpoints.load_checkpoint(path)
