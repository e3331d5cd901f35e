"""`ila experiment`: a tiny grid runs end to end, a rerun recomputes nothing, an interrupted one resumes."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import ila.commands.identify
from ila.cli import main
from ila.commands.experiment import run_experiment
from ila.errors import IlaError
from ila.experiment_plan import load_experiment, planned_units
from ila.experiment_report import ablation_table, paired_differences
from ila.ranking import load_ranking
from tiny_models import make_rows, write_jsonl


def write_grid(folder: Path, model_dir: Path, data_a: Path) -> Path:
    write_jsonl(folder / "b.jsonl", make_rows(40)[::-1])
    grid = {
        "model": str(model_dir),
        "datasets": {"a": str(data_a), "b": "b.jsonl"},  # b: relative to the YAML's folder
        "seeds": [0, 1],
        "milestones": [50, 100],
        "rankings": ["ila", "random", "last"],
        "k_percents": [25, 50],
        "threads": 1,
        "identify": {
            "stage1.max_steps": 4,
            "stage1.window": 2,
            "stage1.batch_size": 4,
            "stage1.lr": "1e-2",
            "stage1.stop_rule": "steps",
            "stage2": {"steps": 2, "batch_size": 4},
            "data.max_length": 48,
            "run.checkpoint_every": 0,
        },
        "finetune": {
            "steps": 2,
            "rules": ["top", "all"],
            "fractions": [0.3],
            "rankings": ["ila"],
            "overrides": {"finetune.eval_every": 1, "finetune.warmup_steps": 0},
        },
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid), encoding="utf-8")
    return path


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the identify, milestone, rank and finetune calls the experiment makes."""
    import ila.commands.finetune
    import ila.commands.rank

    calls = {"identify": 0, "milestone": 0, "rank": 0, "finetune": 0}
    for module, name, key in (
        (ila.commands.identify, "run_identify", "identify"),
        (ila.commands.identify, "run_milestone", "milestone"),
        (ila.commands.rank, "run_rank", "rank"),
        (ila.commands.finetune, "run_finetune", "finetune"),
    ):
        original = getattr(module, name)

        def spy(*args, _original=original, _key=key, **kwargs):  # type: ignore[no-untyped-def]
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def test_tiny_grid_end_to_end_rerun_and_resume(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, counted: dict[str, int]
) -> None:
    cfg = load_experiment(write_grid(tmp_path, tiny_model_dir, tiny_data))
    assert dict(cfg.datasets)["b"] == str((tmp_path / "b.jsonl").resolve())
    root = tmp_path / "exp"
    result = run_experiment(cfg, root)
    # 4 identify runs, 4 milestone rankings, random per seed (2) + last once, finetune top30-ila + all
    assert counted == {"identify": 4, "milestone": 4, "rank": 3, "finetune": 2}
    assert not result.missing
    walked = len(result.computed) + len(result.skipped)  # a seed-free baseline's folder is walked once per seed
    assert planned_units(cfg) == walked and len(result.computed) == 13  # the progress bar's total
    report = (root / "report.md").read_text(encoding="utf-8")
    for heading in (
        "## ila",
        "## random",
        "## last",
        "### Across data sets",
        "### Across seeds",
        "### Milestone vs final",
        "## Fine-tuning",
        "### Ablation: selected fraction",
    ):
        assert heading in report
    assert "| seed 0 | a vs b |" in report and "| a | seed 0 vs seed 1 |" in report
    assert "| a seed 0 | 50% vs final |" in report and "chance level" in report
    assert "## ila against the other methods" in report and "| last | ila b seed 1 vs last |" in report
    assert "| ila-top30 | top | ila | 0.30 |" in report and "| all | all |" in report
    assert (root / "ablation.png").is_file() and (root / "overlap.png").is_file() and (root / "profiles.png").is_file()
    assert "## Overview" in report
    assert "| fraction | ila |" in report and "| 0.30 | " in report and "| 1.00 | " in report
    assert (root / "identify" / "a-seed0" / "milestone-50" / "ranking.json").is_file()

    # again: nothing is recomputed
    before = dict(counted)
    again = run_experiment(cfg, root)
    assert counted == before and not again.computed and len(again.skipped) == planned_units(cfg)

    # the results kept without weights (experiments/keep_results.py) resume as a finished grid, same report
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "experiments" / "keep_results.py"
    kept = tmp_path / "kept"
    (root / "stale.png").write_bytes(b"")  # a figure the report does not show: not kept
    subprocess.run([sys.executable, str(script), str(root), str(kept)], check=True, capture_output=True)
    assert not list(kept.rglob("*.safetensors")) and (kept / "finetune.json").is_file()
    assert (kept / "overlap.png").is_file() and not (kept / "stale.png").exists()
    from_kept = run_experiment(cfg, kept)
    assert counted == before and not from_kept.computed
    assert (kept / "report.md").read_text(encoding="utf-8") == report

    # interrupted: one identify unit (with its milestone) and one finetune unit lost -> only those are redone
    shutil.rmtree(root / "identify" / "b-seed1")
    shutil.rmtree(root / "finetune" / "all")
    resumed = run_experiment(cfg, root)
    assert {k: counted[k] - before[k] for k in counted} == {"identify": 1, "milestone": 1, "rank": 0, "finetune": 1}
    assert sorted(Path(p).relative_to(root).as_posix() for p in resumed.computed) == [
        "finetune/all",
        "identify/b-seed1",
        "identify/b-seed1/milestone-50",
    ]


def test_unit_that_fails_once_is_redone_alone(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, counted: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = yaml.safe_load(write_grid(tmp_path, tiny_model_dir, tiny_data).read_text(encoding="utf-8"))
    raw.update(seeds=[0], rankings=["ila"], milestones=[100])
    del raw["finetune"]
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg = load_experiment(path)
    spy = ila.commands.identify.run_identify

    def fail_on_b(icfg, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(icfg.run.output).endswith("b-seed0"):
            raise KeyboardInterrupt  # the run is stopped while this unit computes
        return spy(icfg, *args, **kwargs)

    monkeypatch.setattr(ila.commands.identify, "run_identify", fail_on_b)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "exp")
    assert counted["identify"] == 1

    def ila_error_on_b(icfg, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(icfg.run.output).endswith("b-seed0"):
            raise IlaError("loss is not finite")
        return spy(icfg, *args, **kwargs)

    monkeypatch.setattr(ila.commands.identify, "run_identify", ila_error_on_b)
    failed = run_experiment(cfg, tmp_path / "exp")  # a failed unit is listed, the others go on
    assert counted["identify"] == 1 and not failed.computed and len(failed.missing) == 1
    assert "loss is not finite" in (tmp_path / "exp" / "report.md").read_text(encoding="utf-8")
    monkeypatch.setattr(ila.commands.identify, "run_identify", spy)
    resumed = run_experiment(cfg, tmp_path / "exp")
    assert counted["identify"] == 2
    assert [Path(p).name for p in resumed.computed] == ["b-seed0"] and not resumed.missing
    assert "| seed 0 | a vs b |" in (tmp_path / "exp" / "report.md").read_text(encoding="utf-8")


def test_old_key_names_still_read_with_a_warning(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_grid(tmp_path, tiny_model_dir, tiny_data)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["methods"] = raw.pop("rankings")
    raw["finetune"]["methods"] = raw["finetune"].pop("rankings")
    raw["finetune"]["transfer_methods"] = ["ila"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with caplog.at_level("WARNING"):
        cfg = load_experiment(old)
    new = load_experiment(path)
    assert new.finetune is not None and cfg == replace(new, finetune=replace(new.finetune, transfer_rankings=("ila",)))
    assert "methods is now spelled rankings" in caplog.text
    assert "finetune.transfer_methods is now spelled finetune.transfer_rankings" in caplog.text
    raw["rankings"] = raw["methods"]
    old.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(IlaError, match="give rankings only"):
        load_experiment(old)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"sedes": [0]}, "unknown config key 'sedes'"),
        ({"finetune": {"stpes": 2}}, "unknown config key 'finetune.stpes'"),
        ({"identify": {"stage1.max_stpes": 2}}, "unknown config key 'stage1.max_stpes'"),
        ({"rankings": ["ila", "magic"]}, "unknown method 'magic'"),
        ({"finetune": {"ranked_on": ["zzz"]}}, "finetune.ranked_on: 'zzz' is not a data set"),
        ({"finetune": {"param_rankings": ["grad-norm"]}}, "finetune.param_rankings: 'grad-norm' is not one of the"),
        # a data set's name becomes a folder name: it must not lead outside the experiment folder
        ({"datasets": {"../../escape": "b.jsonl"}}, "name '../../escape' is not allowed"),
        ({"datasets": {"/tmp/abs": "b.jsonl"}}, "name '/tmp/abs' is not allowed"),
    ],
)
def test_bad_config_is_one_line_error(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, edit: dict, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load(write_grid(tmp_path, tiny_model_dir, tiny_data).read_text(encoding="utf-8"))
    raw.update(edit)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(IlaError, match=message):
        load_experiment(path)
    assert main(["experiment", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_paper_small_config_loads() -> None:
    cfg = load_experiment(Path(__file__).parents[1] / "experiments" / "paper_small.yaml")
    assert cfg.model == "smollm2-135m-instruct" and len(cfg.seeds) == 2
    assert [name for name, _ in cfg.datasets] == ["lima", "alpaca_gpt4", "gsm8k"]
    assert cfg.finetune is not None and cfg.finetune.method == ("lora",)


def test_worth_it_config_loads_with_the_grid_the_issue_asks_for() -> None:
    from ila.experiment_plan import finetune_units, random_seeds, train_seeds

    cfg = load_experiment(Path(__file__).parents[1] / "experiments" / "worth_it.yaml")
    assert cfg.finetune is not None and cfg.finetune.method == ("lora", "full")
    units = finetune_units(cfg)
    labels = {u.label for u in units}
    assert labels == {
        "-",
        "ila",
        "ila@25",
        "delta-norm",
        "grad-norm",
        "spectrum per type",
        "random",
        "last",
        "ila from lima",
    }
    assert {u.fraction for u in units if u.rule == "top"} == {0.1, 0.3, 0.5} and train_seeds(cfg) == (0, 1, 2)
    # a parameter budget only for the rankings whose top layers hold another share of the parameters
    budgeted = {(u.training, u.label) for u in units if u.rule == "param-budget"}
    assert budgeted == {
        (training, label)
        for training in ("lora", "full")
        for label in ("ila", "ila@25", "delta-norm", "grad-norm", "ila from lima")
    }
    assert random_seeds(cfg) == [0, 1, 2]  # three permutations


def test_ablation_table_puts_freeze_bottom_on_the_fraction_axis_and_all_layers_at_one() -> None:
    def row(method: str, rule: str, fraction: float, loss: float) -> dict[str, object]:
        return {"method": method, "rule": rule, "fraction": fraction, "loss": loss, "median_step_s": 0.5}

    rows = [
        row("-", "all", 1.0, 1.0),
        row("ila", "freeze-bottom", 0.75, 1.1),
        row("ila", "top", 0.1, 1.3),
        row("random", "top", 0.1, 1.4),
    ]
    table = ablation_table(rows)
    assert table[0] == "| fraction | ila | random |"
    assert "| 0.10 | 1.3000 (0.50 s) | 1.4000 (0.50 s) |" in table
    assert "| 0.75 | 1.1000 (0.50 s) | - |" in table
    assert "| 1.00 | 1.0000 (0.50 s) | 1.0000 (0.50 s) |" in table


def test_train_seeds_added_later_reuse_the_first_runs_and_pair_the_baselines(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, counted: dict[str, int]
) -> None:
    import json

    raw = yaml.safe_load(write_grid(tmp_path, tiny_model_dir, tiny_data).read_text(encoding="utf-8"))
    raw.update(seeds=[0], rankings=["ila", "random"], milestones=[100])
    raw["finetune"].update(rules=["top"], rankings=["ila", "random"])
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    root = tmp_path / "exp"
    run_experiment(load_experiment(path), root)
    assert counted["finetune"] == 2

    raw["finetune"]["train_seeds"] = [0, 1]
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run_experiment(load_experiment(path), root)
    assert counted["finetune"] == 4  # only the seed-1 runs are new
    # seed 1 also draws its own random permutation (finetune.random_per_seed)
    assert sorted(Path(p).name for p in result.computed) == [
        "ila-top30-train-seed1",
        "random-seed1",
        "random-top30-train-seed1",
    ]
    runs = json.loads((root / "finetune.json").read_text(encoding="utf-8"))
    loss = {(r["method"], r["train_seed"]): r["loss"] for r in runs}
    assert loss[("ila", 0)] != loss[("ila", 1)]  # the train seed reaches the run
    diffs = [loss[("ila", s)] - loss[("random", s)] for s in (0, 1)]
    report = (root / "report.md").read_text(encoding="utf-8")
    assert "### ila against the baselines" in report and "mean over train seeds 0, 1" in report
    wins = sum(d < 0 for d in diffs)
    spread = abs(diffs[0] - diffs[1]) / 2**0.5  # the standard deviation of two values
    row = f"| top 0.30 | random | {sum(diffs) / 2:+.4f} | {spread:.4f} | {diffs[0]:+.4f}, {diffs[1]:+.4f} | {wins}/2 |"
    assert row in report


def test_paired_differences_pair_by_seed_and_count_wins() -> None:
    def row(method: str, seed: int, loss: float) -> dict[str, object]:
        return {"method": method, "rule": "top", "fraction": 0.3, "train_seed": seed, "loss": loss}

    rows = [row("ila", 0, 1.0), row("ila", 1, 2.0), row("last", 0, 1.5), row("last", 1, 1.75), row("random", 0, 0.5)]
    lines = paired_differences(rows)
    assert "| top 0.30 | last | -0.1250 | 0.5303 | -0.5000, +0.2500 | 1/2 |" in lines
    assert "| top 0.30 | random | +0.5000 | - | +0.5000 | 0/1 |" in lines  # only the seed both have


def test_rankings_from_another_data_set_select_for_the_transfer_test(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, counted: dict[str, int]
) -> None:
    import json

    raw = yaml.safe_load(write_grid(tmp_path, tiny_model_dir, tiny_data).read_text(encoding="utf-8"))
    raw.update(seeds=[0], rankings=["ila", "random"], milestones=[100])
    raw["finetune"].update(rules=["top"], rankings=["ila", "random"], data="a", ranked_on=["b", "a"])
    path = tmp_path / "transfer.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    root = tmp_path / "exp"
    run_experiment(load_experiment(path), root)
    # random reads no data: its ranking on b is its ranking on a, so only ila gets a transfer unit
    assert counted["finetune"] == 3
    assert sorted(p.name for p in (root / "finetune").iterdir() if p.name != "selections") == [
        "ila-top30",
        "ila-top30-from-b",
        "random-top30",
    ]
    chosen = json.loads((root / "finetune" / "ila-top30-from-b" / "selection.json").read_text(encoding="utf-8"))
    ranking_b = load_ranking(root / "identify" / "b-seed0" / "ranking.json")
    top = {e.name for e in ranking_b.layers[: chosen["n_selected"]]}
    assert {layer["name"] for layer in chosen["layers"]} == top  # b's ranking selected, a's data trained
    ranking_a = load_ranking(root / "identify" / "a-seed0" / "ranking.json")
    assert {e.name for e in ranking_a.layers[: chosen["n_selected"]]} != top  # so a's would have chosen otherwise
    manifest = json.loads((root / "finetune" / "ila-top30-from-b" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["data"]["source"] == str(tiny_data.resolve())
    report = (root / "report.md").read_text(encoding="utf-8")
    assert "| ila-top30-from-b | top | ila from b | 0.30 |" in report and "| top 0.30 | ila from b |" in report


def test_worth_it_grid_trains_each_method_draws_random_per_seed_and_prices_the_rankings(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, counted: dict[str, int]
) -> None:
    import json

    from ila.experiment_plan import finetune_units, walk_order
    from ila.experiment_report import ranking_cost
    from ila.selection import by_module_type, per_type_count

    raw = yaml.safe_load(write_grid(tmp_path, tiny_model_dir, tiny_data).read_text(encoding="utf-8"))
    raw.update(datasets={"a": str(tiny_data)}, seeds=[0], rankings=["ila", "random", "spectrum"], milestones=[50, 100])
    raw["finetune"].update(
        method=["lora", "full"],
        rules=["top", "param-budget", "lora-ranks", "all"],
        fractions=[0.5],
        param_fractions=[0.3],
        rankings=["ila", "ila@50", "random", "spectrum"],
        train_seeds=[0, 1],
        method_overrides={"full": {"finetune.lr": 3e-5}},
    )
    path = tmp_path / "worth.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg = load_experiment(path)
    root = tmp_path / "exp"
    result = run_experiment(cfg, root)
    assert not result.missing
    assert len(result.computed) == planned_units(cfg)
    # 2 trainings x (all + 4 rankings x 2 rules) + ILA's LoRA ranks, x 2 train seeds
    assert counted["finetune"] == (2 * 9 + 1) * 2
    # an interrupted grid has whole comparisons: all layers, the fraction, the ranks, then the parameter budget
    order = [(u.training, u.rule) for u in walk_order(cfg, finetune_units(cfg))]
    assert order == [
        ("lora", "all"),
        ("full", "all"),
        *[("lora", "top")] * 4,
        *[("full", "top")] * 4,
        ("lora", "lora-ranks"),
        *[("lora", "param-budget")] * 4,
        *[("full", "param-budget")] * 4,
    ]

    finetune = root / "finetune"
    full = json.loads((finetune / "full-ila-top50" / "manifest.json").read_text(encoding="utf-8"))
    assert full["method"] == "full" and full["config"]["finetune"]["method"] == "full"
    assert full["config"]["finetune"]["lr"] == 3e-5  # the full runs' own learning rate; LoRA keeps its default
    lora = json.loads((finetune / "ila-top50" / "manifest.json").read_text(encoding="utf-8"))
    assert lora["config"]["finetune"]["lr"] is None

    def chosen(name: str) -> dict[str, object]:
        return json.loads((finetune / name / "selection.json").read_text(encoding="utf-8"))

    # random: a new permutation per train seed; ila: one ranking for both
    assert chosen("random-top50")["layers"] != chosen("random-top50-train-seed1")["layers"]
    assert chosen("ila-top50")["layers"] == chosen("ila-top50-train-seed1")["layers"]
    # the milestone ranking selects from its own ranking
    milestone = load_ranking(root / "identify" / "a-seed0" / "milestone-50" / "ranking.json")
    picked = chosen("ila-m50-top50")
    assert (
        {layer["name"] for layer in picked["layers"]}
        == {  # type: ignore[index]
            e.name
            for e in milestone.layers[: picked["n_selected"]]  # type: ignore[misc]
        }
    )
    # spectrum selects within each module type: half of every type
    spectrum = load_ranking(root / "rank" / "spectrum" / "ranking.json")
    names = {layer["name"] for layer in chosen("spectrum-top50")["layers"]}  # type: ignore[index]
    for entries in by_module_type(spectrum.layers).values():
        assert sum(e.name in names for e in entries) == per_type_count(0.5, len(entries))
    # a parameter budget counts the training method's parameters and is never exceeded
    for prefix, key in (("", "lora"), ("full-", "full")):
        everything = chosen(f"{prefix}all")["trainable_params"][key]  # type: ignore[index]
        for method in ("ila", "random", "spectrum"):
            budgeted = chosen(f"{prefix}{method}-params30")["trainable_params"][key]  # type: ignore[index]
            assert 0 < budgeted <= 0.3 * everything
    # ranks from scores: every layer, within the same LoRA budget as ila-params30
    ranks = chosen("ila-ranks30")
    assert ranks["n_selected"] == ranks["n_layers"]
    assert 0 < ranks["trainable_params"]["lora"] <= 0.3 * chosen("all")["trainable_params"]["lora"]  # type: ignore[index]
    assert len({layer["lora_r"] for layer in ranks["layers"]}) > 1  # type: ignore[index]

    report = (root / "report.md").read_text(encoding="utf-8")
    assert "### Ablation: selected fraction (lora)" in report and (root / "ablation-full.png").is_file()
    assert "| lora top 0.50 | random |" in report and "| full param-budget 0.30 | spectrum per type |" in report
    runs = json.loads((root / "finetune.json").read_text(encoding="utf-8"))
    loss = {(r["unit"], r["train_seed"]): r["loss"] for r in runs}
    diffs = [loss[("ila-ranks30", s)] - loss[("ila-params30", s)] for s in (0, 1)]
    assert "### LoRA ranks from scores against top layers at the same budget" in report
    assert f"| lora 0.30 | ila | {sum(diffs) / 2:+.4f} |" in report
    assert "### Cost" in report and "| ila@50 |" in report and "2 data sets x" in report
    whole, early = ranking_cost(cfg, root, "ila", 100, "a"), ranking_cost(cfg, root, "ila", 50, "a")
    identify = json.loads((root / "identify" / "a-seed0" / "manifest.json").read_text(encoding="utf-8"))
    assert whole == identify["timings"]["total"]
    # the milestone ranking: Stage 1 up to the milestone's step (step 2 of 4 here), then its own run (no timing race)
    own = json.loads((root / "identify" / "a-seed0" / "milestone-50" / "manifest.json").read_text(encoding="utf-8"))
    stage1 = identify["timings"]["stage 1"] * 2 / identify["stage1"]["steps"]
    assert identify["stage1"]["steps"] == 4 and early == pytest.approx(stage1 + own["timings"]["total"])


def test_rules_keep_their_old_spelling_with_a_note(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = yaml.safe_load(write_grid(tmp_path, tiny_model_dir, tiny_data).read_text(encoding="utf-8"))
    raw["finetune"].update(rules=["top", "params", "ranks"], param_fractions=[0.3])
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg = load_experiment(path)
    assert cfg.finetune is not None and cfg.finetune.rules == ("top", "param-budget", "lora-ranks")
    assert "now spelled" in caplog.text
    raw["finetune"].update(rules=["top", "budget"])
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(IlaError, match="unknown rule 'budget'"):
        load_experiment(path)
