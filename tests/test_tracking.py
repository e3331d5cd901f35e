"""--report-to: the curves land in the tracker, equal to what the run folder records; a missing package is one line."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ila.cli import main


def test_tensorboard_gets_every_step_of_both_stages(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, fast_overrides: list[str]
) -> None:
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["-q", "identify", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out)]
    assert main([*argv, "--report-to", "tensorboard", *fast_overrides]) == 0
    assert list((out / "tensorboard" / "run").glob("*/events.out.tfevents.*"))  # the config, as hparams
    curves = EventAccumulator(str(out / "tensorboard" / "run"))
    curves.Reload()
    tags = set(curves.Tags()["scalars"])
    assert {"stage_1_lora/loss", "stage_1_lora/lr"} <= tags and any(t.startswith("stage_2") for t in tags)
    with (out / "stage1" / "losses.csv").open(encoding="utf-8") as handle:
        losses = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]
    logged = [(e.step, e.value) for e in curves.Scalars("stage_1_lora/loss")]
    assert [s for s, _ in logged] == [s for s, _ in losses]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses], rel=1e-6)  # event files store float32


def test_a_tracker_that_is_not_installed_is_one_line(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_data: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    argv = ["identify", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out)]
    assert main([*argv, "--report-to", "wandb"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == "ila: error: --report-to wandb needs the wandb package: pip install wandb"
    assert not out.exists()


def test_finetune_logs_its_training_and_heldout_curves(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path) -> None:
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ft"
    argv = ["-q", "finetune", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out)]
    overrides = ["finetune.max_steps=4", "finetune.eval_every=2", "data.max_length=64", "run.threads=1"]
    assert main([*argv, "--report-to", "tensorboard", *overrides]) == 0
    curves = EventAccumulator(str(out / "tensorboard" / "ft"))
    curves.Reload()
    assert [e.step for e in curves.Scalars("finetune_lora/loss")] == [1, 2, 3, 4]
    assert [e.step for e in curves.Scalars("finetune_lora/heldout_loss")] == [2, 4]
