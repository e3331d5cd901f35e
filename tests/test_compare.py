"""Ranking comparison: Jaccard, chance level and p-value against hand computation and simulation, correlations,
the stable core, mapping across models, the type-matched chance level, the noise floor, the written files and
`ila compare`."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from ila.cli import main
from ila.commands.compare import compare_files, write_comparison
from ila.compare import (
    MAPPING_NAMES,
    MAPPING_TYPE_DEPTH,
    SEED_HINT,
    chance_jaccard,
    compare_rankings,
    depth_band,
    expected_core,
    jaccard,
    k_for_percent,
    overlap_distribution,
    overlap_p_value,
    parse_k_percents,
)
from ila.errors import IlaError
from ila.layers import Layer, discover_layers
from ila.ranking import Ranking, rank_layers
from ila.ranking_methods import rank_by_depth, rank_random
from tiny_models import VOCAB_SIZE, tiny_gpt2, tiny_llama


def synthetic_layers(n: int) -> list[Layer]:
    return [Layer(f"blocks.{i}.proj", i, "proj", 4, 4) for i in range(n)]


TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def typed_layers(n_blocks: int, types: tuple[str, ...] = TYPES) -> list[Layer]:
    return [Layer(f"model.layers.{b}.{t}", b, t, 4, 4) for b in range(n_blocks) for t in types]


def ranking_from_order(
    layers: list[Layer], order: list[int], method: str = "m", info: dict[str, object] | None = None
) -> Ranking:
    """A ranking in which layers[order[0]] is best, layers[order[1]] second, ..."""
    scores = [0.0] * len(layers)
    for position, index in enumerate(order):
        scores[index] = float(len(order) - position)
    return rank_layers(layers, scores, method, info=info)


# ------------------------------------------------------------------------------------------------ statistics


def test_jaccard_chance_and_p_value_by_hand() -> None:
    assert jaccard({"a", "b", "c"}, {"b", "c", "d"}) == pytest.approx(2 / 4)
    assert jaccard({"a"}, {"a"}) == 1.0 and jaccard({"a"}, {"b"}) == 0.0
    # N=10, K=3: P(overlap = i) = C(3,i) C(7,3-i) / C(10,3) = 35, 63, 21, 1 out of 120
    expected = (63 / 120) * (1 / 5) + (21 / 120) * (2 / 4) + (1 / 120) * (3 / 3)
    assert chance_jaccard(10, 3) == pytest.approx(expected) == pytest.approx(24.1 / 120)
    assert overlap_p_value(2, 10, 3) == pytest.approx(22 / 120)
    assert overlap_p_value(3, 10, 3) == pytest.approx(1 / 120)
    assert overlap_p_value(0, 10, 3) == pytest.approx(1.0)
    assert chance_jaccard(10, 10) == 1.0  # two sets of everything
    assert chance_jaccard(4, 3) == pytest.approx(
        sum(comb(3, i) * comb(1, 3 - i) / 4 * i / (6 - i) for i in (2, 3))
    )  # overlap is at least 2K - N = 2
    assert expected_core(100, 30, 3) == pytest.approx(2.7)


def test_chance_level_and_p_value_match_simulation() -> None:
    n, k, draws = 30, 9, 20000
    rng = np.random.default_rng(0)
    overlaps = np.array(
        [len(set(rng.choice(n, k, replace=False)) & set(rng.choice(n, k, replace=False))) for _ in range(draws)]
    )
    jaccards = overlaps / (2 * k - overlaps)
    standard_error = jaccards.std() / np.sqrt(draws)
    assert abs(jaccards.mean() - chance_jaccard(n, k)) < 4 * standard_error
    for observed in (3, 5, 6):
        simulated = float(np.mean(overlaps >= observed))
        p = overlap_p_value(observed, n, k)
        assert abs(simulated - p) < 4 * np.sqrt(p * (1 - p) / draws) + 1e-4


def test_k_for_percent_and_parse() -> None:
    assert k_for_percent(30, 28) == round(0.3 * 28) == 8
    with pytest.raises(IlaError, match="rounds to 0 layers"):
        k_for_percent(1, 28)
    assert parse_k_percents("10, 25,30%") == [10.0, 25.0, 30.0]
    for bad in ("ten", "0", "150"):
        with pytest.raises(IlaError, match="--k"):
            parse_k_percents(bad)


# ------------------------------------------------------------------------------------------------ comparison


def test_identical_and_reversed_rankings() -> None:
    layers = synthetic_layers(20)
    order = list(np.random.default_rng(1).permutation(20))
    a = ranking_from_order(layers, order, "a")
    same = compare_rankings([a, ranking_from_order(layers, order, "b")])
    assert same.mapping == MAPPING_NAMES and same.n_layers == 20
    assert all(level.pairs[0].jaccard == 1.0 for level in same.levels)
    assert same.correlations[0].spearman == pytest.approx(1.0)
    assert same.correlations[0].kendall == pytest.approx(1.0)
    reverse = compare_rankings([a, ranking_from_order(layers, order[::-1], "b")])
    assert reverse.correlations[0].spearman == pytest.approx(-1.0)
    assert reverse.correlations[0].kendall == pytest.approx(-1.0)
    assert [level.pairs[0].overlap for level in reverse.levels] == [0, 0, 0, 0, 10]  # K = 2, 5, 6, 10, 15
    assert reverse.levels[0].chance_jaccard == pytest.approx(chance_jaccard(20, 2))
    assert reverse.levels[0].pairs[0].p_value == pytest.approx(1.0)


def test_stable_core_and_pairs() -> None:
    layers = synthetic_layers(10)
    a = ranking_from_order(layers, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    b = ranking_from_order(layers, [1, 0, 3, 9, 2, 4, 5, 6, 7, 8], "b")
    c = ranking_from_order(layers, [2, 1, 0, 8, 7, 6, 5, 4, 3, 9], "c")
    result = compare_rankings([a, b, c], k_percents=[30, 50])
    top3, top5 = result.levels
    assert top3.k == 3 and top5.k == 5
    assert set(top3.stable_core) == {"blocks.0.proj", "blocks.1.proj"}  # {0,1,2} ∩ {1,0,3} ∩ {2,1,0}
    assert set(top5.stable_core) == {"blocks.0.proj", "blocks.1.proj", "blocks.2.proj"}
    assert top3.expected_core == pytest.approx(10 * 0.3**3)
    assert [(p.a, p.b) for p in top3.pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert [p.overlap for p in top3.pairs] == [2, 3, 2]
    assert top3.pairs[1].jaccard == 1.0 and top3.pairs[0].jaccard == pytest.approx(2 / 4)
    assert top3.pairs[0].p_value == pytest.approx(22 / 120)
    assert result.heatmap["k"] == 3 and result.heatmap["jaccard"][0][2] == 1.0
    with pytest.raises(IlaError, match="at least 2 rankings"):
        compare_rankings([a])
    with pytest.raises(IlaError, match="rounds to 0"):
        compare_rankings([a, b], k_percents=[4])


def llama_with_blocks(n_blocks: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def test_rankings_of_different_models_are_mapped_by_type_and_depth() -> None:
    small = discover_layers(tiny_llama())  # 4 blocks
    big = discover_layers(llama_with_blocks(6))
    result = compare_rankings([rank_by_depth(small, "last"), rank_by_depth(big, "last")], ["4-block", "6-block"])
    assert result.mapping == MAPPING_TYPE_DEPTH and result.reference == "4-block"
    assert result.n_layers == 28
    assert result.correlations[0].spearman == pytest.approx(1.0)  # same depth order after mapping
    assert all(level.pairs[0].jaccard == 1.0 for level in result.levels)
    assert any("28 of its 42 layers" in note for note in result.notes)
    assert "relative depth" in result.markdown()
    opposite = compare_rankings([rank_by_depth(small, "last"), rank_by_depth(big, "first")])
    assert opposite.correlations[0].spearman < -0.8  # not -1: inside a block both keep discovery order
    assert opposite.levels[1].k == 7 and opposite.levels[1].pairs[0].overlap == 0  # deepest block vs shallowest
    # a ranking with the output head vs one without: same names except lm_head, which is left out
    with_head = discover_layers(tiny_llama(), include_lm_head=True)
    mixed = compare_rankings([rank_random(small, 0), rank_random(with_head, 0)])
    assert mixed.n_layers == 28 and any("lm_head" in note for note in mixed.notes)
    with pytest.raises(IlaError, match="share no module type"):
        compare_rankings([rank_random(small), rank_random(discover_layers(tiny_gpt2()))])


# ------------------------------------------------------------------------------------ type-matched chance level


def test_depth_band() -> None:
    # 12 blocks, 3 bands: relative depth b/11; floor(3b/11) -> blocks 0-3, 4-7, 8-11 (the last one clipped from 3)
    assert [depth_band(b, 12, 3) for b in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    assert depth_band(-1, 12, 3) == -1  # lm_head: its own stratum
    assert depth_band(0, 1, 3) == 0 and depth_band(5, 12, 1) == 0


def test_shared_type_preference_is_not_significant_against_the_type_matched_chance() -> None:
    """Both rankings put every q_proj layer first, in unrelated orders: far above the uniform chance level, but the
    type-matched null keeps each set's q_proj count per depth band, so it expects the same agreement."""
    layers = typed_layers(12)  # 48 layers; 12 q_proj
    q = [i for i, layer in enumerate(layers) if layer.module_type.endswith("q_proj")]
    rest = [i for i in range(len(layers)) if i not in q]
    orders = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        orders.append([int(i) for i in rng.permutation(q)] + [int(i) for i in rng.permutation(rest)])
    result = compare_rankings(
        [ranking_from_order(layers, o, name) for o, name in zip(orders, "ab", strict=True)], k_percents=[25, 50]
    )
    all_q, half = (level.pairs[0] for level in result.levels)
    assert result.levels[0].k == 12 and all_q.jaccard == 1.0  # the top 25% are exactly the q_proj layers
    assert all_q.p_value < 1e-9  # against two uniformly random 12-sets this is extraordinary
    assert all_q.type_chance_jaccard == 1.0 and all_q.type_p_value == 1.0  # ... but type-matched sets are the same
    assert half.jaccard > 1.3 * result.levels[1].chance_jaccard  # top 50%: q_proj + 12 random others
    assert half.type_chance_jaccard is not None and half.type_p_value is not None
    assert half.type_chance_jaccard > result.levels[1].chance_jaccard + 0.1
    assert half.type_p_value > 0.1


def test_agreement_on_layers_within_types_beats_the_type_matched_chance() -> None:
    layers = typed_layers(12)
    order = [int(i) for i in np.random.default_rng(3).permutation(len(layers))]
    near = list(order)
    for i in range(0, len(near) - 1, 6):  # a few neighbours swapped: the same layers, almost the same order
        near[i], near[i + 1] = near[i + 1], near[i]
    result = compare_rankings([ranking_from_order(layers, order, "a"), ranking_from_order(layers, near, "b")])
    assert result.null["strata"] == 12  # 4 types x 3 depth bands
    for level in result.levels:
        pair = level.pairs[0]
        assert pair.type_chance_jaccard is not None and pair.type_p_value is not None
        assert pair.jaccard > pair.type_chance_jaccard + 0.2
        assert pair.type_p_value < 0.01  # 1/2001 where no draw reaches the observed overlap
    assert result.levels[1].pairs[0].type_p_value == pytest.approx(1 / 2001)  # K=12


def test_type_matched_chance_equals_uniform_chance_with_one_stratum() -> None:
    n, draws = 30, 20000
    layers = synthetic_layers(n)  # one module type
    a = ranking_from_order(layers, [int(i) for i in np.random.default_rng(4).permutation(n)], "a")
    b = ranking_from_order(layers, [int(i) for i in np.random.default_rng(5).permutation(n)], "b")
    result = compare_rankings([a, b], k_percents=[10, 30, 50], depth_bands=1, null_draws=draws)
    assert result.null == {"depth_bands": 1, "draws": draws, "seed": 0, "strata": 1}
    for level in result.levels:
        pair, k = level.pairs[0], level.k
        assert pair.type_chance_jaccard is not None and pair.type_p_value is not None
        variance = sum(p * (i / (2 * k - i)) ** 2 for i, p in overlap_distribution(n, k)) - level.chance_jaccard**2
        assert abs(pair.type_chance_jaccard - level.chance_jaccard) < 4 * np.sqrt(variance / draws)
        assert abs(pair.type_p_value - pair.p_value) < 4 * np.sqrt(pair.p_value * (1 - pair.p_value) / draws) + 1e-3
    assert compare_rankings([a, b], depth_bands=3).null["strata"] == 3  # the bands split the one type by depth


def test_null_draws_zero_skips_the_type_matched_chance_and_bad_settings_fail() -> None:
    layers = synthetic_layers(10)
    a, b = ranking_from_order(layers, list(range(10)), "a"), ranking_from_order(layers, list(range(10))[::-1], "b")
    result = compare_rankings([a, b], null_draws=0)
    assert all(lv.pairs[0].type_chance_jaccard is None and lv.pairs[0].type_p_value is None for lv in result.levels)
    assert "not drawn" in result.markdown()
    with pytest.raises(IlaError, match="--depth-bands"):
        compare_rankings([a, b], depth_bands=0)
    with pytest.raises(IlaError, match="--null-draws"):
        compare_rankings([a, b], null_draws=-1)


def test_same_inputs_give_the_same_output() -> None:
    layers = typed_layers(6)
    rankings = [
        ranking_from_order(layers, [int(i) for i in np.random.default_rng(s).permutation(len(layers))], f"r{s}")
        for s in range(3)
    ]
    first, second = compare_rankings(rankings), compare_rankings(list(rankings))
    assert json.dumps(first.to_dict()) == json.dumps(second.to_dict())
    assert first.markdown() == second.markdown()
    # each pair's null has its own fixed seed: adding a ranking does not change the others' numbers
    more = compare_rankings([*rankings, ranking_from_order(layers, list(range(len(layers))), "extra")])
    assert more.levels[0].pairs[0].type_p_value == first.levels[0].pairs[0].type_p_value


# ------------------------------------------------------------------------------------------------- noise floor


def measured(data: str, seed: int | None, **extra: object) -> dict[str, object]:
    info: dict[str, object] = {"model": "m", "model_fingerprint": "fp", "data": data, "milestone": 100, **extra}
    if seed is not None:
        info["seed"] = seed
    return info


def test_noise_floor_from_seed_pairs() -> None:
    layers = typed_layers(6)
    orders = [[int(i) for i in np.random.default_rng(s).permutation(len(layers))] for s in (10, 11, 12, 13, 14)]
    x0 = ranking_from_order(layers, orders[0], "ila", measured("x.jsonl", 0, data_sha256="x"))
    x1 = ranking_from_order(layers, orders[1], "ila", measured("renamed-x.jsonl", 1, data_sha256="x"))  # same data
    y0 = ranking_from_order(layers, orders[2], "ila", measured("y.jsonl", 0, data_sha256="y"))
    early = ranking_from_order(layers, orders[3], "ila", measured("x.jsonl", 2, data_sha256="x", milestone=50))
    last = ranking_from_order(layers, orders[4], "last")  # a baseline without a seed: no group
    result = compare_rankings([x0, x1, y0, early, last], ["x0", "x1", "y0", "x-early", "last"], k_percents=[25, 50])
    assert [r["group"] for r in result.rankings] == ["g1", "g1", "g2", "g3", None]
    assert [r["seed"] for r in result.rankings] == [0, 1, 0, 2, None]
    groups = {g["id"]: g for g in result.groups}
    assert groups["g1"]["members"] == ["x0", "x1"] and groups["g1"]["seed_pairs"] == [["x0", "x1"]]
    assert groups["g2"]["seed_pairs"] == [] and groups["g2"]["noise_floor"] == {"25": None, "50": None}
    for level in result.levels:
        by_pair = {(p.a, p.b): p for p in level.pairs}
        floor = by_pair["x0", "x1"].jaccard
        assert groups["g1"]["noise_floor"][f"{level.percent:g}"] == floor
        seed_pair = by_pair["x0", "x1"]
        assert seed_pair.seed_pair and seed_pair.noise_floor == floor
        assert [p for p in level.pairs if p.seed_pair] == [seed_pair]  # x-early has another milestone
        assert by_pair["x0", "y0"].noise_floor == floor and by_pair["x0", "y0"].noise_floor_from == ("x0",)
        assert by_pair["x1", "y0"].noise_floor == floor and by_pair["x1", "y0"].noise_floor_from == ("x1",)
        assert by_pair["y0", "last"].noise_floor is None and by_pair["x0", "last"].noise_floor_from == ("x0",)
    md = result.markdown()
    row = next(line for line in md.splitlines() if line.startswith("| 25% (") and "| x0 vs y0 |" in line)
    assert row.endswith(f"| {result.levels[0].pairs[0].jaccard:.3f} (x0's group) |")
    row = next(line for line in md.splitlines() if line.startswith("| 25% (") and "| x0 vs x1 |" in line)
    assert "seed pair (group floor" in row
    row = next(line for line in md.splitlines() if line.startswith("| 25% (") and "| y0 vs last |" in line)
    assert row.endswith("| - |")
    assert SEED_HINT not in md and "### Noise floor per ranking" in md
    assert "- g1: ila (model m, data x.jsonl, milestone 100): x0 (seed 0), x1 (seed 1)" in md
    data = result.to_dict()
    assert data["k"][0]["pairs"][0]["seed_pair"] is True and data["groups"][0]["id"] == "g1"


def test_a_different_stage2_sparsity_is_another_measurement_not_a_seed_pair() -> None:
    layers = typed_layers(6)
    orders = [[int(i) for i in np.random.default_rng(s).permutation(len(layers))] for s in (20, 21, 22)]
    budget0 = ranking_from_order(layers, orders[0], "ila", measured("x", 0, data_sha256="x", sparsity="budget"))
    budget1 = ranking_from_order(layers, orders[1], "ila", measured("x", 1, data_sha256="x", sparsity="budget"))
    penalty1 = ranking_from_order(layers, orders[2], "ila", measured("x", 1, data_sha256="x", sparsity="penalty"))
    result = compare_rankings([budget0, budget1, penalty1], ["b0", "b1", "p1"], k_percents=[50])
    assert [r["group"] for r in result.rankings] == ["g1", "g1", "g2"]
    assert [(p.a, p.b) for p in result.levels[0].pairs if p.seed_pair] == [("b0", "b1")]


def test_without_seed_pairs_compare_says_how_to_get_a_noise_floor() -> None:
    layers = synthetic_layers(10)
    a = ranking_from_order(layers, list(range(10)), "first")
    b = ranking_from_order(layers, list(range(10))[::-1], "last")
    result = compare_rankings([a, b])
    assert all(lv.pairs[0].noise_floor is None and not lv.pairs[0].seed_pair for lv in result.levels)
    assert result.markdown().count(SEED_HINT) == 1 and "run.seed=" in SEED_HINT and "--repeats" in SEED_HINT


def test_stage2_repeats_are_shown_as_the_rankings_noise_floor() -> None:
    layers = synthetic_layers(20)
    repeats = {"n": 5, "top_overlap": {"10": 0.93, "30": 0.91}}
    a = ranking_from_order(layers, list(range(20)), "ila", measured("x", 0, repeats=repeats))
    b = ranking_from_order(layers, list(range(20))[::-1], "snr")
    result = compare_rankings([a, b], ["ila", "snr"], k_percents=[10, 25, 30])
    assert result.rankings[0]["stage2_repeats"] == 5
    assert result.rankings[0]["stage2_noise_floor"] == {"10": 0.93, "25": None, "30": 0.91}
    assert result.rankings[1]["stage2_repeats"] is None and result.rankings[1]["stage2_noise_floor"] is None
    md = result.markdown()
    assert "| ila | g1 | 0 | 5 | Stage 2 0.930 | - | Stage 2 0.910 |" in md
    assert "| snr | - | - | - | - | - | - |" in md
    assert SEED_HINT in md  # Stage-2 repeats, but still no seed pair


# ---------------------------------------------------------------------------------------- files and the CLI


@pytest.fixture
def two_ranking_files(tmp_path: Path) -> list[Path]:
    layers = discover_layers(tiny_llama())
    paths = []
    for seed in (0, 1):
        folder = tmp_path / f"random-{seed}"
        rank_random(layers, seed).save(folder)
        paths.append(folder / "ranking.json")
    return paths


def test_write_comparison(tmp_path: Path, two_ranking_files: list[Path]) -> None:
    comparison, rankings = compare_files(two_ranking_files)
    assert [r["label"] for r in comparison.rankings] == ["random-0", "random-1"]
    out = tmp_path / "cmp"
    write_comparison(comparison, rankings, out)
    for name in ("compare.md", "compare.json", "overlap.png", "profiles.png"):
        assert (out / name).is_file()
    for name in ("overlap.png", "profiles.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "compare.json").read_text())
    assert [level["percent"] for level in data["k"]] == [10, 25, 30, 50, 75]
    assert data["mapping"] == MAPPING_NAMES and data["overlap_matrix"]["percent"] == 30
    assert "chance level" in (out / "compare.md").read_text()
    with pytest.raises(IlaError, match="--overwrite"):
        write_comparison(comparison, rankings, out)
    write_comparison(comparison, rankings, out, overwrite=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_compare_cli(tmp_path: Path, two_ranking_files: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    code = main(["-q", "compare", *map(str, two_ranking_files), "--k", "10,30", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| random-0 vs random-1 |" in captured.out and "chance level" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "overlap.png", "profiles.png"]
    bad_inputs = [
        ([str(two_ranking_files[0])], "at least 2 rankings"),
        ([str(two_ranking_files[0]), str(tmp_path / "missing.json")], "ranking not found"),
        ([*map(str, two_ranking_files), "--k", "1"], "rounds to 0 layers"),
        ([*map(str, two_ranking_files), "--k", "ten"], "--k"),
        ([*map(str, two_ranking_files), "--labels", "only-one"], "--labels"),
        ([*map(str, two_ranking_files), "--output", str(out)], "--overwrite"),
        ([*map(str, two_ranking_files), "--depth-bands", "0"], "--depth-bands"),
        ([*map(str, two_ranking_files), "--null-draws", "-1"], "--null-draws"),
    ]
    for argv, needle in bad_inputs:
        code = main(["-q", "compare", *argv])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("ila: error: ") and needle in lines[0], lines


def test_compare_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["compare", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ila compare" in out and "examples:" in out
    assert "--depth-bands N" in out and "--null-draws N" in out and "noise floor" in out


def test_compare_cli_null_settings(tmp_path: Path, two_ranking_files: list[Path]) -> None:
    out = tmp_path / "cmp"
    argv = [*map(str, two_ranking_files), "--k", "10,30", "--depth-bands", "2", "--null-draws", "300"]
    assert main(["-q", "compare", *argv, "--output", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["type_matched_null"] == {"depth_bands": 2, "draws": 300, "seed": 0, "strata": 14}  # 7 types x 2
    for level in data["k"]:  # at K=3 of 28 the two sets may lie in disjoint strata: type-matched chance 0
        pair = level["pairs"][0]
        assert 0 <= pair["type_chance_jaccard"] < 1 and 1 / 301 <= pair["type_p_value"] <= 1
    assert pair["seed_pair"] is True  # two random baselines with seeds 0 and 1: one measurement, two seeds
    assert data["rankings"][0]["group"] == data["rankings"][1]["group"] == "g1"
    md = (out / "compare.md").read_text()
    assert "type-matched chance" in md and "seed pair (group floor" in md


def test_stage1_repeats_give_only_their_within_stage1_pairs_as_the_stage2_floor() -> None:
    layers = synthetic_layers(20)
    both = {"10": 0.6, "30": 0.7}  # spans Stage-1 seeds: not a Stage-2 floor
    with_within = {"n": 4, "stage1_runs": 2, "stage2_runs": 2, "top_overlap": both, "stage2_top_overlap": {"10": 0.9}}
    without = {"n": 2, "stage1_runs": 2, "stage2_runs": 1, "top_overlap": both}
    a = ranking_from_order(layers, list(range(20)), "ila", measured("x", 0, repeats=with_within))
    b = ranking_from_order(layers, list(range(20))[::-1], "ila", measured("x", 1, repeats=without))
    result = compare_rankings([a, b], ["a", "b"], k_percents=[10, 30])
    assert result.rankings[0]["stage2_repeats"] == 2
    assert result.rankings[0]["stage2_noise_floor"] == {"10": 0.9, "30": None}
    assert result.rankings[1]["stage2_repeats"] is None and result.rankings[1]["stage2_noise_floor"] is None


def test_a_mean_over_runs_is_no_seed_pair_of_a_single_run() -> None:
    layers = synthetic_layers(12)
    orders = [[int(i) for i in np.random.default_rng(s).permutation(len(layers))] for s in (30, 31, 32, 33)]
    mean3 = {"n": 3, "stage1_runs": 3, "top_overlap": {"30": 0.8}}
    single0 = ranking_from_order(layers, orders[0], "ila", measured("x", 0, data_sha256="x"))
    single1 = ranking_from_order(layers, orders[1], "ila", measured("x", 1, data_sha256="x"))
    mean_a = ranking_from_order(layers, orders[2], "ila", measured("x", 2, data_sha256="x", repeats=mean3))
    mean_b = ranking_from_order(layers, orders[3], "ila", measured("x", 3, data_sha256="x", repeats=mean3))
    result = compare_rankings([single0, single1, mean_a, mean_b], ["s0", "s1", "m2", "m3"], k_percents=[30])
    assert [r["group"] for r in result.rankings] == ["g1", "g1", "g2", "g2"]
    assert [(p.a, p.b) for p in result.levels[0].pairs if p.seed_pair] == [("s0", "s1"), ("m2", "m3")]
