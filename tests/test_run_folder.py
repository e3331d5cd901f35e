"""Run folders and checkpoints, directly: atomic writes that leave the old file or nothing, folders replaced only
when ila wrote them, timings, and checkpoints with their RNG state."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import torch

from ila.checkpoints import load_checkpoint, restore_rng, rng_state, save_checkpoint
from ila.errors import IlaError
from ila.run_folder import Timings, atomic_dir, atomic_write_text, prepare_run_dir, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")

    def full_disk(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(IlaError, match=r"report\.md: No space left on device"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_atomic_dir_replaces_the_folder_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    with atomic_dir(target) as staging:
        (staging / "a.bin").write_bytes(b"1")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "b.bin").write_bytes(b"2")
        raise RuntimeError("interrupted half way")
    assert sorted(p.name for p in target.iterdir()) == ["a.bin"]  # the first version, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left behind
    with atomic_dir(target) as staging:
        (staging / "c.bin").write_bytes(b"3")
    assert sorted(p.name for p in target.iterdir()) == ["c.bin"]


def test_run_folders_are_replaced_only_when_ila_wrote_them(tmp_path: Path) -> None:
    run = prepare_run_dir(str(tmp_path / "run"), "identify", overwrite=False)
    write_json(run / "manifest.json", {"kind": "identify"})
    with pytest.raises(IlaError, match="already exists"):
        prepare_run_dir(str(run), "identify", overwrite=False)
    assert prepare_run_dir(str(run), "identify", overwrite=True) == run and not any(run.iterdir())
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(IlaError, match="holds no ila run"):
        prepare_run_dir(str(foreign), "identify", overwrite=True)
    assert (foreign / "cat.jpg").read_bytes() == b"x"


def test_timings_add_up_repeated_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([10.0, 12.5, 20.0, 21.0, 30.0, 30.25])  # each phase reads the clock at its start and its end
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    timings = Timings()
    for _ in range(2):
        with timings.measure("held-out evaluation"):
            pass
    with pytest.raises(ValueError), timings.measure("training"):
        raise ValueError("a failing phase is still timed")
    assert timings.seconds == {"held-out evaluation": 3.5, "training": 0.25}


def test_a_checkpoint_round_trips_its_tensors_and_random_state(tmp_path: Path) -> None:
    path = tmp_path / "stage1" / "checkpoint.pt"
    assert load_checkpoint(path) is None  # nothing saved yet: start the stage
    torch.manual_seed(3)
    weights = {"a": torch.randn(4, 4)}
    save_checkpoint(path, {"step": 7, "weights": weights, "rng": rng_state()})
    expected = torch.rand(5)  # what the run draws next after the checkpoint
    torch.manual_seed(99)
    state = load_checkpoint(path)
    assert state is not None and state["step"] == 7 and torch.equal(state["weights"]["a"], weights["a"])
    restore_rng(state["rng"])
    assert torch.equal(torch.rand(5), expected)  # a resumed run draws the same numbers
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]  # no temporary left


def test_a_damaged_checkpoint_is_one_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(IlaError, match=r"checkpoint .*checkpoint.pt cannot be read.*delete it"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(IlaError, match="not an ila checkpoint"):
        load_checkpoint(path)
