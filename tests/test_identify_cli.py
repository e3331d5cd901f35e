"""`ila identify` end to end on a tiny model: the run folder, reproducibility, milestones, and every user error as
one `ila: error:` line with exit status 2 and no run folder left behind."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ila.cli import main
from ila.commands.identify import run_identify
from ila.config import IdentifyConfig, build_config, load_config
from ila.model_loading import fingerprint_model_files
from tiny_models import make_rows, make_tokenizer, tiny_llama, write_jsonl

# the same settings as conftest's fast_overrides, for the module-scoped run below
RUN_OVERRIDES = [
    "stage1.max_steps=12",
    "stage1.window=4",
    "stage1.batch_size=4",
    "stage1.lr=0.01",
    "stage2.steps=8",
    "stage2.batch_size=4",
    "data.max_length=64",
    "run.threads=1",
]
N_LAYERS = 28
LONG_ROWS = 2  # truncated to data.max_length
LONG_PROMPTS = 1  # dropped: no answer token would survive the cut


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("ila: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data_with_long_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = make_rows(48)
    rows += [{"instruction": "tell me", "input": "", "output": " ".join(["good"] * 100)}] * LONG_ROWS
    rows += [{"instruction": " ".join(["what"] * 80), "input": "", "output": "yes"}] * LONG_PROMPTS
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, data_with_long_rows: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main(
        [
            "-q",
            "identify",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data_with_long_rows),
            "--output",
            str(out),
            "--seed",
            "0",
            *RUN_OVERRIDES,
        ]
    )
    assert code == 0
    return out


# ----------------------------------------------------------------------------------------------- run folder


def test_run_folder_holds_every_artifact(run_dir: Path) -> None:
    for name in (
        "config.yaml",
        "manifest.json",
        "ranking.json",
        "ranking.csv",
        "heatmap.png",
        "report.md",
        "stage1/trace.csv",
        "stage1/adapter/adapter_config.json",
    ):
        assert (run_dir / name).is_file(), name
    for percent in (25, 50, 75, 100):
        assert (run_dir / "stage1" / f"milestone-{percent}" / "adapter_model.safetensors").is_file()
    assert (run_dir / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run_dir.rglob(".*")]  # no staging or temporary files left behind


def test_config_yaml_is_the_resolved_config(run_dir: Path) -> None:
    cfg = load_config(IdentifyConfig, run_dir / "config.yaml")
    assert cfg.stage1.max_steps == 12 and cfg.stage2.steps == 8 and cfg.data.max_length == 64
    assert cfg.run.seed == 0 and cfg.run.output == str(run_dir)


def test_manifest(run_dir: Path, tiny_model_dir: Path, data_with_long_rows: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["seed"] == 0
    for package in ("python", "torch", "transformers", "peft"):
        assert manifest["versions"][package] not in ("", "not installed")
    assert manifest["model"]["fingerprint"] == fingerprint_model_files(tiny_model_dir)
    assert manifest["model"]["n_layers"] == N_LAYERS
    assert manifest["data"]["sha256"] == hashlib.sha256(data_with_long_rows.read_bytes()).hexdigest()
    assert manifest["data"]["rows"] == 48 + LONG_ROWS + LONG_PROMPTS
    assert {"stage 1", "stage 2", "total"} <= set(manifest["timings"])
    assert all(seconds >= 0 for seconds in manifest["timings"].values())
    assert manifest["memory"]["peak_rss_gb"] > 0
    assert manifest["stage1"]["steps"] == 12 and manifest["stage2"]["steps"] == 8
    assert build_config(IdentifyConfig, manifest["config"]) == load_config(IdentifyConfig, run_dir / "config.yaml")


def test_stage1_lowers_the_heldout_loss(run_dir: Path) -> None:
    heldout = json.loads((run_dir / "manifest.json").read_text())["heldout_loss"]
    assert heldout["stage1"] < heldout["base"]
    assert math.isfinite(heldout["stage1_top_mask"])


def test_adapter_and_milestones_load_with_peft(run_dir: Path, tiny_model_dir: Path) -> None:
    ids = torch.tensor([[5, 9, 30, 41, 7, 12]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(run_dir / "stage1" / "adapter")).eval()
        tuned_logits = model(input_ids=ids).logits
    assert not torch.allclose(base_logits, tuned_logits)
    final = load_file(run_dir / "stage1" / "adapter" / "adapter_model.safetensors")
    assert len([k for k in final if "lora_A" in k]) == N_LAYERS
    at_100 = load_file(run_dir / "stage1" / "milestone-100" / "adapter_model.safetensors")
    at_25 = load_file(run_dir / "stage1" / "milestone-25" / "adapter_model.safetensors")
    assert final.keys() == at_100.keys() == at_25.keys()
    assert all(torch.equal(final[k], at_100[k]) for k in final)  # 100% of the planned steps = the final adapter
    assert any(not torch.equal(final[k], at_25[k]) for k in final)  # 25% is an earlier state


def test_trace_csv(run_dir: Path) -> None:
    with (run_dir / "stage1" / "trace.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 // 4  # one stability check per window
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    assert {"r_t", "loss_plateau"} <= set(rows[0])
    assert all(math.isfinite(float(r["r_t"])) and float(r["r_t"]) > 0 for r in rows)
    assert math.isinf(float(rows[0]["loss_plateau"]))  # no earlier window to compare with yet
    assert math.isfinite(float(rows[-1]["loss_plateau"]))


def test_ranking_json_and_csv(run_dir: Path) -> None:
    ranking = json.loads((run_dir / "ranking.json").read_text())
    entries = ranking["layers"]
    assert ranking["n_layers"] == len(entries) == N_LAYERS and ranking["n_blocks"] == 4
    assert [e["rank"] for e in entries] == list(range(1, N_LAYERS + 1))
    scores = [e["score"] for e in entries]
    assert scores == sorted(scores, reverse=True)
    names = {e["name"] for e in entries}
    assert names == {
        f"model.layers.{b}.{t}"
        for b in range(4)
        for t in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    for e in entries:
        assert e["name"] == f"model.layers.{e['block']}.{e['module_type']}"
        assert e["gamma"] == pytest.approx(1 / (1 + math.exp(-e["score"])))
    assert ranking["info"]["seed"] == 0 and ranking["info"]["milestone"] == 100
    assert set(ranking["info"]["heldout_loss"]) == {"base", "stage1", "stage1_top_mask", "delta_norm_top_mask"}
    with (run_dir / "ranking.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == [e["name"] for e in entries]
    assert [float(r["score"]) for r in rows] == pytest.approx(scores)


def test_report_mentions_cuts_and_heldout_loss(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert f"{LONG_ROWS} truncated, {LONG_PROMPTS} dropped as too long" in report
    assert "Held-out loss" in report
    for value in manifest["heldout_loss"].values():
        assert f"{value:.4f}" in report


# ------------------------------------------------------------------------------------------------ milestones


def test_from_run_milestone_ranks_without_retraining(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stage1 = run_dir / "stage1"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stage1.rglob("*") if p.is_file()}
    code, out, _ = cli(capsys, "-q", "identify", "--from-run", str(run_dir), "--milestone", "25")
    assert code == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stage1.rglob("*") if p.is_file()} == before
    folder = run_dir / "milestone-25"
    ranking = json.loads((folder / "ranking.json").read_text())
    assert len(ranking["layers"]) == N_LAYERS and ranking["info"]["milestone"] == 25
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stage1_adapter"].endswith("milestone-25")
    assert "stage1" not in manifest  # no Stage 1 ran
    final = json.loads((run_dir / "manifest.json").read_text())["heldout_loss"]
    assert manifest["heldout_loss"]["base"] == pytest.approx(final["base"], abs=1e-5)  # γ = 0 is θ0 again
    assert manifest["heldout_loss"]["stage1"] != final["stage1"]  # the 25% weights, not the final ones
    assert str(folder) in out
    for name in ("heatmap.png", "report.md", "ranking.csv", "config.yaml"):
        assert (folder / name).is_file()
    # a second time without --overwrite is refused; a milestone that was never saved names the saved ones
    code, _, err = cli(capsys, "-q", "identify", "--from-run", str(run_dir), "--milestone", "25")
    assert_one_line_error(code, err, "already exists")
    code, _, err = cli(capsys, "-q", "identify", "--from-run", str(run_dir), "--milestone", "33")
    assert_one_line_error(code, err, "milestone 33 was not saved", "milestone-25", "milestone-75")
    assert not (run_dir / "milestone-33").exists()


# ----------------------------------------------------------------------------------------- reproducibility


def test_same_seed_same_ranking(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, fast_overrides: list[str]
) -> None:
    def identify(seed: int, name: str):
        extra = {
            "model": {"name": str(tiny_model_dir)},
            "data": {"path": str(tiny_data)},
            "run": {"seed": seed, "output": str(tmp_path / name)},
        }
        return run_identify(load_config(IdentifyConfig, overrides=fast_overrides, extra=extra))

    first, again, other = identify(0, "a"), identify(0, "b"), identify(1, "c")
    assert first.ranking.names() == again.ranking.names()
    assert [e.score for e in first.ranking.layers] == [e.score for e in again.ranking.layers]
    assert first.stage1 is not None and again.stage1 is not None and other.stage1 is not None
    assert first.stage1.loop.losses == again.stage1.loop.losses
    assert first.heldout == again.heldout
    assert first.stage1.loop.losses != other.stage1.loop.losses  # the seed is really used
    assert [e.score for e in first.ranking.layers] != [e.score for e in other.ranking.layers]


def test_repeats_give_rank_intervals_and_repeat_0_is_the_default_run(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, fast_overrides: list[str]
) -> None:
    def identify(name: str, repeats: int):
        extra = {
            "model": {"name": str(tiny_model_dir)},
            "data": {"path": str(tiny_data)},
            "run": {"seed": 0, "output": str(tmp_path / name)},
            "stage2": {"repeats": repeats},
        }
        return run_identify(load_config(IdentifyConfig, overrides=fast_overrides, extra=extra))

    single, repeated = identify("one", 1), identify("three", 3)
    repeats = repeated.ranking.info["repeats"]
    assert repeats["n"] == 3 and len(set(repeats["seeds"])) == 3  # three different batch orders
    by_name = {e.name: e.score for e in single.ranking.layers}
    assert repeats["scores"][0] == pytest.approx(by_name, abs=0)  # repeat 0 is exactly the default run
    assert repeats["scores"][1] != repeats["scores"][0]
    assert set(repeats["top_overlap"]) == {"10", "25", "30", "50"}
    assert all(0.0 <= v <= 1.0 for v in repeats["top_overlap"].values())
    for entry in repeated.ranking.layers:
        assert entry.rank_low is not None and entry.rank_high is not None
        assert 1 <= entry.rank_low <= entry.rank_high <= N_LAYERS
    mean = {name: sum(r[name] for r in repeats["scores"]) / 3 for name in by_name}
    assert [e.score for e in repeated.ranking.layers] == pytest.approx([mean[e.name] for e in repeated.ranking.layers])
    with (tmp_path / "three" / "ranking.csv").open(encoding="utf-8") as handle:
        assert {"rank_low", "rank_high"} <= set(next(csv.DictReader(handle)))
    for repeat in range(3):  # each repeat's convergence trace
        with (tmp_path / "three" / "stage2" / f"repeat-{repeat}" / "trace.csv").open(encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and {"mean_gamma", "topk_jaccard"} <= set(rows[0])


def test_repeat_stage1_reruns_both_stages_from_the_base_model(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, fast_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["-q", "identify", "--model", str(tiny_model_dir), "--data", str(tiny_data)]
    both = ["--output", str(tmp_path / "both"), "--repeats", "2", "--repeat-stage1"]
    code, out, _ = cli(capsys, *base, *both, *fast_overrides, "stage1.seed=5", "stage2.seed=11")
    assert code == 0 and "stage 1 seed and stage 2 batch order" in out
    # each repeat must equal a run of its own: the second Stage 1 starts again from the untouched base model
    for name, (seed1, seed2) in (("first", (5, 11)), ("second", (6, 12))):
        seeds = [f"stage1.seed={seed1}", f"stage2.seed={seed2}"]
        assert cli(capsys, *base, "--output", str(tmp_path / name), *fast_overrides, *seeds)[0] == 0
    info = json.loads((tmp_path / "both" / "ranking.json").read_text(encoding="utf-8"))["info"]
    repeats = info["repeats"]
    assert (repeats["n"], repeats["stage1_runs"], repeats["stage2_runs"]) == (2, 2, 1)
    assert [run["seed"] for run in repeats["stage1"]] == [5, 6] and repeats["seeds"] == [11, 12]
    for i, name in enumerate(("first", "second")):
        single = json.loads((tmp_path / name / "ranking.json").read_text(encoding="utf-8"))
        assert repeats["scores"][i] == {e["name"]: e["score"] for e in single["layers"]}
        assert repeats["stage1"][i]["heldout_stage1"] == single["info"]["heldout_loss"]["stage1"]
    assert repeats["scores"][0] != repeats["scores"][1]
    mean_stage1 = (repeats["stage1"][0]["heldout_stage1"] + repeats["stage1"][1]["heldout_stage1"]) / 2
    assert info["heldout_loss"]["stage1"] == pytest.approx(mean_stage1)
    for folder in ("stage1/adapter", "stage1-1/adapter", "stage2", "stage2-1"):
        assert (tmp_path / "both" / folder).is_dir()
    first = load_file(str(tmp_path / "both" / "stage1" / "adapter" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "both" / "stage1-1" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert "Stage-1 seed 6 (`stage1-1/`)" in (tmp_path / "both" / "report.md").read_text(encoding="utf-8")


def test_repeat_stage1_needs_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "identify", "--repeat-stage1")
    assert_one_line_error(code, err, "--repeat-stage1 needs --repeats N")


def test_runs_on_two_data_sets_do_not_share_seeds() -> None:
    from ila.stages import stage1_seed, stage2_seed

    cfg = load_config(IdentifyConfig)
    data_a = type("D", (), {"stats": type("S", (), {"fingerprint": "aaa"})()})()
    data_b = type("D", (), {"stats": type("S", (), {"fingerprint": "bbb"})()})()
    assert stage1_seed(cfg, data_a) != stage1_seed(cfg, data_b)  # type: ignore[arg-type]
    assert stage2_seed(cfg, data_a, "final", 0) != stage2_seed(cfg, data_a, "milestone-25", 0)  # type: ignore[arg-type]
    pinned = load_config(IdentifyConfig, overrides=["stage1.seed=7", "stage2.seed=9"])
    assert stage1_seed(pinned, data_a) == stage1_seed(pinned, data_b) == 7  # type: ignore[arg-type]
    assert stage2_seed(pinned, data_a, "final", 1) == stage2_seed(pinned, data_b, "milestone-25", 1) == 10  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv", [["--help"], ["identify", "--help"], ["layers", "--help"]])
def test_help_exits_zero(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "ila", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: ila" in done.stdout
    if argv[0] == "identify":
        assert "--from-run" in done.stdout and "examples:" in done.stdout


def test_layers_command(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path) -> None:
    code, out, _ = cli(capsys, "-q", "layers", "--model", str(tiny_model_dir), "--names")
    assert code == 0
    assert "28 linear layers in 4 blocks" in out
    names = [line.split("\t")[0] for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(names) == N_LAYERS and names[0] == "model.layers.0.self_attn.q_proj"
    code, out, _ = cli(capsys, "-q", "layers", "--model", str(tiny_model_dir), "--include-lm-head", "--names")
    assert code == 0 and "29 linear layers" in out and "\nlm_head\t" in out


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nan-llama")
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def bad_data(tmp_path: Path, kind: str) -> Path:
    good = json.dumps(make_rows(1)[0])
    if kind == "malformed":
        path = tmp_path / "bad.jsonl"
        path.write_text(f'{good}\n{good}\n{good}\n{{"instruction": "x",\n{good}\n', encoding="utf-8")
    elif kind == "missing_field":
        path = write_jsonl(tmp_path / "bad.jsonl", [*make_rows(3), {"instruction": "tell me"}])
    elif kind == "empty":
        path = tmp_path / "empty.jsonl"
        path.write_text("", encoding="utf-8")
    else:
        raise ValueError(kind)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "data not found",
        "malformed JSON line",
        "missing required field",
        "empty data set",
        "every example too long",
        "unknown config key",
        "wrong value type",
        "bad choice",
        "missing config file",
        "milestone without run",
        "override without value",
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_folder(
    case: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_data: Path,
    fast_overrides: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, data, extra, needles = str(tiny_model_dir), str(tiny_data), [], []
    if case == "missing model":
        model, needles = str(tmp_path / "no-such-model"), ["model not found", "no-such-model"]
    elif case == "data not found":
        data, needles = str(tmp_path / "nope.jsonl"), ["data file not found", "nope.jsonl"]
    elif case == "malformed JSON line":
        data = str(bad_data(tmp_path, "malformed"))
        needles = [f"{data}:4: malformed JSON"]
    elif case == "missing required field":
        data = str(bad_data(tmp_path, "missing_field"))
        extra, needles = ["data.format=alpaca"], [f"{data}:4", "missing required field 'output'"]
    elif case == "empty data set":
        data, needles = str(bad_data(tmp_path, "empty")), ["empty"]
    elif case == "every example too long":
        extra, needles = ["data.max_length=8", "data.min_response_tokens=2", "data.too_long=drop"], ["longer than"]
    elif case == "unknown config key":
        extra, needles = ["stage1.learning_rate=0.1"], ["unknown config key 'stage1.learning_rate'"]
    elif case == "wrong value type":
        extra, needles = ["stage2.steps=many"], ["stage2.steps='many' must be an integer"]
    elif case == "bad choice":
        extra, needles = ["stage2.sparsity=l1"], ["stage2.sparsity='l1'", "penalty"]
    elif case == "missing config file":
        extra, needles = ["--config", str(tmp_path / "run.yaml")], ["config file not found"]
    elif case == "milestone without run":
        extra, needles = ["--milestone", "25"], ["--from-run"]
    elif case == "override without value":
        extra, needles = ["stage1.lr"], ["section.key=value"]
    out = tmp_path / "run"
    code, _, err = cli(
        capsys, "-q", "identify", "--model", model, "--data", data, "--output", str(out), *fast_overrides, *extra
    )
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_existing_output_needs_overwrite(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, fast_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    argv = [
        "-q",
        "identify",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tiny_data),
        "--output",
        str(out),
        *fast_overrides,
    ]
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, err = cli(capsys, *argv, "--overwrite")  # not ila's folder: --overwrite must not delete it
    assert_one_line_error(code, err, str(out), "holds no ila run")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert cli(capsys, *argv)[0] == 0
    (out / "stray.txt").write_text("made inside ila's run folder")
    assert cli(capsys, *argv, "--overwrite")[0] == 0  # ila's own run folder is replaced whole
    assert (out / "ranking.json").is_file() and not (out / "stray.txt").exists()


def run_ila(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # a stray warning must not slip onto stderr unnoticed
    return subprocess.run([sys.executable, "-m", "ila", *argv], capture_output=True, text=True, timeout=120, env=env)


def test_real_process_malformed_data_one_line(tmp_path: Path, tiny_model_dir: Path, fast_overrides: list[str]) -> None:
    data, out = bad_data(tmp_path, "malformed"), tmp_path / "run"
    done = run_ila(
        "-q", "identify", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), *fast_overrides
    )
    assert_one_line_error(done.returncode, done.stderr, f"{data}:4: malformed JSON")
    assert done.stdout == ""
    assert not out.exists()


def test_non_finite_loss_names_the_step_and_marks_the_run_failed(
    tmp_path: Path, nan_model_dir: Path, tiny_data: Path, fast_overrides: list[str]
) -> None:
    out = tmp_path / "run"
    done = run_ila(
        "-q", "identify", "--model", str(nan_model_dir), "--data", str(tiny_data), "--output", str(out), *fast_overrides
    )
    assert_one_line_error(done.returncode, done.stderr, "non-finite loss", "at step 1", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert "step 1" in manifest["error"]
    assert not (out / "ranking.json").exists()


@pytest.mark.parametrize(
    ("error", "where"),
    [
        (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of GPU memory"),
        (lambda: MemoryError(), "out of CPU memory"),
    ],
)
def test_out_of_memory_mid_stage_is_one_line_and_keeps_the_checkpoint(
    error: Any,
    where: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_data: Path,
    fast_overrides: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory runs out at Stage-1 step 7: one line that says what to lower, the step-5 checkpoint intact."""
    import ila.stage1_lora
    from ila.checkpoints import load_checkpoint

    real_loss, calls = ila.stage1_lora.sft_loss, [0]

    def loss_then_oom(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 7:
            raise error()
        return real_loss(model, batch)

    monkeypatch.setattr(ila.stage1_lora, "sft_loss", loss_then_oom)
    out = tmp_path / "run"
    argv = ["-q", "identify", "--model", str(tiny_model_dir), "--data", str(tiny_data), *fast_overrides]
    code, _, err = cli(capsys, *argv, "run.checkpoint_every=5", "--output", str(out))
    line = assert_one_line_error(code, err, where, "batch_size", "run.gradient_checkpointing=true", "--resume")
    assert "Allocate" not in line  # the suggestion, not torch's message
    state = load_checkpoint(out / "stage1" / "checkpoint.pt")
    assert state is not None and state["step"] == 5
    monkeypatch.undo()
    code, _, err = cli(capsys, "-q", "identify", "--resume", str(out))
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
