"""The other ranking methods, in the same ranking format as ILA: random, first, last, delta-norm, grad-norm, snr,
spectrum (the cheap rankings ILA is compared against; `ila rank`, in ila.commands.rank, writes them to a run folder).

Each reads the model; `delta-norm` also a saved PEFT adapter (e.g. an identify run's `stage1/adapter`),
`grad-norm` SFT data; random, first, last, snr and spectrum never read data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ila.config import LoraShapeConfig
from ila.errors import IlaError
from ila.evaluation import resolve_lora_adapter
from ila.layers import Layer, module_types
from ila.lora_adapters import (
    attach_lora,
    has_lora,
    load_lora,
    lora_factors,
    remove_lora,
    unwrap,
    update_sq_norms,
)
from ila.ranking import Ranking, rank_layers
from ila.sft_data import Example, batch_stream
from ila.training_loop import sft_loss

log = logging.getLogger(__name__)

# snr: ila's scale-free SNR, one global order (the method name rankings already on disk carry);
# spectrum: Spectrum's own score and per-module-type order (see `rank_spectrum`)
METHODS = ("random", "first", "last", "delta-norm", "grad-norm", "snr", "spectrum")
DATA_FREE = ("random", "first", "last", "snr", "spectrum")  # never read SFT data (snr, spectrum: the weights only)
NEEDS_WEIGHTS = ("delta-norm", "grad-norm", "snr", "spectrum")  # the others need the module tree only


@dataclass(frozen=True)
class RankConfig:
    """Options of the ranking methods (`ila rank`); each method reads only its own."""

    seed: int = 0  # random: the permutation; grad-norm: LoRA-A init, data split and batch order
    normalize: bool = True  # delta-norm, grad-norm: per-entry RMS instead of the raw Frobenius norm (see below)
    grad_batches: int = 8  # grad-norm: batches of sft_loss backward, no optimizer step
    batch_size: int = 4  # grad-norm
    lora: LoraShapeConfig = field(default_factory=LoraShapeConfig)  # grad-norm: the fresh adapter whose B is measured
    snr_divide_by_max: bool = False  # snr: also divide by σ_max as Spectrum does; not comparable across shapes

    def __post_init__(self) -> None:
        if self.grad_batches < 1 or self.batch_size < 1:
            raise IlaError(
                f"grad-norm needs batches >= 1 and batch size >= 1 (got {self.grad_batches}, {self.batch_size})"
            )


# ------------------------------------------------------------------------------------ data-free, no weights


def rank_random(layers: Sequence[Layer], seed: int = 0) -> Ranking:
    """A uniformly random order; the same seed gives the same ranking."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(layers), generator=generator, dtype=torch.float64).tolist()
    return rank_layers(layers, scores, "random", info={"seed": seed})


def _depth(layer: Layer, n_blocks: int) -> int:
    return layer.block if layer.block >= 0 else n_blocks  # the output head sits after the last block


def rank_by_depth(layers: Sequence[Layer], which: str) -> Ranking:
    """`first`: shallowest block first; `last`: deepest block first. Within a block, discovery order.

    The score is the block's depth (last) or its distance from the deepest block (first); layers of one block
    tie, and `rank_layers` keeps ties in discovery order.
    """
    if which not in ("first", "last"):
        raise IlaError(f"depth ranking '{which}' is unknown; allowed: first, last")
    n_blocks = len({layer.block for layer in layers if layer.block >= 0})
    depths = [_depth(layer, n_blocks) for layer in layers]
    scores = [float(d) if which == "last" else float(n_blocks - 1 - d) for d in depths]
    return rank_layers(layers, scores, which)


# ---------------------------------------------------------------------------------------- delta-norm


@contextmanager
def _model_restored(model: nn.Module) -> Iterator[None]:
    """PEFT freezes the base weights and may switch modes; put `requires_grad` and train/eval back afterwards."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    was_training = model.training
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


def delta_norm_scores(peft_model: nn.Module, layers: Sequence[Layer], normalize: bool = True) -> list[float]:
    """‖Δθ_i‖_F = ‖s·B_i A_i‖_F per layer, divided by sqrt(out·in) when `normalize` (the RMS of the entries).

    Unnormalised, the norm grows with the matrix: on SmolLM2 the MLP gate/up matrices filled 54 of the top 63
    places (docs/method.md §6). Layers without an adapter score 0 (their update is zero).
    """
    adapted = [layer for layer in layers if has_lora(peft_model, layer)]
    norms = dict(
        zip(
            (layer.name for layer in adapted),
            (math.sqrt(sq) for sq in update_sq_norms(lora_factors(peft_model, adapted))),
            strict=True,
        )
    )
    scores = []
    for layer in layers:
        norm = norms.get(layer.name, 0.0)
        scores.append(norm / math.sqrt(layer.n_params) if normalize else norm)
    return scores


def rank_delta_norm(model: nn.Module, layers: Sequence[Layer], adapter: str | Path, normalize: bool = True) -> Ranking:
    """Rank by the size of each layer's Stage-1 LoRA update, read from a saved PEFT adapter.

    The adapter is loaded onto `model` and taken off again afterwards, so `model` is left as it was.
    """
    folder = resolve_lora_adapter(adapter)
    with _model_restored(model):
        try:
            peft_model = load_lora(model, folder)  # type: ignore[arg-type]
        except (ValueError, RuntimeError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise IlaError(f"the adapter {folder} does not fit this model: {first}") from None
        try:
            adapted = sum(has_lora(peft_model, layer) for layer in layers)
            if adapted == 0:
                raise IlaError(
                    f"the adapter {folder} adapts none of this model's {len(layers)} layers; was it "
                    "trained on another model?"
                )
            scores = delta_norm_scores(peft_model, layers, normalize)
        finally:
            remove_lora(peft_model)
    info = {"adapter": str(folder), "normalize": normalize, "adapted_layers": adapted}
    if adapted < len(layers):
        log.warning("%d of %d layers carry no adapter in %s; they score 0", len(layers) - adapted, len(layers), folder)
    return rank_layers(layers, scores, "delta-norm", info=info)


# ----------------------------------------------------------------------------------------- grad-norm


def grad_norm_scores(
    model: nn.Module,
    layers: Sequence[Layer],
    examples: list[Example],
    pad_id: int,
    settings: RankConfig,
    device: torch.device | None = None,
) -> list[float]:
    """Mean over `settings.grad_batches` batches of ‖∂L/∂B_i‖_F for a fresh LoRA adapter; no optimizer step.

    Why B: PEFT starts LoRA with B = 0, so ∂L/∂A = s·Bᵀ·∂L/∂W is exactly zero, while ∂L/∂B = s·(∂L/∂W)·Aᵀ is the
    full weight gradient seen through the adapter's random projection A. ‖∂L/∂B‖² is, up to the learning rate,
    the loss decrease of the first SGD step on that layer's LoRA: what LoRA training would feel first.
    With `normalize` the norm is divided by sqrt(out·r), the RMS of ∂L/∂B's entries; since A's init variance is
    1/(3·in), this removes the growth with the matrix size (‖∂L/∂B‖ ∝ sqrt(out) at equal per-entry gradients).

    Runs in eval mode (no dropout) with a seeded adapter and batch order, so the result is deterministic. The
    adapter is removed afterwards, leaving `model` as it was.
    """
    if not examples:
        raise IlaError("grad-norm needs SFT examples; none were given")
    device = device or next(model.parameters()).device
    torch.manual_seed(settings.seed)
    totals = [0.0] * len(layers)
    with _model_restored(model):
        peft_model = attach_lora(model, layers, settings.lora)  # type: ignore[arg-type]
        try:
            peft_model.eval()
            b_factors = [f.b for f in lora_factors(peft_model, layers)]
            b_sizes = [b.numel() for b in b_factors]
            batches = batch_stream(examples, min(settings.batch_size, len(examples)), pad_id, settings.seed)
            for index in tqdm(range(settings.grad_batches), desc="grad-norm", unit="batch", leave=False):
                batch = next(batches).to(device)
                loss = sft_loss(peft_model, batch)
                if not torch.isfinite(loss):
                    raise IlaError(
                        f"grad-norm: non-finite loss ({float(loss)}) on batch {index + 1}; check the "
                        "model weights and the data"
                    )
                grads = torch.autograd.grad(loss, b_factors)
                for i, grad in enumerate(grads):
                    totals[i] += float(grad.detach().double().norm())
        finally:
            remove_lora(peft_model)
    scores = [total / settings.grad_batches for total in totals]
    if settings.normalize:
        scores = [score / math.sqrt(size) for score, size in zip(scores, b_sizes, strict=True)]
    return scores


def rank_grad_norm(
    model: nn.Module,
    layers: Sequence[Layer],
    examples: list[Example],
    pad_id: int,
    settings: RankConfig | None = None,
) -> Ranking:
    settings = settings or RankConfig()
    scores = grad_norm_scores(model, layers, examples, pad_id, settings)
    info = {
        "seed": settings.seed,
        "normalize": settings.normalize,
        "grad_batches": settings.grad_batches,
        "batch_size": settings.batch_size,
        "lora_r": settings.lora.r,
        "lora_alpha": settings.lora.alpha,
    }
    return rank_layers(layers, scores, "grad-norm", info=info)


# ----------------------------------------------------------------------------------------------- snr


@lru_cache(maxsize=256)
def marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law with aspect ratio β = min/max ∈ (0, 1] and unit variance.

    The law of the eigenvalues of X Xᵀ / n for a (β·n) x n matrix X of iid unit-variance entries; e.g. 0.6528
    for a square matrix (Gavish & Donoho 2014).
    """
    from scipy import integrate, optimize

    if not 0.0 < beta <= 1.0:
        raise ValueError(f"aspect ratio {beta} must lie in (0, 1]")
    low, high = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(x: float) -> float:
        return math.sqrt(max((high - x) * (x - low), 0.0)) / (2 * math.pi * beta * x)

    def below(t: float) -> float:
        return float(integrate.quad(density, low, t, limit=200)[0]) - 0.5

    return float(optimize.brentq(below, low, high, xtol=1e-12))


@dataclass(frozen=True)
class SpectrumScore:
    """One weight matrix's singular values against the Marchenko-Pastur noise edge."""

    snr: float  # the score: signal / noise, or (signal / noise) / σ_max (Spectrum's division)
    signal: float  # sum of singular values above the threshold
    noise: float  # sum of singular values at or below it
    threshold: float  # in singular-value units: where noise ends
    sigma: float  # the noise scale the threshold is built from (its meaning differs: see each function)
    max_singular_value: float
    above: int  # how many singular values lie above the threshold


def weight_matrix(model: nn.Module, layer: Layer) -> torch.Tensor:
    """The layer's weight as (out, in); GPT-2's Conv1D stores (in, out) and is transposed."""
    module = unwrap(model).get_submodule(layer.name)
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise IlaError(f"{layer.name} has no weight tensor")
    return weight.T if isinstance(module, Conv1D) else weight


def _singular_values(weight: torch.Tensor, method: str) -> torch.Tensor:
    """Singular values, largest first, as float64 on the CPU; computed in float32, as Spectrum (fp32 model) does."""
    if weight.device.type == "meta":
        raise IlaError(f"{method} needs the weights, but this model's weights are on the meta device (not loaded)")
    matrix = weight.detach().float()
    if not torch.isfinite(matrix).all():
        raise IlaError(f"{method}: the weight matrix holds NaN or infinite values")
    return torch.linalg.svdvals(matrix).double().cpu()


def _numerical_zero(top: float, shape: torch.Size) -> float:
    """Singular values below this are float32 round-off, not measurable noise."""
    return top * max(shape) * torch.finfo(torch.float32).eps


def spectrum_score(weight: torch.Tensor, divide_by_max: bool = False) -> SpectrumScore:
    """ila's Spectrum-style SNR of one weight matrix (data-free, method `snr`); comparable across shapes.

    Noise model: W = signal of low rank + iid noise of entry std σ. For an m x n noise matrix (β = min/max) the
    squared singular values divided by max(m, n)·σ² follow the Marchenko-Pastur law, whose bulk ends at
    σ·(sqrt(m) + sqrt(n)) = σ·sqrt(max)·(1 + sqrt(β)): the threshold.
    σ estimate (our choice, documented): Gavish & Donoho's median rule σ = median singular value /
    sqrt(max(m, n) · μ_β), μ_β the Marchenko-Pastur median; a few large signal values barely move a median.
    Spectrum itself (`spectrum_snr`) uses IQR(singular values)/1.349 with the threshold σ·(1 + sqrt(β)), which
    ignores the matrix size. Score: SNR = Σ above / Σ below (scale-free). With `divide_by_max`, also divided by
    the largest singular value, as Spectrum divides (its σ and threshold are not used here); that makes the score
    depend on the weight's scale and, for strong spikes, approach (number of spikes) / Σ below, which favours
    matrices with few singular values. Spectrum only compares layers within one module type, where this cancels;
    a global ranking does not, so it is off by default (on a tiny Llama with pure-noise weights, a rank-3 signal
    planted in a 32x64 down_proj ranked first by the plain ratio in 5 of 5 seeds and below 16x32 pure-noise k/v
    matrices with the division in 5 of 5).

    Numerically zero singular values (`_numerical_zero`) cannot be measured as noise: the noise sum is floored
    there, so an exactly low-rank matrix gets a large, finite score, never infinity.
    """
    values = _singular_values(weight, "snr")
    small, big = min(weight.shape), max(weight.shape)
    top = float(values[0]) if values.numel() else 0.0
    if top == 0.0:
        return SpectrumScore(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    sigma = float(values.median()) / math.sqrt(big * marchenko_pastur_median(small / big))
    threshold = sigma * (math.sqrt(big) + math.sqrt(small))
    above = values > threshold
    signal = float(values[above].sum())
    noise = max(float(values[~above].sum()), _numerical_zero(top, weight.shape))
    ratio = signal / noise
    return SpectrumScore(
        ratio / top if divide_by_max else ratio, signal, noise, threshold, sigma, top, int(above.sum())
    )


def rank_snr(model: nn.Module, layers: Sequence[Layer], divide_by_max: bool = False) -> Ranking:
    """Rank by ila's SNR of each pretrained weight matrix, one global order; reads no data, trains nothing."""
    scores = []
    with torch.no_grad():
        for layer in tqdm(layers, desc="snr", unit="layer", leave=False):
            scores.append(spectrum_score(weight_matrix(model, layer), divide_by_max).snr)
    info = {
        "divide_by_max": divide_by_max,
        "sigma_estimate": "median singular value (Gavish-Donoho)",
        "threshold": "Marchenko-Pastur bulk edge sigma*(sqrt(m)+sqrt(n))",
    }
    return rank_layers(layers, scores, "snr", info=info)


# ------------------------------------------------------------------------------------------------- spectrum

SPECTRUM_SOURCE = "github.com/QuixiAI/spectrum (formerly cognitivecomputations/spectrum), spectrum.py @ 1996495"
IQR_TO_STD = 1.349  # interquartile range of a standard normal: Spectrum's IQR-to-σ factor


def spectrum_snr(weight: torch.Tensor) -> SpectrumScore:
    """Spectrum's own score of one weight matrix, as SPECTRUM_SOURCE computes it (`calculate_snr_for_layer`,
    `estimate_sigma_with_full_iqr`, `marchenko_pastur_threshold`); read there, written here:

    - S: the singular values (Spectrum loads the model in float32);
    - σ = (q75(S) - q25(S)) / 1.349, quantiles by linear interpolation (torch.quantile's default, as there);
    - ε = σ·(1 + sqrt(β)), β = min(m, n) / max(m, n) (Spectrum writes it sqrt((1 + sqrt β)²));
    - signal = Σ S > ε; noise = Σ S ≤ ε, or 1.0 when no value is ≤ ε (Spectrum's fallback);
    - score = (signal / noise) / S_max.

    This σ is the spread of the singular values, not one entry's noise std, and ε lacks the sqrt(max(m, n)) of
    the Marchenko-Pastur edge (see `spectrum_score`); the score is meant for layers of one module type, where
    Spectrum compares it. Two departures, both where Spectrum has no finite answer: an all-zero matrix scores 0
    (Spectrum: inf), and a noise sum of numerically zero values is floored at `_numerical_zero` (Spectrum: inf),
    so every score is finite JSON.
    """
    values = _singular_values(weight, "spectrum")
    top = float(values[0]) if values.numel() else 0.0
    if top == 0.0:
        return SpectrumScore(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    q75, q25 = torch.quantile(values, torch.tensor([0.75, 0.25], dtype=values.dtype)).tolist()
    sigma = (q75 - q25) / IQR_TO_STD
    threshold = sigma * (1 + math.sqrt(min(weight.shape) / max(weight.shape)))
    above = values > threshold
    signal = float(values[above].sum())
    noise = max(float(values[~above].sum()), _numerical_zero(top, weight.shape)) if not above.all() else 1.0
    return SpectrumScore(signal / noise / top, signal, noise, threshold, sigma, top, int(above.sum()))


def rank_spectrum(model: nn.Module, layers: Sequence[Layer]) -> Ranking:
    """Spectrum's ranking: each module type ordered by `spectrum_snr`, the types interleaved.

    Within a type the order is Spectrum's (score descending; ties in model order, as its stable sort leaves them).
    Across types a layer's key is the share of its type taken up to and including it (the i-th best of n_t layers:
    i/n_t), smallest first, ties in discovery order. So the top fraction f of each type rounded down (`ila select
    --per-type`, like Spectrum's int(n_t·P/100)) is Spectrum's selection at --top-percent 100·f, and a global top-K
    stays balanced across types instead of comparing scores Spectrum never compares. The score column is
    Spectrum's score (what its snr_results JSON holds), comparable within a type only, so across types the rank
    does not follow it.
    """
    with torch.no_grad():
        snr = [spectrum_snr(weight_matrix(model, layer)).snr for layer in tqdm(layers, desc="spectrum", leave=False)]
    taken = [0.0] * len(layers)
    for module_type in module_types(list(layers)):
        members = [i for i, layer in enumerate(layers) if layer.module_type == module_type]
        for place, i in enumerate(sorted(members, key=lambda j: -snr[j]), start=1):  # stable: ties in model order
            taken[i] = place / len(members)
    info = {
        "source": SPECTRUM_SOURCE,
        "score": "(signal/noise)/sigma_max, comparable within a module type only",
        "sigma_estimate": "IQR of the singular values / 1.349",
        "threshold": "sigma*(1+sqrt(beta))",
        "order": "per module type by score; types interleaved by the share of their type taken",
    }
    ranking = rank_layers(layers, [-share for share in taken], "spectrum", info=info)
    by_name = dict(zip((layer.name for layer in layers), snr, strict=True))
    ranking.layers = [replace(entry, score=by_name[entry.name]) for entry in ranking.layers]
    return ranking


# ---------------------------------------------------------------------------------------------- dispatch


def check_method(method: str) -> str:
    if method not in METHODS:
        raise IlaError(f"unknown ranking method '{method}'; allowed: {', '.join(METHODS)}")
    return method


def rank_with(
    method: str,
    layers: Sequence[Layer],
    model: nn.Module | None = None,
    *,
    adapter: str | Path | None = None,
    examples: list[Example] | None = None,
    pad_id: int = 0,
    settings: RankConfig | None = None,
) -> Ranking:
    """Run one baseline method. `model` is needed by delta-norm, grad-norm, snr and spectrum; `adapter` by delta-norm;
    `examples` (and the tokenizer's `pad_id`) by grad-norm only."""
    check_method(method)
    settings = settings or RankConfig()
    if method == "random":
        return rank_random(layers, settings.seed)
    if method in ("first", "last"):
        return rank_by_depth(layers, method)
    if model is None:
        raise IlaError(f"method {method} needs the model's weights")
    if method == "snr":
        return rank_snr(model, layers, settings.snr_divide_by_max)
    if method == "spectrum":
        return rank_spectrum(model, layers)
    if method == "delta-norm":
        if adapter is None:
            raise IlaError(
                "method delta-norm needs a Stage-1 adapter: --adapter RUN/stage1/adapter (or the run folder)"
            )
        return rank_delta_norm(model, layers, adapter, settings.normalize)
    if examples is None:
        raise IlaError("method grad-norm needs SFT data (--data)")
    return rank_grad_norm(model, layers, examples, pad_id, settings)
