"""Baseline rankings on tiny models: planted signals are found (delta-norm, snr), grad-norm is finite and
deterministic, random is seeded, first/last follow depth, Spectrum's score matches a hand computation and its
ranking gives Spectrum's per-type selection, data-free methods never read data, and `ila rank`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ila.cli import main
from ila.commands.rank import run_rank
from ila.config import DataConfig, LoraShapeConfig
from ila.errors import IlaError
from ila.layers import Layer, discover_layers
from ila.lora_adapters import attach_lora, lora_factors
from ila.ranking import Ranking, load_ranking
from ila.ranking_methods import (
    RankConfig,
    marchenko_pastur_median,
    rank_by_depth,
    rank_with,
    spectrum_score,
    spectrum_snr,
    weight_matrix,
)
from ila.selection import SelectionRule, select
from ila.sft_data import load_sft_data
from tiny_models import make_tokenizer, tiny_gpt2, tiny_llama

PLANTED = "model.layers.2.mlp.down_proj"


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ila: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------------- random, first, last


def test_random_is_seeded() -> None:
    layers = discover_layers(tiny_llama())
    first, again, other = (rank_with("random", layers, settings=RankConfig(seed=s)) for s in (0, 0, 1))
    assert first.names() == again.names()
    assert first.names() != other.names()
    assert sorted(first.names()) == sorted(layer.name for layer in layers)
    assert first.method == "random" and first.info["seed"] == 0


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_first_and_last_follow_depth(builder) -> None:
    layers = discover_layers(builder())
    order = {layer.name: i for i, layer in enumerate(layers)}
    block = {layer.name: layer.block for layer in layers}
    first, last = rank_by_depth(layers, "first"), rank_with("last", layers)
    assert [block[n] for n in first.names()] == sorted(block[n] for n in first.names())
    assert [block[n] for n in last.names()] == sorted((block[n] for n in last.names()), reverse=True)
    for ranking in (first, last):  # inside a block: discovery order
        for b in set(block.values()):
            inside = [n for n in ranking.names() if block[n] == b]
            assert inside == sorted(inside, key=order.__getitem__)
    assert first.method == "first" and last.method == "last"


def test_unknown_method_and_missing_inputs() -> None:
    layers = discover_layers(tiny_llama())
    with pytest.raises(IlaError, match="allowed: random, first, last, delta-norm, grad-norm, snr"):
        rank_with("magnitude", layers)
    with pytest.raises(IlaError, match="needs the model"):
        rank_with("snr", layers)
    with pytest.raises(IlaError, match="adapter"):
        rank_with("delta-norm", layers, tiny_llama())
    with pytest.raises(IlaError, match="data"):
        rank_with("grad-norm", layers, tiny_llama())


# ------------------------------------------------------------------------------------------------ delta-norm


def save_planted_adapter(folder: Path) -> tuple[list[Layer], dict[str, float]]:
    """A LoRA adapter with small random B everywhere and a large B on PLANTED; returns the true update norms."""
    model = tiny_llama()
    layers = discover_layers(model)
    peft_model = attach_lora(model, layers, LoraShapeConfig(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    truth = {}
    with torch.no_grad():
        for layer, factors in zip(layers, lora_factors(peft_model, layers), strict=True):
            scale = 1.0 if layer.name == PLANTED else 0.01
            factors.b.copy_(scale * torch.randn(factors.b.shape, generator=generator))
            truth[layer.name] = float(torch.linalg.matrix_norm(factors.scaling * factors.b @ factors.a))
    peft_model.save_pretrained(str(folder))
    return layers, truth


def test_delta_norm_finds_the_planted_update(tmp_path: Path) -> None:
    layers, truth = save_planted_adapter(tmp_path / "adapter")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ranking = rank_with("delta-norm", layers, model, adapter=tmp_path / "adapter")
    assert ranking.names()[0] == PLANTED
    by_name = {e.name: e for e in ranking.layers}
    for layer in layers:  # the per-entry RMS of the true update
        assert by_name[layer.name].score == pytest.approx(truth[layer.name] / math.sqrt(layer.n_params), rel=1e-4)
    raw = rank_with("delta-norm", layers, model, adapter=tmp_path / "adapter", settings=RankConfig(normalize=False))
    assert {e.name: e.score for e in raw.layers} == pytest.approx(truth, rel=1e-4)
    # the adapter is taken off again: the model is unchanged, not wrapped, still trainable
    assert type(model.get_submodule(PLANTED)) is torch.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_delta_norm_accepts_an_identify_run_folder_and_rejects_others(tmp_path: Path) -> None:
    layers, _ = save_planted_adapter(tmp_path / "run" / "stage1" / "adapter")
    ranking = rank_with("delta-norm", layers, tiny_llama(), adapter=tmp_path / "run")
    assert ranking.names()[0] == PLANTED
    with pytest.raises(IlaError, match="not found"):
        rank_with("delta-norm", layers, tiny_llama(), adapter=tmp_path / "nowhere")
    with pytest.raises(IlaError, match=r"no adapter_config\.json"):
        rank_with("delta-norm", layers, tiny_llama(), adapter=tmp_path)


# -------------------------------------------------------------------------------------------------- snr


def test_marchenko_pastur_median() -> None:
    assert marchenko_pastur_median(1.0) == pytest.approx(0.6528, abs=1e-4)  # Gavish & Donoho's value
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1600, generator=rng, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(x @ x.T / 1600)
    assert float(eigenvalues.median()) == pytest.approx(marchenko_pastur_median(0.25), rel=0.02)


def test_spectrum_score_on_noise_and_signal() -> None:
    rng = torch.Generator().manual_seed(0)
    noise = 0.02 * torch.randn(256, 128, generator=rng)
    pure = spectrum_score(noise)
    assert pure.sigma == pytest.approx(0.02, rel=0.05)  # the median rule recovers the entry std
    assert pure.above <= 2
    spikes = sum(
        3.0 * torch.outer(torch.randn(256, generator=rng), torch.randn(128, generator=rng)) / 150 for _ in range(4)
    )
    planted = spectrum_score(noise + spikes)
    assert planted.above >= 4 and planted.snr > pure.snr
    assert spectrum_score(noise.T).snr == pytest.approx(pure.snr, rel=1e-4)  # orientation does not matter
    low_rank = spectrum_score(spikes)  # numerically rank 4: no measurable noise, a large but finite score
    assert math.isfinite(low_rank.snr) and low_rank.snr > planted.snr
    assert spectrum_score(torch.zeros(8, 4)).snr == 0.0


def set_noise_weights(model: torch.nn.Module, layers: list[Layer], planted: str | None, seed: int = 0) -> None:
    """Every weight pure iid noise of one std; the planted layer gets a rank-3 signal on top."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            weight = weight_matrix(model, layer)
            rows, cols = weight.shape
            value = 0.02 * torch.randn(rows, cols, generator=rng)
            if layer.name == planted:
                for _ in range(3):
                    value += (
                        0.5
                        * torch.outer(torch.randn(rows, generator=rng), torch.randn(cols, generator=rng))
                        / (math.sqrt(rows * cols))
                    )
            weight.copy_(value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snr_ranks_low_rank_plus_noise_above_pure_noise(seed: int) -> None:
    model = tiny_llama()
    layers = discover_layers(model)
    set_noise_weights(model, layers, PLANTED, seed)
    ranking = rank_with("snr", layers, model)
    assert ranking.names()[0] == PLANTED
    assert all(math.isfinite(e.score) for e in ranking.layers)
    assert ranking.info["divide_by_max"] is False
    # Spectrum's exact ratio is meant for layers of one module type (one shape): there it finds the signal too
    spectrum = rank_with("snr", layers, model, settings=RankConfig(snr_divide_by_max=True))
    same_shape = [e.name for e in spectrum.layers if e.module_type == "mlp.down_proj"]
    assert same_shape[0] == PLANTED


def test_snr_on_gpt2_conv1d_and_meta_weights() -> None:
    model = tiny_gpt2()
    layers = discover_layers(model)
    set_noise_weights(model, layers, "transformer.h.1.mlp.c_fc")  # Conv1D: weight stored (in, out)
    assert weight_matrix(model, layers[0]).shape == (layers[0].out_features, layers[0].in_features)
    assert rank_with("snr", layers, model).names()[0] == "transformer.h.1.mlp.c_fc"
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(IlaError, match="meta device"):
        rank_with("snr", discover_layers(meta), meta)


# -------------------------------------------------------------------------------------------- spectrum


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """`cols` orthonormal columns of length `rows` (QR of a Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def linear_quantile(ascending: list[float], p: float) -> float:
    """The p-quantile by linear interpolation between order statistics (what Spectrum's torch.quantile does)."""
    position = p * (len(ascending) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ascending) - 1)
    return ascending[low] + (position - low) * (ascending[high] - ascending[low])


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_spectrum_snr_matches_a_hand_computation(shape: tuple[int, int]) -> None:
    rows, cols = shape
    k = min(rows, cols)
    rng = torch.Generator().manual_seed(0)
    singular = sorted((0.2 + torch.rand(k, generator=rng, dtype=torch.float64) * 0.8).tolist(), reverse=True)
    singular[:3] = [9.0, 6.0, 4.5]  # three clear spikes over a bulk in [0.2, 1]
    u, v = orthonormal(rows, k, rng), orthonormal(cols, k, rng)
    weight = (u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T).float()

    # Spectrum's formula, by hand: sigma = IQR / 1.349, threshold = sigma * (1 + sqrt(beta)), beta = min / max
    ascending = sorted(singular)
    sigma = (linear_quantile(ascending, 0.75) - linear_quantile(ascending, 0.25)) / 1.349
    threshold = sigma * (1 + math.sqrt(min(shape) / max(shape)))
    signal = sum(s for s in singular if s > threshold)
    noise = sum(s for s in singular if s <= threshold)
    assert noise > 0 and not any(abs(s - threshold) < 1e-3 for s in singular)  # the split is not a rounding call

    score = spectrum_snr(weight)
    assert score.sigma == pytest.approx(sigma, rel=1e-5)
    assert score.threshold == pytest.approx(threshold, rel=1e-5)
    assert score.above == sum(s > threshold for s in singular)
    assert score.signal == pytest.approx(signal, rel=1e-5)
    assert score.noise == pytest.approx(noise, rel=1e-5)
    assert score.max_singular_value == pytest.approx(9.0, rel=1e-5)
    assert score.snr == pytest.approx(signal / noise / 9.0, rel=1e-5)
    assert spectrum_snr(weight.T).snr == pytest.approx(score.snr, rel=1e-5)  # Conv1D's (in, out) scores the same


def test_spectrum_snr_edge_cases_follow_spectrum_or_stay_finite() -> None:
    rng = torch.Generator().manual_seed(1)
    flat = 3.0 * orthonormal(24, 8, rng).float()  # all singular values equal: IQR 0, every value above the threshold
    score = spectrum_snr(flat)
    assert score.above == 8 and score.noise == 1.0  # Spectrum's fallback when nothing is noise
    assert score.snr == pytest.approx(8 * 3.0 / 1.0 / 3.0, rel=1e-4)
    assert spectrum_snr(torch.zeros(8, 4)).snr == 0.0  # Spectrum: inf
    low_rank = torch.outer(torch.randn(16, generator=rng), torch.randn(8, generator=rng))
    assert math.isfinite(spectrum_snr(low_rank).snr)  # numerically zero noise: floored, not inf
    with torch.device("meta"):
        meta = torch.empty(4, 4)
    with pytest.raises(IlaError, match="spectrum needs the weights"):
        spectrum_snr(meta)


def spectrum_selection(ranking: Ranking, percent: int, model_order: list[str]) -> set[str]:
    """Spectrum's own rule (generate_unfrozen_params_yaml): per type, sort by score and keep int(n * P / 100)."""
    position = {name: i for i, name in enumerate(model_order)}
    chosen: set[str] = set()
    for module_type in {e.module_type for e in ranking.layers}:
        members = sorted((e for e in ranking.layers if e.module_type == module_type), key=lambda e: position[e.name])
        ordered = sorted(members, key=lambda e: e.score, reverse=True)  # stable, like Spectrum's: ties in model order
        chosen.update(e.name for e in ordered[: int(len(members) * percent / 100)])
    return chosen


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_spectrum_ranking_gives_spectrums_per_type_selection(builder) -> None:
    model = builder()
    layers = discover_layers(model)
    ranking = rank_with("spectrum", layers, model)
    assert ranking.method == "spectrum" and ranking.info["source"].startswith("github.com/QuixiAI/spectrum")
    scores = {e.name: e.score for e in ranking.layers}
    for layer in layers:  # the score column is Spectrum's own score
        assert scores[layer.name] == pytest.approx(spectrum_snr(weight_matrix(model, layer)).snr, rel=1e-9)
    types = {layer.module_type for layer in layers}
    for module_type in types:  # within a type, the ranking follows the score
        inside = [e.score for e in ranking.layers if e.module_type == module_type]
        assert inside == sorted(inside, reverse=True)
    for percent in (25, 50, 75, 100):
        per_type = select(ranking, SelectionRule("top_fraction", percent / 100, per_type=True))
        assert set(per_type.names()) == spectrum_selection(ranking, percent, [layer.name for layer in layers])
        # the types are interleaved, so the global top-K of the same size is the same set
        assert set(ranking.top(len(per_type.layers))) == set(per_type.names())
    assert {e.module_type for e in ranking.layers[: len(types)]} == types  # every type's best comes first


# --------------------------------------------------------------------------------------------- grad-norm


@pytest.fixture(scope="module")
def examples(tiny_data: Path):
    return load_sft_data(DataConfig(path=str(tiny_data), max_length=64), make_tokenizer(), seed=0).train


def test_grad_norm_is_finite_deterministic_and_leaves_the_model_alone(examples) -> None:
    settings = RankConfig(grad_batches=2, batch_size=4)
    model = tiny_llama()
    layers = discover_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = rank_with("grad-norm", layers, model, examples=examples, pad_id=1, settings=settings)
    again = rank_with("grad-norm", layers, tiny_llama(), examples=examples, pad_id=1, settings=settings)
    scores = [e.score for e in first.layers]
    assert all(math.isfinite(s) and s > 0 for s in scores)
    assert first.names() == again.names() and scores == [e.score for e in again.layers]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.get_submodule(PLANTED)) is torch.nn.Linear
    raw = rank_with(
        "grad-norm",
        layers,
        model,
        examples=examples,
        pad_id=1,
        settings=RankConfig(grad_batches=2, batch_size=4, normalize=False),
    )
    by_name = {e.name: e.score for e in first.layers}
    for entry in raw.layers:  # normalised = raw / sqrt(out * r)
        layer = next(la for la in layers if la.name == entry.name)
        assert by_name[entry.name] == pytest.approx(entry.score / math.sqrt(layer.out_features * 8), rel=1e-6)
    other = rank_with(
        "grad-norm",
        layers,
        model,
        examples=examples,
        pad_id=1,
        settings=RankConfig(grad_batches=2, batch_size=4, seed=1),
    )
    assert [e.score for e in other.layers] != scores


# ------------------------------------------------------------------------------------------ `ila rank`, run_rank


def test_data_free_methods_never_read_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    missing = str(tmp_path / "no-such-data.jsonl")
    for method in ("random", "first", "last", "snr", "spectrum"):
        result = run_rank(method, str(tiny_model_dir), data=missing, output=str(tmp_path / method))
        assert len(result.ranking.layers) == 28
        manifest = json.loads((result.run_dir / "manifest.json").read_text())
        assert manifest["data"] is None and manifest["method"] == method and manifest["status"] == "complete"
        assert load_ranking(result.run_dir).names() == result.ranking.names()
        assert result.ranking.info["model"] == str(tiny_model_dir)


def test_rank_cli(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gnorm"
    code = main(
        [
            "-q",
            "rank",
            "--method",
            "grad-norm",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_data),
            "--batches",
            "2",
            "--max-length",
            "64",
            "--output",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(out) in captured.out
    for name in ("ranking.json", "ranking.csv", "manifest.json"):
        assert (out / name).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["sha256"] and manifest["settings"]["grad_batches"] == 2
    assert load_ranking(out).method == "grad-norm"
    # user errors: one line, exit 2, no run folder left behind
    code = main(["-q", "rank", "--method", "bogus", "--model", str(tiny_model_dir), "--output", str(tmp_path / "b")])
    one_line_error(code, capsys.readouterr().err, "allowed: random, first, last")
    code = main(
        ["-q", "rank", "--method", "delta-norm", "--model", str(tiny_model_dir), "--output", str(tmp_path / "d")]
    )
    one_line_error(code, capsys.readouterr().err, "--adapter")
    code = main(
        [
            "-q",
            "rank",
            "--method",
            "grad-norm",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tmp_path / "none.jsonl"),
            "--output",
            str(tmp_path / "g"),
        ]
    )
    one_line_error(code, capsys.readouterr().err, "not found")
    code = main(["-q", "rank", "--method", "last", "--model", str(tiny_model_dir), "--output", str(out)])
    one_line_error(code, capsys.readouterr().err, "already exists")
    assert not any((tmp_path / name).exists() for name in ("b", "d", "g"))


def test_rank_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["rank", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ila rank" in out and "examples:" in out and "delta-norm" in out and "spectrum" in out


def test_rank_spectrum_then_select_per_type_cli(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "spectrum"
    code = main(["-q", "rank", "--method", "spectrum", "--model", str(tiny_model_dir), "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    ranking = load_ranking(out)
    assert ranking.method == "spectrum" and len(ranking.layers) == 28
    assert json.loads((out / "manifest.json").read_text())["data"] is None
    capsys.readouterr()
    selection = tmp_path / "sel.json"
    code = main(["-q", "select", "--ranking", str(out), "--top", "0.5", "--per-type", "--output", str(selection)])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(selection.read_text())
    assert data["rule"]["per_type"] is True and data["n_selected"] == 14
    model_order = [layer.name for layer in discover_layers(tiny_llama())]
    assert {entry["name"] for entry in data["layers"]} == spectrum_selection(ranking, 50, model_order)
    for module_type in {e.module_type for e in ranking.layers}:  # 2 of each type's 4, its best 2 by the ranking
        best = [e.name for e in ranking.layers if e.module_type == module_type][:2]
        assert sorted(e["name"] for e in data["layers"] if e["module_type"] == module_type) == sorted(best)
    assert data["lowest_block"] == min(entry["block"] for entry in data["layers"])
    total = sum(e.n_params for e in ranking.layers)
    assert data["trainable_share"]["full"] == pytest.approx(data["trainable_params"]["full"] / total)
    assert "of all linear-layer weights" in printed and f"lowest selected block {data['lowest_block']}" in printed


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="VmHWM reset needs Linux /proc")
def test_each_run_reports_its_own_peak_not_the_process_peak(tmp_path: Path, tiny_model_dir: Path) -> None:
    # ila experiment runs many units in one process: an earlier, larger one must not set every later unit's peak
    from ila.run_folder import peak_memory

    big = torch.ones(512, 1024, 1024)  # 2 GiB, touched, then freed
    del big
    process_peak = peak_memory()["peak_rss_gb"]
    result = run_rank("last", str(tiny_model_dir), output=str(tmp_path / "last"))
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert process_peak > 2.0
    assert manifest["memory"]["peak_rss_gb"] < process_peak - 1.5
