"""Selection: top-K, fractions, freeze-bottom, parameter and memory budgets, per module type, the trainable share
and lowest block, impossible rules, the CLI."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from ila.cli import main
from ila.errors import IlaError
from ila.layers import Layer, discover_layers
from ila.ranking import Ranking, load_ranking, rank_layers
from ila.selection import (
    ModelShapes,
    SelectionRule,
    by_module_type,
    estimate_training_memory,
    load_selection,
    lora_param_count,
    parse_param_count,
    per_type_count,
    select,
    select_from_file,
    top,
)
from tiny_models import tiny_gpt2, tiny_llama


def random_ranking(layers: list[Layer], seed: int = 0, model: str | None = None) -> Ranking:
    rng = random.Random(seed)
    return rank_layers(layers, [rng.random() for _ in layers], "random", info={"model": model} if model else {})


@pytest.fixture(scope="module")
def llama() -> tuple[list[Layer], ModelShapes]:
    model = tiny_llama()
    return discover_layers(model), ModelShapes.of(model)


@pytest.fixture
def ranking_file(tmp_path: Path, tiny_model_dir: Path, llama: tuple[list[Layer], ModelShapes]) -> Path:
    random_ranking(llama[0], model=str(tiny_model_dir)).save(tmp_path)
    return tmp_path / "ranking.json"


def test_top_count_fraction_and_freeze_bottom(llama: tuple[list[Layer], ModelShapes]) -> None:
    layers, shapes = llama
    ranking = random_ranking(layers)
    by_count = select(ranking, top(12), shapes)
    assert set(by_count.names()) == set(ranking.top(12))
    order = [layer.name for layer in layers]
    assert by_count.names() == [n for n in order if n in set(by_count.names())]  # model order
    assert len(select(ranking, top(0.3), shapes).layers) == round(0.3 * len(layers))
    frozen = select(ranking, SelectionRule("freeze_bottom", 0.25), shapes)
    assert set(frozen.names()) == set(select(ranking, top(0.75), shapes).names())
    assert len(frozen.layers) == len(layers) - round(0.25 * len(layers))
    assert set(select(ranking, SelectionRule("freeze_bottom", 0.0), shapes).names()) == set(order)


def test_selection_reports_counts_and_depth(llama: tuple[list[Layer], ModelShapes]) -> None:
    layers, shapes = llama
    last_block = rank_layers(layers, [float(layer.block) for layer in layers], "last-k")
    selection = select(last_block, top(7), shapes, ranking_path="r.json")
    assert {layer.block for layer in selection.layers} == {3}
    assert selection.lowest_block == 3 and selection.backward_blocks == 1
    assert selection.trainable_params["full"] == sum(layer.n_params for layer in layers if layer.block == 3)
    assert selection.trainable_params["lora"] == sum(lora_param_count(la, 8) for la in layers if la.block == 3)
    assert all(s.module_type and s.block == 3 for s in selection.layers)
    assert selection.ranking_method == "last-k" and selection.ranking_path == "r.json"
    assert selection.n_layers == len(layers) and selection.n_blocks == 4
    assert selection.trainable_share is not None
    assert selection.trainable_share["full"] == pytest.approx(
        selection.trainable_params["full"] / sum(la.n_params for la in layers)
    )
    assert selection.trainable_share["lora"] == pytest.approx(
        selection.trainable_params["lora"] / sum(lora_param_count(la, 8) for la in layers)
    )
    summary = selection.summary()
    assert "25.0% of all linear-layer weights" in summary and "lowest selected block 3 of 4" in summary


def test_depth_costs_memory(llama: tuple[list[Layer], ModelShapes]) -> None:
    """Same size, different depth: backward through all blocks stores more activations than through one."""
    layers, shapes = llama
    rule = SelectionRule("memory_budget", 1.0, method="full")
    first = estimate_training_memory([la for la in layers if la.block == 0], shapes, rule)
    last = estimate_training_memory([la for la in layers if la.block == 3], shapes, rule)
    assert first["trainable_state_gb"] == last["trainable_state_gb"]
    assert first["activations_gb"] == pytest.approx(4 * last["activations_gb"])
    assert first["total_gb"] > last["total_gb"]
    # LoRA adds each adapted layer's dropout copy of its input and the mask: b·s·in values and bytes
    lora = estimate_training_memory([la for la in layers if la.block == 3], shapes, replace(rule, method="lora"))
    tokens = rule.batch_size * rule.seq_len
    extra = sum(la.in_features for la in layers if la.block == 3) * tokens * (rule.weight_bytes + 1) / 1024**3
    assert lora["activations_gb"] - last["activations_gb"] == pytest.approx(extra)
    no_dropout = replace(rule, method="lora", lora_dropout=0.0)
    assert (
        estimate_training_memory([la for la in layers if la.block == 3], shapes, no_dropout)["activations_gb"]
        == (last["activations_gb"])
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_estimate(llama: tuple[list[Layer], ModelShapes], method: str) -> None:
    """With checkpointing every block from the lowest selected one keeps only its input (b·s·h), and one block is
    recomputed at a time with all its activations (for LoRA, its adapters' dropout copies too): less than without
    for more than one block, and still a depth cost."""
    layers, shapes = llama
    plain = SelectionRule("all", method=method, batch_size=2, seq_len=64)  # type: ignore[arg-type]
    ckpt = replace(plain, gradient_checkpointing=True)
    tokens, gb = 2 * 64, 1024**3
    per_block = 34 * tokens * shapes.hidden_size * plain.weight_bytes / 2 / gb
    for lowest in range(4):
        chosen = [la for la in layers if la.block >= lowest]
        without = estimate_training_memory(chosen, shapes, plain)
        with_ = estimate_training_memory(chosen, shapes, ckpt)
        depth = 4 - lowest
        copies = [
            sum(la.in_features for la in chosen if la.block == b) * tokens * (plain.weight_bytes + 1) / gb
            for b in range(lowest, 4)
        ]
        recomputed = per_block + (max(copies) if method == "lora" else 0)
        kept = depth * tokens * shapes.hidden_size * plain.weight_bytes / gb
        assert with_["activations_gb"] == pytest.approx(kept + recomputed)
        assert without["activations_gb"] == pytest.approx(depth * per_block + (sum(copies) if method == "lora" else 0))
        assert {k: v for k, v in with_.items() if k not in ("activations_gb", "total_gb")} == {
            k: v for k, v in without.items() if k not in ("activations_gb", "total_gb")
        }
        if depth > 1:
            assert with_["total_gb"] < without["total_gb"]
    nothing = estimate_training_memory([], shapes, ckpt)
    assert nothing["activations_gb"] == 0


def test_select_cli_gradient_checkpointing(ranking_file: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    """`ila select` estimates with checkpointing on for qlora (ila's QLoRA default) and where asked, off otherwise."""

    def rule(*extra: str) -> SelectionRule:
        out = tmp_path / f"sel{len(list(tmp_path.glob('sel*.json')))}.json"
        assert main(["select", "--ranking", str(ranking_file), "--top", "0.5", "--output", str(out), *extra]) == 0
        selection = load_selection(out)
        assert selection.memory_estimate is not None
        assert ("gradient checkpointing" in selection.summary()) == selection.rule.gradient_checkpointing
        return selection.rule

    assert not rule().gradient_checkpointing
    assert rule("--method", "qlora").gradient_checkpointing
    assert not rule("--method", "qlora", "--no-gradient-checkpointing").gradient_checkpointing
    assert rule("--gradient-checkpointing").gradient_checkpointing


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_estimate_is_per_process(llama: tuple[list[Layer], ModelShapes], method: str) -> None:
    """Under N-way FSDP: fp32 master weights and training state split N ways, two whole blocks gathered at the
    compute precision, activations of the process's rows; one process is the unsharded estimate."""
    layers, shapes = llama
    chosen = [la for la in layers if la.block >= 2]
    one = estimate_training_memory(chosen, shapes, SelectionRule("all", method=method, batch_size=8))  # type: ignore[arg-type]
    four = estimate_training_memory(
        chosen,
        shapes,
        SelectionRule("all", method=method, batch_size=8, fsdp_processes=4),  # type: ignore[arg-type]
    )
    assert "gathered_blocks_gb" not in one
    assert four["weights_gb"] == pytest.approx(one["weights_gb"] * 2 / 4)  # fp32 instead of bf16, a quarter each
    if method == "lora":
        assert four["trainable_state_gb"] == pytest.approx(one["trainable_state_gb"] / 4)
    else:  # the gradient moves from bf16 to fp32 with the master weights
        assert four["trainable_state_gb"] == pytest.approx(one["trainable_state_gb"] * (4 + 8) / (2 + 8) / 4)
    assert four["activations_gb"] == pytest.approx(one["activations_gb"] / 4)  # 2 of 8 rows per process
    block = sum(la.n_params for la in layers if la.block == 0)
    assert four["gathered_blocks_gb"] == pytest.approx(2 * block * 2 / 1024**3)
    assert four["total_gb"] == pytest.approx(sum(v for k, v in four.items() if k != "total_gb"))
    with pytest.raises(IlaError, match="QLoRA does not run under FSDP"):
        SelectionRule("all", method="qlora", fsdp_processes=2)


@pytest.mark.parametrize("method,r", [("lora", 8), ("lora", 2), ("full", 8)])
@pytest.mark.parametrize("budget", [384, 1000, 3000, 10_000, 25_000, 10**9])
def test_param_budget_never_exceeded(llama: tuple[list[Layer], ModelShapes], method: str, r: int, budget: int) -> None:
    layers, shapes = llama
    by_name = {layer.name: layer for layer in layers}
    ranking = random_ranking(layers, seed=budget)
    rule = SelectionRule("param_budget", float(budget), method=method, lora_r=r)  # type: ignore[arg-type]

    def cost(name: str) -> int:
        return by_name[name].n_params if method == "full" else lora_param_count(by_name[name], r)

    smallest = min(cost(layer.name) for layer in layers)
    if budget < smallest:
        with pytest.raises(IlaError, match="below the smallest layer"):
            select(ranking, rule, shapes)
        return
    selection = select(ranking, rule, shapes)
    spent = sum(cost(name) for name in selection.names())
    assert 0 < spent <= budget
    assert spent == selection.trainable_params["full" if method == "full" else "lora"]
    left_out = [name for name in ranking.names() if name not in set(selection.names())]
    assert all(spent + cost(name) > budget for name in left_out)  # greedy skipping: nothing else would fit


# ------------------------------------------------------------------------------------------------- per type


def per_type_names(ranking: Ranking, module_type: str) -> list[str]:
    return [e.name for e in ranking.layers if e.module_type == module_type]


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_fraction_per_type_takes_the_share_of_each_type_in_ranking_order(
    llama: tuple[list[Layer], ModelShapes], fraction: float, seed: int
) -> None:
    layers, shapes = llama  # 4 blocks x 7 module types
    ranking = random_ranking(layers, seed)
    selection = select(ranking, SelectionRule("top_fraction", fraction, per_type=True), shapes)
    chosen = set(selection.names())
    types = {layer.module_type for layer in layers}
    expected = max(1, math.floor(fraction * 4 + 1e-9))  # rounded down, at least one per type
    for module_type in types:
        ordered = per_type_names(ranking, module_type)
        assert [n for n in ordered if n in chosen] == ordered[:expected]  # the type's best, by the ranking
    assert len(chosen) == expected * len(types)
    assert selection.rule.per_type and "of each module type" in selection.description


def test_top_half_per_type_differs_from_global_top_half(llama: tuple[list[Layer], ModelShapes]) -> None:
    layers, shapes = llama
    # a ranking that puts every MLP layer first: globally the top 50% is 12 MLP layers and 2 others, per type it
    # is 2 of each type
    ranking = rank_layers(layers, [float(la.module_type.startswith("mlp")) + la.block / 10 for la in layers], "mlp")
    per_type = select(ranking, SelectionRule("top_fraction", 0.5, per_type=True), shapes)
    assert {la.module_type for la in per_type.layers} == {la.module_type for la in layers}
    assert all(sum(s.module_type == t for s in per_type.layers) == 2 for t in {la.module_type for la in layers})
    assert {s.block for s in per_type.layers} == {2, 3}  # within each type, this ranking prefers deep blocks
    assert per_type.lowest_block == 2 and per_type.backward_blocks == 2
    globally = select(ranking, top(0.5), shapes)
    assert sum(s.module_type.startswith("mlp") for s in globally.layers) == 12


def test_count_and_freeze_bottom_per_type(llama: tuple[list[Layer], ModelShapes]) -> None:
    layers, shapes = llama
    ranking = random_ranking(layers, seed=5)
    types = {layer.module_type for layer in layers}
    by_count = select(ranking, SelectionRule("top_count", 3.0, per_type=True), shapes)
    for module_type in types:
        assert [n for n in per_type_names(ranking, module_type) if n in set(by_count.names())] == per_type_names(
            ranking, module_type
        )[:3]
    for frozen in (0.0, 0.25, 0.5, 0.7, 0.99):  # the frozen count per type is rounded down: each type keeps >= 1
        kept = select(ranking, SelectionRule("freeze_bottom", frozen, per_type=True), shapes)
        keep = 4 - math.floor(frozen * 4 + 1e-9)
        for module_type in types:
            ordered = per_type_names(ranking, module_type)
            assert [n for n in ordered if n in set(kept.names())] == ordered[:keep]
    with pytest.raises(IlaError, match="allowed: 1 to 4"):
        select(ranking, SelectionRule("top_count", 5.0, per_type=True), shapes)


def test_per_type_count_rounds_down_with_at_least_one() -> None:
    assert per_type_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert per_type_count(0.3, 32) == 9  # Spectrum: int(32 * 30 / 100)
    assert per_type_count(0.01, 4) == 1  # Spectrum would take none
    assert per_type_count(1.0, 7) == 7


@pytest.mark.parametrize("method,r", [("lora", 8), ("full", 8)])
@pytest.mark.parametrize("budget", [2000, 4096, 6000, 9000, 20_000, 40_000, 10**9])
def test_param_budget_per_type_never_exceeds_the_budget_or_a_types_share(
    llama: tuple[list[Layer], ModelShapes], method: str, r: int, budget: int
) -> None:
    layers, shapes = llama
    by_name = {layer.name: layer for layer in layers}
    ranking = random_ranking(layers, seed=budget % 97)
    rule = SelectionRule("param_budget", float(budget), method=method, lora_r=r, per_type=True)  # type: ignore[arg-type]

    def cost(name: str) -> int:
        return by_name[name].n_params if method == "full" else lora_param_count(by_name[name], r)

    types = {layer.module_type for layer in layers}
    size = {t: sum(cost(la.name) for la in layers if la.module_type == t) for t in types}
    total = sum(size.values())
    smallest = {t: min(cost(la.name) for la in layers if la.module_type == t) for t in types}
    need = max(math.ceil(smallest[t] * total / size[t]) for t in types)
    if budget < need:
        with pytest.raises(IlaError, match=f"at least {need:,}") as err:
            select(ranking, rule, shapes)
        assert "\n" not in str(err.value)
        return
    selection = select(ranking, rule, shapes)
    spent = {t: sum(cost(s.name) for s in selection.layers if s.module_type == t) for t in types}
    assert sum(spent.values()) <= budget
    assert sum(spent.values()) == selection.trainable_params["full" if method == "full" else "lora"]
    for t in types:
        assert 0 < spent[t] <= budget * size[t] / total  # every type gets a layer, none more than its share
        ordered = per_type_names(ranking, t)
        taken = [n for n in ordered if n in set(selection.names())]
        left = [n for n in ordered if n not in set(taken)]
        assert all(spent[t] + cost(n) > budget * size[t] // total for n in left)  # greedy: nothing else fits


def test_param_budget_per_type_threshold_is_exact(llama: tuple[list[Layer], ModelShapes]) -> None:
    layers, shapes = llama
    ranking = random_ranking(layers)
    with pytest.raises(IlaError, match=r"at least ([\d,]+)") as err:
        select(ranking, SelectionRule("param_budget", 1000.0, per_type=True), shapes)
    need = int(str(err.value).split("at least ")[1].split(" ")[0].replace(",", ""))
    assert len(select(ranking, SelectionRule("param_budget", float(need), per_type=True), shapes).layers) == 7
    with pytest.raises(IlaError, match="below its smallest layer"):
        select(ranking, SelectionRule("param_budget", float(need - 1), per_type=True), shapes)


def test_memory_budget_per_type_is_refused() -> None:
    with pytest.raises(IlaError, match="does not apply to a memory budget") as err:
        SelectionRule("memory_budget", 1.0, per_type=True)
    assert "\n" not in str(err.value)


def test_old_selection_files_without_a_share_still_load(tmp_path: Path, ranking_file: Path) -> None:
    selection = select_from_file(ranking_file, top(3))
    data = selection.to_dict()
    del data["trainable_share"]
    data["rule"].pop("per_type")
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = load_selection(tmp_path / "old.json")
    assert old.trainable_share is None and old.rule.per_type is False and old.names() == selection.names()
    assert "lowest selected block" in old.summary()


@pytest.mark.parametrize("budget_gb", [0.0022, 0.003, 0.004, 0.05])
def test_memory_budget_never_exceeded(llama: tuple[list[Layer], ModelShapes], budget_gb: float) -> None:
    layers, shapes = llama
    ranking = random_ranking(layers, seed=3)
    selection = select(ranking, SelectionRule("memory_budget", budget_gb), shapes)
    assert selection.memory_estimate is not None
    assert 0 < selection.memory_estimate["total_gb"] <= budget_gb
    chosen = [layer for layer in layers if layer.name in set(selection.names())]
    again = estimate_training_memory(chosen, shapes, selection.rule)["total_gb"]
    assert again == pytest.approx(selection.memory_estimate["total_gb"])


@pytest.mark.parametrize(
    "rule,message",
    [
        (top(29), "only 28 layers"),
        (top(0), "whole number"),
        (SelectionRule("top_fraction", -0.1), "fraction"),
        (SelectionRule("top_fraction", 1.5), "fraction"),
        (SelectionRule("freeze_bottom", 1.0), "frozen fraction"),
        (SelectionRule("freeze_bottom", -0.2), "frozen fraction"),
        (SelectionRule("freeze_bottom", 0.99), "freezes all"),
        (SelectionRule("param_budget", 100.0), "below the smallest layer"),
        (SelectionRule("param_budget", 100.0, method="full"), "below the smallest layer"),
        (SelectionRule("param_budget", -5.0), "must be > 0"),
        (SelectionRule("memory_budget", 1e-9), "below the frozen model"),
        (SelectionRule("memory_budget", 0.0), "must be > 0"),
    ],
)
def test_impossible_selections_are_one_line_errors(
    llama: tuple[list[Layer], ModelShapes], rule: SelectionRule, message: str
) -> None:
    layers, shapes = llama
    with pytest.raises(IlaError, match=message) as err:
        select(random_ranking(layers), rule, shapes)
    assert "\n" not in str(err.value)


def test_without_shapes_lora_counts_are_unknown(llama: tuple[list[Layer], ModelShapes]) -> None:
    layers, _ = llama
    ranking = random_ranking(layers)
    selection = select(ranking, top(5))
    assert selection.trainable_params["lora"] is None and selection.memory_estimate is None
    assert selection.trainable_params["full"] == sum(e.n_params for e in ranking.layers[:5])
    with pytest.raises(IlaError, match="--model"):
        select(ranking, SelectionRule("param_budget", 5000.0))
    with pytest.raises(IlaError, match="--model"):
        select(ranking, SelectionRule("memory_budget", 1.0))
    assert select(ranking, SelectionRule("param_budget", 5000.0, method="full")).trainable_params["full"] <= 5000


def test_ranking_of_another_model_is_refused(llama: tuple[list[Layer], ModelShapes]) -> None:
    gpt2 = tiny_gpt2()
    with pytest.raises(IlaError, match="does not match the model"):
        select(random_ranking(llama[0]), top(3), ModelShapes.of(gpt2))


def test_save_and_load_round_trip(tmp_path: Path, ranking_file: Path) -> None:
    selection = select_from_file(ranking_file, SelectionRule("param_budget", 4000.0, lora_r=4))
    assert selection.model is not None and selection.trainable_params["lora"] is not None
    selection.save(tmp_path / "selection.json")
    loaded = load_selection(tmp_path / "selection.json")
    assert loaded.to_dict() == selection.to_dict()
    with pytest.raises(IlaError, match="not found"):
        load_selection(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"layers": []}')
    with pytest.raises(IlaError, match="not a valid ila selection"):
        load_selection(tmp_path / "bad.json")


def test_parse_param_count() -> None:
    assert parse_param_count("1.5M") == 1_500_000
    assert parse_param_count("300k") == 300_000
    assert parse_param_count("2e6") == 2_000_000
    assert parse_param_count("1,000") == 1000
    with pytest.raises(IlaError):
        parse_param_count("lots")


def test_cli_select(tmp_path: Path, ranking_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sel.json"
    assert main(["-q", "select", "--ranking", str(ranking_file.parent), "--top", "0.25", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["n_selected"] == 7 and data["rule"]["kind"] == "top_fraction" and data["lowest_block"] is not None
    assert data["trainable_params"]["lora"] > 0 and data["memory_estimate_gb"]["total_gb"] > 0
    assert main(["-q", "select", "--ranking", str(ranking_file), "--param-budget", "3k", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "-q",
                "select",
                "--ranking",
                str(ranking_file),
                "--param-budget",
                "3k",
                "--method",
                "full",
                "--output",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["trainable_params"]["full"] <= 3000


@pytest.mark.parametrize(
    "args",
    [
        ["--top", "40"],
        ["--top", "1.5"],
        ["--top", "many"],
        ["--freeze-bottom", "1"],
        ["--param-budget", "10"],
        ["--memory-budget", "0"],
        ["--param-budget", "10", "--per-type"],
        ["--param-budget", "3000", "--per-type"],
        ["--memory-budget", "1", "--per-type"],
        ["--top", "5", "--per-type"],
    ],
)
def test_cli_impossible_selection_exits_2_with_one_line(
    tmp_path: Path, ranking_file: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sel.json"
    assert main(["-q", "select", "--ranking", str(ranking_file), *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ila: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_cli_select_needs_one_rule(ranking_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--ranking", str(ranking_file), "--output", "x.json"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_cli_select_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--param-budget" in out and "--per-type" in out and "examples:" in out


def test_cli_select_per_type_and_budget_print_share_and_lowest_block(
    tmp_path: Path, ranking_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ranking = load_ranking(ranking_file)
    out = tmp_path / "sel.json"
    code = main(["-q", "select", "--ranking", str(ranking_file), "--top", "0.5", "--per-type", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    assert data["rule"]["per_type"] is True and data["n_selected"] == 14
    for module_type in {e.module_type for e in ranking.layers}:
        best = per_type_names(ranking, module_type)[:2]
        assert sorted(e["name"] for e in data["layers"] if e["module_type"] == module_type) == sorted(best)
    assert f"lowest selected block {data['lowest_block']} of 4" in printed
    assert f"{data['trainable_share']['full']:.1%} of all linear-layer weights" in printed
    for budget in ("2500", "4k", "9000"):  # greedy budgets: never above N, share and lowest block printed
        args = ["--param-budget", budget, "--output", str(out), "--overwrite"]
        code = main(["-q", "select", "--ranking", str(ranking_file), *args])
        printed = capsys.readouterr().out
        data = json.loads(out.read_text())
        assert code == 0 and 0 < data["trainable_params"]["lora"] <= parse_param_count(budget)
        assert data["lowest_block"] == min(e["block"] for e in data["layers"])
        assert "of an all-layer adapter" in printed and "lowest selected block" in printed


# -------------------------------------------------------------------------------------- LoRA ranks from scores


def with_gamma(layers: list[Layer], scores: list[float]) -> Ranking:
    """A ranking with ILA's mask values γ = σ(score)."""
    return rank_layers(layers, scores, "ila", gammas=[1 / (1 + math.exp(-x)) for x in scores])


def ila_like_ranking(layers: list[Layer], seed: int = 0) -> Ranking:
    rng = random.Random(seed)
    return with_gamma(layers, [rng.uniform(-4, 4) for _ in layers])


@pytest.mark.parametrize("share", [0.15, 0.3, 0.5, 1.0, 3.0])
def test_lora_ranks_follow_the_scores_and_never_exceed_the_budget(
    llama: tuple[list[Layer], ModelShapes], share: float
) -> None:
    layers, shapes = llama
    ranking = ila_like_ranking(layers, seed=int(share * 10))
    everything = sum(lora_param_count(layer, 8) for layer in layers)
    budget = share * everything
    selection = select(ranking, SelectionRule("lora_ranks", budget), shapes)
    ranks = selection.lora_ranks()
    assert ranks is not None and set(ranks) == {layer.name for layer in layers}  # every layer keeps an adapter
    by_name = {layer.name: layer for layer in layers}
    spent = sum(lora_param_count(by_name[name], r) for name, r in ranks.items())
    assert spent == selection.trainable_params["lora"] and 0 < spent <= budget
    assert set(ranks.values()) <= {1, 2, 4, 8, 16, 32}
    # a higher γ never gets a smaller rank (same shapes within a module type)
    for entries in by_module_type(ranking.layers).values():
        ordered = sorted(entries, key=lambda e: e.gamma or 0.0)
        assert [ranks[e.name] for e in ordered] == sorted(ranks[e.name] for e in ordered)
    # the budget is used: rounding moves ranks by factors of 2, so at least about a third of it is spent
    most = sum(lora_param_count(layer, 32) for layer in layers)
    assert spent >= 0.35 * min(budget, most)
    assert "every layer" not in selection.description and "all " in selection.description


def test_lora_ranks_planted_signal_puts_the_large_ranks_on_the_important_layers(
    llama: tuple[list[Layer], ModelShapes],
) -> None:
    layers, shapes = llama
    important = {layer.name for layer in layers if layer.module_type.endswith(("v_proj", "down_proj"))}
    ranking = with_gamma(layers, [4.0 if layer.name in important else -4.0 for layer in layers])
    budget = 0.5 * sum(lora_param_count(layer, 8) for layer in layers)
    ranks = select(ranking, SelectionRule("lora_ranks", budget), shapes).lora_ranks()
    assert ranks is not None
    assert min(ranks[name] for name in important) > max(r for name, r in ranks.items() if name not in important)
    assert min(ranks.values()) == 1


def test_lora_ranks_refuse_an_impossible_budget_and_full(llama: tuple[list[Layer], ModelShapes]) -> None:
    layers, shapes = llama
    floor = sum(lora_param_count(layer, 1) for layer in layers)
    with pytest.raises(IlaError, match="below every layer at rank 1"):
        select(ila_like_ranking(layers), SelectionRule("lora_ranks", floor - 1), shapes)
    with pytest.raises(IlaError, match="not with --per-type or --method full"):
        SelectionRule("lora_ranks", 1e6, method="full")


def test_cli_select_lora_ranks_round_trips(
    tmp_path: Path, tiny_model_dir: Path, llama: tuple[list[Layer], ModelShapes]
) -> None:
    ila_like_ranking(llama[0]).save(tmp_path)
    ranking = tmp_path / "ranking.json"
    data = json.loads(ranking.read_text(encoding="utf-8"))
    data["info"]["model"] = str(tiny_model_dir)
    ranking.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "sel.json"
    assert (
        main(
            [
                "select",
                "--ranking",
                str(ranking),
                "--lora-ranks",
                "30%",
                "--rank-choices",
                "1,2,4,8,16",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    selection = load_selection(out)
    ranks = selection.lora_ranks()
    assert ranks is not None and set(ranks.values()) <= {1, 2, 4, 8, 16}
    everything = sum(lora_param_count(layer, 8) for layer in llama[0])
    assert selection.trainable_params["lora"] <= 0.3 * everything
    assert selection.rule.rank_choices == (1, 2, 4, 8, 16)
