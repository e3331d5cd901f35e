"""`ila report`: run folders side by side; whatever a manifest lacks is shown as "-"."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ila.cli import main
from ila.commands.report import run_report
from ila.errors import IlaError
from ila.side_by_side import CLOSE, STDERR_LEGEND, indistinguishable, read_run


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """An identify run, a finetune run with an eval.json, and a finetune run whose manifest says almost nothing."""
    identify = tmp_path / "identify-run"
    write_json(
        identify / "manifest.json",
        {
            "status": "complete",
            "model": {"source": "tiny", "n_layers": 28},
            "data": {"source": "d.jsonl"},
            "config": {
                "stage1": {"max_steps": 10},
                "stage2": {"sparsity": "penalty"},
                "run": {"report_top_fraction": 0.25},
            },
            "stage1": {"median_step_s": 0.2},
            "stage2": {"median_step_s": 0.1},
            "memory": {"peak_rss_gb": 1.5},
            "heldout_loss": {"base": 4.0, "stage1": 3.0, "stage1_top_mask": 3.2},
        },
    )
    finetune = tmp_path / "ft-ila"
    write_json(
        finetune / "manifest.json",
        {
            "status": "complete",
            "method": "lora",
            "model": {"source": "tiny"},
            "selection": {"n_selected": 7, "n_layers": 28},
            "trainable_params": {"count": 1234},
            "training": {"median_step_s": 0.1},
            "memory": {"peak_rss_gb": 1.25},
            "heldout_loss": [{"step": 0, "loss": 4.0}, {"step": 5, "loss": 2.5}],
        },
    )
    write_json(
        finetune / "eval.json",
        {
            "kind": "evaluate",
            "sft": {"split": "heldout", "loss": 2.5, "perplexity": 12.18},
            "benchmarks": {"mmlu": {"metric": "acc,none", "score": 0.25}, "gsm8k": {"score": None}},
        },
    )
    sparse = tmp_path / "ft-sparse"
    write_json(sparse / "manifest.json", {"method": "full", "status": "running"})
    return [identify, finetune, sparse]


def test_report_puts_runs_side_by_side(tmp_path: Path, runs: list[Path]) -> None:
    report = run_report(runs, str(tmp_path / "report"))
    identify, finetune, sparse = report.runs
    assert identify.kind == "identify" and identify.heldout_loss == 3.0 and identify.base_loss == 4.0
    assert identify.selected_layers == 7 and identify.median_step_s == 0.2
    assert finetune.kind == "finetune" and finetune.selected_fraction == 0.25 and finetune.trainable_params == 1234
    assert finetune.heldout_loss == 2.5 and finetune.benchmarks == {"mmlu": 0.25, "gsm8k": None}
    assert sparse.method == "full" and sparse.trainable_params is None and sparse.heldout_loss is None
    for name in ("report.md", "report.csv", "report.png", "manifest.json"):
        assert (report.run_dir / name).is_file(), name
    markdown = (report.run_dir / "report.md").read_text()
    assert "| ft-ila | finetune | lora | 7/28 (25%) | 1,234 | 0.100 | 0.50 |" in markdown
    assert "**status running**" in markdown
    rows = list(csv.DictReader((report.run_dir / "report.csv").open()))
    assert [row["run"] for row in rows] == ["identify-run", "ft-ila", "ft-sparse"]
    assert rows[2]["held-out loss"] == "-" and rows[2]["mmlu"] == "-" and rows[1]["mmlu"] == "0.250"
    assert rows[0]["selected layers"] == "top 7/28 (25%)"
    assert "±" not in markdown and CLOSE not in markdown  # an eval.json from before standard errors reads as before


def evaluated(folder: Path, loss: float, loss_stderr: float | None, acc: float, acc_stderr: float | None) -> Path:
    sft = {"split": "heldout", "loss": loss, "perplexity": 2.718281828459045**loss}
    mmlu = {"task": "ila_mmlu", "metric": "acc,none", "score": acc, "num_fewshot": 0}
    if loss_stderr is not None:  # written by `ila evaluate` since standard errors
        sft |= {"loss_stderr": loss_stderr, "perplexity_stderr": sft["perplexity"] * loss_stderr}
        sft |= {"token_accuracy": 1.0 - loss / 5, "token_accuracy_stderr": loss_stderr}
        mmlu |= {"score_stderr": acc_stderr, "label": "mmlu (ila 0-shot prompt)", "description": "ila's own prompt"}
    write_json(folder / "manifest.json", {"kind": "evaluate", "status": "complete"})
    write_json(folder / "eval.json", {"kind": "evaluate", "sft": sft, "benchmarks": {"mmlu": mmlu}})
    return folder


def test_report_marks_differences_smaller_than_their_error(tmp_path: Path) -> None:
    assert indistinguishable(2.50, 0.03, 2.53, 0.03)  # 0.03 < 2 * sqrt(2) * 0.03 = 0.085
    assert not indistinguishable(2.50, 0.03, 2.00, 0.03)
    runs = [
        evaluated(tmp_path / "base", 2.50, 0.03, 0.25, 0.03),
        evaluated(tmp_path / "close", 2.53, 0.03, 0.27, 0.03),  # both within two combined errors of base
        evaluated(tmp_path / "far", 2.00, 0.03, 0.60, 0.03),  # both clearly apart
        evaluated(tmp_path / "old", 2.52, None, 0.26, None),  # an eval.json without errors: no ±, no mark
    ]
    report = run_report(runs, str(tmp_path / "report"))
    rows = {row["run"]: row for row in csv.DictReader((report.run_dir / "report.csv").open())}
    assert rows["base"]["eval loss"] == "2.5000 ± 0.0300"  # the reference carries no mark
    assert rows["close"]["eval loss"] == f"2.5300 ± 0.0300 {CLOSE}"
    assert rows["far"]["eval loss"] == "2.0000 ± 0.0300"
    assert rows["old"]["eval loss"] == "2.5200"
    mmlu = "mmlu (ila 0-shot prompt)"  # old files' local MMLU gets the same column as new ones
    assert [rows[name][mmlu] for name in ("base", "close", "far", "old")] == [
        "0.250 ± 0.030",
        f"0.270 ± 0.030 {CLOSE}",
        "0.600 ± 0.030",
        "0.260",
    ]
    assert rows["close"]["perplexity"].endswith(CLOSE) and not rows["far"]["perplexity"].endswith(CLOSE)
    accuracy = [rows[name]["next-token accuracy"] for name in ("base", "close", "far", "old")]
    assert accuracy == ["0.5000 ± 0.0300", f"0.4940 ± 0.0300 {CLOSE}", "0.6000 ± 0.0300", "-"]
    markdown = (report.run_dir / "report.md").read_text()
    assert markdown.count(STDERR_LEGEND) == 1
    assert f"- **{mmlu}**: ila's own prompt." in markdown
    saved = json.loads((report.run_dir / "manifest.json").read_text())
    assert saved["runs"][0]["eval_loss_stderr"] == 0.03 and saved["runs"][3]["eval_loss_stderr"] is None


def test_rank_and_milestone_folders_are_read_as_what_they_are(tmp_path: Path) -> None:
    # a rank manifest from before "kind" was written: its "method" must not make it a finetune run
    write_json(
        tmp_path / "rank" / "manifest.json",
        {"method": "grad-norm", "settings": {}, "status": "complete", "model": {"source": "tiny", "n_layers": 28}},
    )
    rank = read_run(tmp_path / "rank")
    assert (rank.kind, rank.method, rank.total_layers, rank.trainable_params) == ("rank", "rank (grad-norm)", 28, None)
    write_json(
        tmp_path / "m25" / "manifest.json",
        {"kind": "milestone", "status": "complete", "milestone": 25, "heldout_loss": {"base": 4.0, "stage1": 3.5}},
    )
    milestone = read_run(tmp_path / "m25")
    assert (milestone.kind, milestone.method, milestone.heldout_loss) == ("identify", "ila", 3.5)


def test_report_refuses_what_is_not_a_run(tmp_path: Path, runs: list[Path]) -> None:
    with pytest.raises(IlaError, match="not found"):
        read_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IlaError, match="not an ila run folder"):
        read_run(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(IlaError, match=r"manifest\.json:1"):
        read_run(tmp_path / "broken")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "manifest.json").write_text("[1, 2]")
    assert read_run(runs[2]).kind == "finetune"
    with pytest.raises(IlaError, match="JSON object"):
        read_run(tmp_path / "list")


def test_cli_report(tmp_path: Path, runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-report"
    assert main(["-q", "report", *map(str, runs), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| identify-run |" in printed and "report.md" in printed
    assert main(["-q", "report", str(runs[0]), "--output", str(out)]) == 2  # not overwritten without --overwrite
    assert main(["-q", "report", str(runs[0]), "--output", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["-q", "report", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ila: error: run folder not found")
    assert not (tmp_path / "x").exists()
