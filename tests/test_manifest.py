"""The manifest, directly: what a run writes reads back field for field, a manifest from an older ila (no "kind",
old section names) reads with None for what it lacks, and a file that is not a JSON object is refused by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ila.errors import IlaError
from ila.manifest import DataRecord, Manifest, ModelRecord, invoked
from ila.run_folder import write_json


def _finished(folder: Path) -> Manifest:
    manifest = Manifest(
        "finetune",
        config={"finetune": {"batch_size": 4, "method": "lora"}},
        model=ModelRecord("tiny", "/m", "sha:1", "LlamaForCausalLM", 14),
        data=DataRecord("rows.jsonl", "ab12", rows=10, train_examples=8, eval_examples=2),
        seed=3,
    )
    manifest.sections.update(method="lora", selection={"n_selected": 3, "n_layers": 14})
    manifest.write(folder)
    assert json.loads((folder / "manifest.json").read_text())["status"] == "running"
    manifest.finish(
        folder,
        {"training": 1.5, "total": 2.0},
        {"peak_rss_gb": 0.5, "peak_cuda_gb": 0.75},
        trainable_params={"count": 1234, "tensors": 6},
        training={"median_step_s": 0.25},
        heldout_loss=[{"step": 0, "loss": 2.0}, {"step": 10, "loss": 1.5}],
    )
    return manifest


def test_what_a_run_writes_reads_back(tmp_path: Path) -> None:
    written = _finished(tmp_path)
    read = Manifest.read(tmp_path)
    assert read == written
    assert read.complete and read.kind == "finetune" and read.error is None
    assert read.model is not None and read.model.n_layers == 14 and read.model.class_name == "LlamaForCausalLM"
    assert read.data is not None and read.data.sha256 == "ab12" and read.data.train_examples == 8
    assert read.heldout_losses() == (2.0, 1.5)
    assert (read.trainable_params, read.median_step_s, read.peak_gb, read.total_seconds) == (1234, 0.25, 0.75, 2.0)
    assert read.get("config", "finetune", "batch_size") == 4 and read.get("selection", "n_selected") == 3
    assert read.get("selection", "nothing", "deeper") is None
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["model"]["class"] == "LlamaForCausalLM" and raw["ila_command"] == written.command  # the file's names


def test_the_command_recorded_is_the_callers_else_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ila", "rank", "--method", "random"])
    assert Manifest("rank", versions={}, hardware={}).command == "ila rank --method random"
    assert Manifest("rank", command=invoked(""), versions={}, hardware={}).command == "ila rank --method random"
    assert Manifest("rank", command=invoked("ila experiment"), versions={}, hardware={}).command == "ila experiment"


def test_a_failed_run_says_why(tmp_path: Path) -> None:
    manifest = Manifest("identify", versions={}, hardware={})
    manifest.fail(tmp_path, "loss became nan at step 7", {"stage 1": 3.0}, {"peak_rss_gb": 1.0})
    read = Manifest.read(tmp_path)
    assert read is not None and read.status == "failed" and read.error == "loss became nan at step 7"
    assert read.timings == {"stage 1": 3.0} and not read.complete


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ({"method": "lora", "selection": {}, "heldout_loss": []}, "finetune"),
        ({"stage1": {}, "stage2": {}, "heldout_loss": {"base": 2.0, "stage1": 1.8}}, "identify"),
        ({"milestone": 25, "stage2": {}}, "milestone"),
        ({"method": "grad-norm", "settings": {"seed": 0}}, "rank"),
        ({"kind": "evaluate", "sft": {"loss": 1.0}}, "evaluate"),
        ({"config": {"finetune": {"method": "full"}}}, "finetune"),
    ],
)
def test_older_manifests_are_read_by_what_they_record(tmp_path: Path, raw: dict[str, object], kind: str) -> None:
    write_json(tmp_path / "manifest.json", raw | {"status": "complete", "timings": {"total": "soon"}})
    read = Manifest.read(tmp_path)
    assert read is not None and read.kind == kind and read.complete
    assert read.model is None and read.data is None and read.seed is None  # not recorded: None, not a guess
    assert read.timings == {}  # a value that is not a number is not a timing
    if kind == "identify":
        assert read.heldout_losses() == (2.0, 1.8)


def test_a_folder_without_a_manifest_has_none_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    assert Manifest.read(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(IlaError, match=r"manifest\.json:1: not valid JSON"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(IlaError, match="JSON object"):
        Manifest.read(tmp_path)


def test_not_a_number_losses_read_as_not_measured(tmp_path: Path) -> None:
    write_json(tmp_path / "manifest.json", {"kind": "identify", "heldout_loss": {"base": float("nan"), "stage1": 1.0}})
    read = Manifest.read(tmp_path)
    assert read is not None and read.heldout_losses() == (None, 1.0)
