"""Ranking comparison: Jaccard, chance level and p-value against hand computation and simulation, correlations,
the stable core, mapping across models, the written files and `ila compare`."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import VOCAB_SIZE, tiny_gpt2, tiny_llama
from ila.baselines import rank_by_depth, rank_random
from ila.cli import main
from ila.compare import (
    MAPPING_NAMES,
    MAPPING_TYPE_DEPTH,
    chance_jaccard,
    compare_files,
    compare_rankings,
    expected_core,
    jaccard,
    k_for_percent,
    overlap_p_value,
    parse_k_percents,
    write_comparison,
)
from ila.errors import IlaError
from ila.layers import Layer, discover_layers
from ila.ranking import Ranking, rank_layers


def synthetic_layers(n: int) -> list[Layer]:
    return [Layer(f"blocks.{i}.proj", i, "proj", 4, 4) for i in range(n)]


def ranking_from_order(layers: list[Layer], order: list[int], method: str = "m") -> Ranking:
    """A ranking in which layers[order[0]] is best, layers[order[1]] second, ..."""
    scores = [0.0] * len(layers)
    for position, index in enumerate(order):
        scores[index] = float(len(order) - position)
    return rank_layers(layers, scores, method)


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
