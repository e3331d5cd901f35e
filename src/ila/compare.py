"""Comparison of rankings (ILA runs across data, seeds, milestones, models, and the baselines): are they stable?

Reads two or more ranking.json files; `ila compare` writes compare.md (tables), compare.json (every number),
overlap.png (top-K Jaccard heatmap) and profiles.png (importance by depth per module type). For each K: pairwise
Jaccard of the top-K sets with two chance levels (uniform, and type-matched: random sets that keep each set's count
per module type and depth band) and their p-values, the noise floor of each pair (how far rankings that differ only
in the seed agree; and a ranking's own Stage-2 repeats), and the stable core; Spearman and Kendall correlation of
the full rankings. Rankings of different models are mapped by module type and relative depth.

Over 500 lines because a comparison is one table: its statistics, the mapping across models, the noise floor
and the markdown that prints them read the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from ila.errors import IlaError
from ila.ranking import LayerScore, Ranking

DEFAULT_K_PERCENTS: tuple[float, ...] = (10, 25, 30, 50, 75)
DEFAULT_HEATMAP_PERCENT = 30.0
OUTPUT_FILES = ("compare.md", "compare.json", "overlap.png", "profiles.png")
MAPPING_NAMES = "layer names"
MAPPING_TYPE_DEPTH = "module type and relative depth"
DEFAULT_DEPTH_BANDS = 3
DEFAULT_NULL_DRAWS = 2000
NULL_SEED = 0  # the type-matched null is Monte Carlo; a fixed seed makes compare.md the same on every run


# ----------------------------------------------------------------------------------------------- statistics


def jaccard(a: AbstractSet[Hashable], b: AbstractSet[Hashable]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def k_for_percent(percent: float, n: int) -> int:
    """Top-K size for a percentage of n layers, rounded as `Ranking.top_fraction` rounds; 0 is an error."""
    if not 0 < percent <= 100:
        raise IlaError(f"K={percent:g}% must be a percentage in (0, 100]")
    k = round(percent / 100 * n)
    if k < 1:
        raise IlaError(f"K={percent:g}% of {n} layers rounds to 0 layers; use a larger K")
    return k


def overlap_distribution(n: int, k: int) -> list[tuple[int, float]]:
    """(overlap i, probability) for two independent uniformly random k-of-n sets (hypergeometric).

    C(k, i)·C(n−k, k−i) / C(n, k) in exact integers, divided once: no rounding before the last step.
    """
    low = max(0, 2 * k - n)
    total = math.comb(n, k)
    return [(i, math.comb(k, i) * math.comb(n - k, k - i) / total) for i in range(low, k + 1)]


def chance_jaccard(n: int, k: int) -> float:
    """E[J] for two random k-of-n sets, exactly: Σ_i P(overlap = i) · i / (2k − i)."""
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, n={n}]")
    return sum(p * i / (2 * k - i) for i, p in overlap_distribution(n, k))


def overlap_p_value(overlap: int, n: int, k: int) -> float:
    """P(overlap ≥ observed) for two random k-of-n sets: the one-sided hypergeometric test."""
    from scipy.stats import hypergeom

    return float(hypergeom.sf(overlap - 1, n, k, k))


def expected_core(n: int, k: int, m: int) -> float:
    """Expected size of the intersection of m independent random k-of-n sets: n · (k/n)^m."""
    return n * (k / n) ** m


def type_matched_null(
    sizes: np.ndarray, counts_a: np.ndarray, counts_b: np.ndarray, overlap: int, draws: int, seed: int = NULL_SEED
) -> tuple[float, float]:
    """(chance Jaccard, p-value) of an overlap against random sets that keep each set's count per stratum.

    A' is drawn uniformly among the sets with A's count in every stratum, B' likewise for B, independently; both
    have K layers, so J(A', B') depends only on |A' ∩ B'|, which is a sum over strata of independent
    hypergeometric overlaps (counts_a[s] and counts_b[s] of sizes[s]): drawing those is the same as drawing the
    sets, and fast. p = (1 + #{overlap' ≥ overlap}) / (1 + draws), the Monte Carlo p-value that is never 0.
    """
    k = int(counts_a.sum())
    if k != int(counts_b.sum()) or k < 1:
        raise ValueError(f"the two sets must have the same size ≥ 1, got {k} and {int(counts_b.sum())}")
    used = (counts_a > 0) & (counts_b > 0)  # strata where one set is empty add no overlap
    rng = np.random.default_rng(seed)
    drawn = rng.hypergeometric(
        counts_a[used], sizes[used] - counts_a[used], counts_b[used], size=(draws, int(used.sum()))
    ).sum(axis=1)
    return float(np.mean(drawn / (2 * k - drawn))), float((1 + np.count_nonzero(drawn >= overlap)) / (1 + draws))


def rank_correlations(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Spearman and Kendall (tau-b) correlation of two rank vectors over the same layers, with p-values."""
    from scipy.stats import kendalltau, spearmanr

    rho, rho_p = spearmanr(a, b)
    tau, tau_p = kendalltau(a, b)
    return {"spearman": float(rho), "spearman_p": float(rho_p), "kendall": float(tau), "kendall_p": float(tau_p)}


# --------------------------------------------------------------------------------------------------- alignment


@dataclass
class AlignedRankings:
    """Several rankings over one common set of layers (the reference ranking's names)."""

    labels: list[str]
    names: list[str]  # the common layers, in the reference's model order
    positions: list[list[int]]  # per ranking, per common layer: 0 = most important among the common layers
    mapping: str  # MAPPING_NAMES or MAPPING_TYPE_DEPTH
    reference: str  # label of the ranking whose layer names are used
    notes: list[str] = field(default_factory=list)

    def top(self, index: int, k: int) -> frozenset[str]:
        return frozenset(name for name, pos in zip(self.names, self.positions[index], strict=True) if pos < k)


def type_keys(ranking: Ranking) -> dict[str, str]:
    """Module type -> the key used across models: its last name component (q_proj) unless two types of this
    model share it (GPT-2's attn.c_proj and mlp.c_proj), which then keep their full path."""
    types = list(dict.fromkeys(entry.module_type for entry in ranking.layers))
    short = [t.split(".")[-1] for t in types]
    return {t: s if short.count(s) == 1 else t for t, s in zip(types, short, strict=True)}


def depth_band(block: int, n_blocks: int, bands: int) -> int:
    """Band of a block: floor(relative depth · bands), clipped to bands − 1, with relative depth block/(n_blocks − 1);
    −1 for layers outside the blocks (lm_head). Integer arithmetic, so a block on a band edge is never rounded off."""
    if block < 0:
        return -1
    return min(block * bands // max(n_blocks - 1, 1), bands - 1)


def layer_strata(ranking: Ranking, names: Sequence[str], bands: int) -> list[tuple[str, int]]:
    """(module type key, depth band) of each named layer of this ranking: the strata of the type-matched null."""
    keys = type_keys(ranking)
    by_name = {e.name: e for e in ranking.layers}
    return [(keys[by_name[n].module_type], depth_band(by_name[n].block, ranking.n_blocks, bands)) for n in names]


def _model_order(entries: Sequence[LayerScore]) -> list[LayerScore]:
    return sorted(entries, key=lambda e: (e.block if e.block >= 0 else math.inf, e.name))


def _nearest_block(block: int, n_from: int, n_to: int) -> int:
    """Block of a model with n_to blocks at the relative depth block/(n_from − 1), rounded half up."""
    if n_from <= 1 or n_to <= 1:
        return 0
    return math.floor(block / (n_from - 1) * (n_to - 1) + 0.5)


def _positions(entries: Sequence[LayerScore]) -> list[int]:
    """Positions (0 = best) of these entries among themselves, by their rank in their own ranking."""
    order = sorted(range(len(entries)), key=lambda i: entries[i].rank)
    positions = [0] * len(entries)
    for position, i in enumerate(order):
        positions[i] = position
    return positions


def align(rankings: Sequence[Ranking], labels: Sequence[str]) -> AlignedRankings:
    """Put the rankings on one set of layers.

    Same layer names everywhere: used as they are. Otherwise (different models, or lm_head in some only): every
    layer is keyed by (module type, relative depth block/(n_blocks − 1)); the reference is the ranking with the
    fewest blocks, and each of its layers takes, in every other ranking, the layer of the same type at the nearest
    relative depth. With at least as many blocks as the reference, no two reference layers map to the same layer.
    Module types missing from some ranking are left out, and the result says so.
    """
    name_sets = [frozenset(r.names()) for r in rankings]
    if all(s == name_sets[0] for s in name_sets):
        names = [e.name for e in _model_order(rankings[0].layers)]
        positions = []
        for ranking in rankings:
            by_name = {e.name: e for e in ranking.layers}
            positions.append(_positions([by_name[name] for name in names]))
        return AlignedRankings(list(labels), names, positions, MAPPING_NAMES, labels[0])

    keys = [type_keys(r) for r in rankings]
    common = set.intersection(*(set(k.values()) for k in keys))
    if not common:
        raise IlaError(
            "the rankings share no module type, so their layers cannot be mapped onto each other ("
            + "; ".join(f"{label}: {', '.join(sorted(set(k.values())))}" for label, k in zip(labels, keys, strict=True))
            + ")"
        )
    ref = min(range(len(rankings)), key=lambda i: rankings[i].n_blocks)
    notes = []
    dropped = sorted(set.union(*(set(k.values()) for k in keys)) - common)
    if dropped:
        notes.append(f"module types not in every ranking, left out: {', '.join(dropped)}")
    lookups = []
    for ranking, keyed in zip(rankings, keys, strict=True):
        lookups.append({(keyed[e.module_type], e.block if e.block >= 0 else -1): e for e in ranking.layers})
    ref_ranking = rankings[ref]
    rows: list[tuple[str, list[LayerScore]]] = []
    missing = 0
    for entry in _model_order(ref_ranking.layers):
        key = keys[ref][entry.module_type]
        if key not in common:
            continue
        mapped = []
        for ranking, lookup in zip(rankings, lookups, strict=True):
            block = -1 if entry.block < 0 else _nearest_block(entry.block, ref_ranking.n_blocks, ranking.n_blocks)
            match = lookup.get((key, block))
            if match is None:
                break
            mapped.append(match)
        if len(mapped) == len(rankings):
            rows.append((entry.name, mapped))
        else:
            missing += 1
    if missing:
        notes.append(f"{missing} layers of {labels[ref]} have no counterpart in every ranking and are left out")
    if len(rows) < 2:
        raise IlaError("fewer than 2 layers could be mapped across the rankings; nothing to compare")
    for i, ranking in enumerate(rankings):
        if len(ranking.layers) > len(rows):
            notes.append(f"{labels[i]}: {len(rows)} of its {len(ranking.layers)} layers are compared")
    names = [name for name, _ in rows]
    positions = [_positions([mapped[i] for _, mapped in rows]) for i in range(len(rankings))]
    return AlignedRankings(list(labels), names, positions, MAPPING_TYPE_DEPTH, labels[ref], notes)


# ------------------------------------------------------------------------------------------------- noise floor

SEED_HINT = (
    "No noise floor: no two rankings here differ only in the seed. To get one, run the same `ila identify` again "
    "with another seed (`run.seed=1`, or `--seed 1`) and compare both, or rank with `ila identify --repeats N`."
)


def _key_part(value: Any) -> str | None:
    return None if value is None else str(value)


MeasurementKey = tuple[str, str | None, str | None, str | None, str | None, str | None]


def measurement_key(ranking: Ranking) -> MeasurementKey:
    """What a ranking measured, up to its seed: (method, model, data, milestone, Stage-2 sparsity form, runs
    averaged). The model's and the data's fingerprints stand in for their names where recorded, so a moved or
    renamed copy is the same measurement; two ILA rankings with different sparsity forms differ by design, not by
    the seed, and a mean over several runs is less noisy than one run, so it is no seed pair of a single run."""
    info = ranking.info
    repeats = info.get("repeats")
    averaged = (repeats.get("stage1_runs", 1), repeats.get("n")) if isinstance(repeats, dict) else None
    return (
        ranking.method,
        _key_part(info.get("model_fingerprint") or info.get("model")),
        _key_part(info.get("data_sha256") or info.get("data")),
        _key_part(info.get("milestone")),
        _key_part(info.get("sparsity")),
        _key_part(averaged),
    )


def seed_groups(rankings: Sequence[Ranking]) -> list[int | None]:
    """Per ranking, its group (0, 1, ... in order of first appearance): rankings with one measurement key. A ranking
    without info["seed"] (most baselines) is in no group, since nothing says which runs differ only in the seed."""
    numbers: dict[MeasurementKey, int] = {}
    out: list[int | None] = []
    for ranking in rankings:
        if ranking.info.get("seed") is None:
            out.append(None)
            continue
        out.append(numbers.setdefault(measurement_key(ranking), len(numbers)))
    return out


def is_seed_pair(rankings: Sequence[Ranking], groups: Sequence[int | None], i: int, j: int) -> bool:
    """Two rankings of one measurement that differ in the seed: their overlap is the noise floor of the group."""
    return groups[i] is not None and groups[i] == groups[j] and rankings[i].info["seed"] != rankings[j].info["seed"]


def group_floors(
    seed_pairs: Sequence[tuple[int, int]], groups: Sequence[int | None], jaccards: dict[tuple[int, int], float]
) -> dict[int, float]:
    """Noise floor of each group that has a seed pair: the mean Jaccard of its seed pairs."""
    found: dict[int, list[float]] = {}
    for i, j in seed_pairs:
        group = groups[i]
        assert group is not None  # a seed pair lies in one group
        found.setdefault(group, []).append(jaccards[i, j])
    return {group: sum(values) / len(values) for group, values in found.items()}


def pair_noise_floor(
    i: int, j: int, groups: Sequence[int | None], floors: dict[int, float]
) -> tuple[float | None, tuple[int, ...]]:
    """(floor, the rankings whose group's floor it is) for a pair: the mean of the floors of i's and j's groups that
    exist; (None, ()) when neither group has a seed pair."""
    found = [(index, floors[group]) for index in (i, j) if (group := groups[index]) is not None and group in floors]
    if not found:
        return None, ()
    return sum(value for _, value in found) / len(found), tuple(index for index, _ in found)


def stage2_noise_floor(ranking: Ranking, percents: Sequence[float]) -> tuple[int | None, dict[str, float | None]]:
    """(repeats, {K percent: mean pairwise top-K Jaccard of the repeats}) from info["repeats"], which
    `ila identify --repeats N` writes; (None, {}) for a ranking without repeats. K is keyed as f"{percent:g}"."""
    repeats = ranking.info.get("repeats")
    if not isinstance(repeats, dict):
        return None, {}
    # with Stage-1 repeats, top_overlap spans both stages; the Stage-2 floor is the pairs that share a Stage 1
    stage1_runs = repeats.get("stage1_runs", 1)
    top = repeats.get("top_overlap") if stage1_runs == 1 else repeats.get("stage2_top_overlap")
    if top is None:
        return None, {}
    top = top if isinstance(top, dict) else {}
    n = repeats.get("stage2_runs", repeats.get("n"))
    floors: dict[str, float | None] = {}
    for percent in percents:
        value = top.get(f"{percent:g}")
        floors[f"{percent:g}"] = float(value) if isinstance(value, (int, float)) else None
    return (int(n) if isinstance(n, (int, float)) else None), floors


# -------------------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class PairOverlap:
    a: str
    b: str
    overlap: int
    jaccard: float
    p_value: float  # uniform null: one-sided hypergeometric
    type_chance_jaccard: float | None = None  # type-matched null (None when it was not drawn)
    type_p_value: float | None = None
    noise_floor: float | None = None  # mean floor of a's and b's groups, where they have one
    noise_floor_from: tuple[str, ...] = ()  # labels whose group's floor went into noise_floor
    seed_pair: bool = False  # a and b are one measurement with two seeds


@dataclass(frozen=True)
class KLevel:
    percent: float
    k: int
    chance_jaccard: float
    pairs: list[PairOverlap]
    stable_core: list[str]  # in the top-K of every ranking, in model order
    expected_core: float  # its expected size for independent random rankings


@dataclass(frozen=True)
class PairCorrelation:
    a: str
    b: str
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float


@dataclass
class Comparison:
    """Every number `ila compare` reports."""

    rankings: list[dict[str, Any]]  # label, method, model, layers, blocks, source, seed, group, Stage-2 floor
    n_layers: int  # layers compared
    mapping: str
    reference: str
    notes: list[str]
    levels: list[KLevel]
    correlations: list[PairCorrelation]
    heatmap: dict[str, Any]  # percent, k, labels, jaccard matrix
    groups: list[dict[str, Any]] = field(default_factory=list)  # id, measurement, members, seeds, noise floor per K
    null: dict[str, Any] = field(default_factory=dict)  # the type-matched null's depth bands, draws, seed, strata

    def to_dict(self) -> dict[str, Any]:
        return {
            "rankings": self.rankings,
            "n_layers": self.n_layers,
            "mapping": self.mapping,
            "reference": self.reference,
            "notes": self.notes,
            "type_matched_null": self.null,
            "groups": self.groups,
            "k": [asdict(level) for level in self.levels],
            "correlations": [asdict(c) for c in self.correlations],
            "overlap_matrix": self.heatmap,
        }

    def markdown(self) -> str:
        lines = [
            "# Ranking comparison",
            "",
            "| label | method | model | layers | blocks | source |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rankings:
            lines.append(
                f"| {r['label']} | {r['method']} | {r['model'] or '-'} | {r['n_layers']} | {r['n_blocks']} "
                f"| {r['source'] or '-'} |"
            )
        lines += [
            "",
            f"{self.n_layers} layers compared; layers matched by {self.mapping}"
            + (f" (reference: {self.reference})" if self.mapping == MAPPING_TYPE_DEPTH else "")
            + ".",
        ]
        lines += [f"Note: {note}." for note in self.notes]
        head = " | ".join(f"top {lv.percent:g}% (K={lv.k})" for lv in self.levels)
        lines += ["", "## Top-K overlap", "", self._reading_guide(), ""]
        lines += [
            "Jaccard of the top-K sets; p: one-sided hypergeometric test of the overlap against two random K-sets.",
            "",
            f"| pair | {head} |",
            "|---" * (len(self.levels) + 1) + "|",
        ]
        for index, pair in enumerate(self.levels[0].pairs if self.levels else []):
            cells = [f"{lv.pairs[index].jaccard:.3f} (p={lv.pairs[index].p_value:.2g})" for lv in self.levels]
            lines.append(f"| {pair.a} vs {pair.b} | " + " | ".join(cells) + " |")
        lines.append("| chance level | " + " | ".join(f"{lv.chance_jaccard:.3f}" for lv in self.levels) + " |")
        lines += self._detail_lines() + self._noise_floor_lines()
        lines += ["", "## Rank correlation of the full rankings", "", "| pair | Spearman | Kendall |", "|---|---|---|"]
        for c in self.correlations:
            lines.append(
                f"| {c.a} vs {c.b} | {c.spearman:.3f} (p={c.spearman_p:.2g}) | {c.kendall:.3f} (p={c.kendall_p:.2g}) |"
            )
        lines += [
            "",
            "## Stable core",
            "",
            "Layers in the top-K of every ranking (names of the reference).",
            "",
            "| K | size | expected by chance | layers |",
            "|---|---|---|---|",
        ]
        for lv in self.levels:
            shown = ", ".join(lv.stable_core[:12]) + (
                f" ... (+{len(lv.stable_core) - 12})" if len(lv.stable_core) > 12 else ""
            )
            lines.append(
                f"| {lv.percent:g}% ({lv.k}) | {len(lv.stable_core)} | {lv.expected_core:.1f} | {shown or '-'} |"
            )
        return "\n".join(lines) + "\n"

    def _reading_guide(self) -> str:
        """The paragraph that says what the two chance levels and the noise floor mean."""
        bands = self.null.get("depth_bands", DEFAULT_DEPTH_BANDS)
        return (
            "How to read this: Jaccard is the share of layers two top-K sets have in common (1 = the same set). "
            "The *uniform chance level* is the Jaccard of two top-K sets drawn at random from all compared layers. "
            "Layers of one module type, and at similar depth, behave alike, so two rankings can agree far above that "
            "just because both prefer, say, deep q_proj layers. The *type-matched chance level* draws each set at "
            f"random again, but keeps how many layers it took from each module type and depth band ({bands} bands "
            "of equal depth): beating it means the rankings agree on which layers within a type and depth, not only "
            "on which types and depths. The *noise floor* is the Jaccard that rankings reach when only the seed "
            "differs (seed pairs), or that one ranking's Stage-2 repeats reach: a pair near its noise floor agrees "
            "as well as the method agrees with itself, and no pair can be expected to do better."
        )

    def _detail_lines(self) -> list[str]:
        """One row per K and pair: Jaccard beside both chance levels, both p-values and the noise floor."""
        null = self.null
        lines = [
            "",
            "### Against both chance levels and the noise floor",
            "",
            f"Type-matched chance: Monte Carlo, {null.get('draws', 0)} draws (seed {null.get('seed')}) within "
            f"{null.get('strata', '?')} strata of module type x depth band; its p is (1 + draws at least as high) / "
            "(1 + draws)."
            if null.get("draws")
            else "Type-matched chance: not drawn (--null-draws 0).",
            "",
            "| K | pair | Jaccard | uniform chance | p | type-matched chance | p | noise floor |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for lv in self.levels:
            for pair in lv.pairs:
                type_chance = "-" if pair.type_chance_jaccard is None else f"{pair.type_chance_jaccard:.3f}"
                type_p = "-" if pair.type_p_value is None else f"{pair.type_p_value:.2g}"
                lines.append(
                    f"| {lv.percent:g}% ({lv.k}) | {pair.a} vs {pair.b} | {pair.jaccard:.3f} | {lv.chance_jaccard:.3f} "
                    f"| {pair.p_value:.2g} | {type_chance} | {type_p} | {_floor_cell(pair)} |"
                )
        return lines

    def _noise_floor_lines(self) -> list[str]:
        """Per ranking: its group and seed, and the noise floors at each K; the groups; or how to get a floor."""
        has_seed_floor = any(g["seed_pairs"] for g in self.groups)
        has_stage2 = any(r.get("stage2_noise_floor") for r in self.rankings)
        lines = ["", "### Noise floor per ranking", ""]
        if has_seed_floor or has_stage2:
            floors = {g["id"]: g["noise_floor"] for g in self.groups}
            head = " | ".join(f"top {lv.percent:g}%" for lv in self.levels)
            lines += [
                "seeds: mean Jaccard of the seed pairs of the ranking's group; Stage 2: mean Jaccard among the "
                "ranking's own Stage-2 repeats (`ila identify --repeats N`; K in percent of that ranking's layers).",
                "",
                f"| ranking | group | seed | Stage-2 repeats | {head} |",
                "|---" * (len(self.levels) + 4) + "|",
            ]
            for r in self.rankings:
                cells = []
                for lv in self.levels:
                    key = f"{lv.percent:g}"
                    seeds = floors.get(r["group"], {}).get(key)
                    stage2 = (r.get("stage2_noise_floor") or {}).get(key)
                    parts = ([f"seeds {seeds:.3f}"] if seeds is not None else []) + (
                        [f"Stage 2 {stage2:.3f}"] if stage2 is not None else []
                    )
                    cells.append("; ".join(parts) or "-")
                seed = "-" if r.get("seed") is None else str(r["seed"])
                repeats = "-" if r.get("stage2_repeats") is None else str(r["stage2_repeats"])
                lines.append(
                    f"| {r['label']} | {r.get('group') or '-'} | {seed} | {repeats} | " + " | ".join(cells) + " |"
                )
            shared = [g for g in self.groups if len(g["members"]) > 1]
            if shared:
                lines += ["", "Groups (one method, model, data and milestone; only the seed differs):"]
                for g in shared:
                    measured = ", ".join(f"{key} {g[key]}" for key in ("model", "data", "milestone") if g[key])
                    lines.append(
                        f"- {g['id']}: {g['method']}"
                        + (f" ({measured})" if measured else "")
                        + ": "
                        + ", ".join(f"{m} (seed {s})" for m, s in zip(g["members"], g["seeds"], strict=True))
                    )
        if not has_seed_floor:
            lines += ["", SEED_HINT] if has_stage2 else [SEED_HINT]
        return lines


def _floor_cell(pair: PairOverlap) -> str:
    """The noise floor beside a pair's Jaccard: which group it comes from when only one has a floor."""
    if pair.noise_floor is None:
        return "-"
    if pair.seed_pair:
        return f"seed pair (group floor {pair.noise_floor:.3f})"
    if len(pair.noise_floor_from) == 1:
        return f"{pair.noise_floor:.3f} ({pair.noise_floor_from[0]}'s group)"
    return f"{pair.noise_floor:.3f}"


def _jaccard_matrix(aligned: AlignedRankings, k: int) -> list[list[float]]:
    tops = [aligned.top(i, k) for i in range(len(aligned.labels))]
    return [[jaccard(a, b) for b in tops] for a in tops]


def _strata(rankings: Sequence[Ranking], aligned: AlignedRankings, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """(stratum index of each compared layer, size of each stratum), from the reference ranking's entries."""
    reference = rankings[aligned.labels.index(aligned.reference)]
    keys = layer_strata(reference, aligned.names, bands)
    numbers = {key: index for index, key in enumerate(dict.fromkeys(keys))}
    strata = np.array([numbers[key] for key in keys], dtype=np.int64)
    return strata, np.bincount(strata, minlength=len(numbers))


def _describe_groups(
    rankings: Sequence[Ranking],
    labels: Sequence[str],
    groups: Sequence[int | None],
    seed_pairs: Sequence[tuple[int, int]],
    floors_by_level: Sequence[tuple[float, dict[int, float]]],
) -> list[dict[str, Any]]:
    """The groups for compare.json: what was measured, who is in it, its seed pairs and its floor per K."""
    out = []
    for group in sorted({g for g in groups if g is not None}):
        members = [i for i, g in enumerate(groups) if g == group]
        method, _, _, milestone, _, _ = measurement_key(rankings[members[0]])
        info = rankings[members[0]].info
        out.append(
            {
                "id": f"g{group + 1}",
                "method": method,
                "model": info.get("model"),
                "data": info.get("data"),
                "milestone": milestone,
                "members": [labels[i] for i in members],
                "seeds": [rankings[i].info["seed"] for i in members],
                "seed_pairs": [[labels[i], labels[j]] for i, j in seed_pairs if groups[i] == group],
                "noise_floor": {f"{percent:g}": floors.get(group) for percent, floors in floors_by_level},
            }
        )
    return out


def compare_rankings(
    rankings: Sequence[Ranking],
    labels: Sequence[str] | None = None,
    k_percents: Sequence[float] = DEFAULT_K_PERCENTS,
    heatmap_percent: float = DEFAULT_HEATMAP_PERCENT,
    sources: Sequence[str | None] | None = None,
    *,
    depth_bands: int = DEFAULT_DEPTH_BANDS,
    null_draws: int = DEFAULT_NULL_DRAWS,
    null_seed: int = NULL_SEED,
) -> Comparison:
    """Compare two or more rankings at each K (percent of the compared layers) and over the full order.

    Each pair's top-K overlap is set against the uniform chance level (exact), the type-matched chance level
    (`null_draws` Monte Carlo draws within module type x `depth_bands` strata; 0 skips it) and the noise floor
    of the rankings' seed groups.
    """
    if len(rankings) < 2:
        raise IlaError(f"compare needs at least 2 rankings, got {len(rankings)}")
    if not k_percents:
        raise IlaError("give at least one K")
    if depth_bands < 1:
        raise IlaError(f"--depth-bands {depth_bands}: give at least 1 depth band (3 splits each model in thirds)")
    if null_draws < 0:
        raise IlaError(f"--null-draws {null_draws}: give a number of draws ≥ 0 (0 skips the type-matched chance)")
    labels = unique_labels(list(labels) if labels is not None else [r.method for r in rankings])
    if len(labels) != len(rankings):
        raise IlaError(f"{len(labels)} labels for {len(rankings)} rankings")
    aligned = align(rankings, labels)
    n, m = len(aligned.names), len(rankings)
    pairs = list(combinations(range(m), 2))
    strata, sizes = _strata(rankings, aligned, depth_bands)
    positions = [np.array(p) for p in aligned.positions]
    groups = seed_groups(rankings)
    seed_pairs = [(i, j) for i, j in pairs if is_seed_pair(rankings, groups, i, j)]
    levels = []
    floors_by_level: list[tuple[float, dict[int, float]]] = []
    for percent in k_percents:
        k = k_for_percent(percent, n)
        tops = [aligned.top(i, k) for i in range(m)]
        counts = [np.bincount(strata[p < k], minlength=len(sizes)) for p in positions]
        jaccards = {(i, j): jaccard(tops[i], tops[j]) for i, j in pairs}
        floors = group_floors(seed_pairs, groups, jaccards)
        floors_by_level.append((float(percent), floors))
        overlaps = []
        for i, j in pairs:
            overlap = len(tops[i] & tops[j])
            type_chance, type_p = (
                type_matched_null(sizes, counts[i], counts[j], overlap, null_draws, null_seed)
                if null_draws
                else (None, None)
            )
            floor, floor_from = pair_noise_floor(i, j, groups, floors)
            overlaps.append(
                PairOverlap(
                    labels[i],
                    labels[j],
                    overlap,
                    jaccards[i, j],
                    overlap_p_value(overlap, n, k),
                    type_chance,
                    type_p,
                    floor,
                    tuple(labels[index] for index in floor_from),
                    (i, j) in seed_pairs,
                )
            )
        core = frozenset.intersection(*tops)
        levels.append(
            KLevel(
                float(percent),
                k,
                chance_jaccard(n, k),
                overlaps,
                [name for name in aligned.names if name in core],
                expected_core(n, k, m),
            )
        )
    correlations = [
        PairCorrelation(labels[i], labels[j], **rank_correlations(aligned.positions[i], aligned.positions[j]))
        for i, j in pairs
    ]
    heat_k = k_for_percent(heatmap_percent, n)
    heatmap = {
        "percent": float(heatmap_percent),
        "k": heat_k,
        "chance_jaccard": chance_jaccard(n, heat_k),
        "labels": labels,
        "jaccard": _jaccard_matrix(aligned, heat_k),
    }
    described = []
    for i, (label, r) in enumerate(zip(labels, rankings, strict=True)):
        repeats, stage2 = stage2_noise_floor(r, k_percents)
        group = groups[i]
        described.append(
            {
                "label": label,
                "method": r.method,
                "model": r.info.get("model"),
                "n_layers": len(r.layers),
                "n_blocks": r.n_blocks,
                "source": (sources[i] if sources else None),
                "seed": r.info.get("seed"),
                "group": None if group is None else f"g{group + 1}",
                "stage2_repeats": repeats,
                "stage2_noise_floor": stage2 or None,
            }
        )
    null = {"depth_bands": depth_bands, "draws": null_draws, "seed": null_seed, "strata": len(sizes)}
    return Comparison(
        described,
        n,
        aligned.mapping,
        aligned.reference,
        aligned.notes,
        levels,
        correlations,
        heatmap,
        _describe_groups(rankings, labels, groups, seed_pairs, floors_by_level),
        null,
    )


def unique_labels(labels: list[str]) -> list[str]:
    """Labels as given, with #2, #3 ... appended to repeats."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def label_for(path: str | Path) -> str:
    """A short label for a ranking file: its folder's name for a ranking.json, else the file's stem."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    return p.resolve().parent.name if p.name == "ranking.json" else p.stem


def parse_k_percents(text: str) -> list[float]:
    """'10,25,30' -> [10.0, 25.0, 30.0] (percentages of the compared layers)."""
    values = []
    for part in text.split(","):
        part = part.strip().rstrip("%")
        try:
            value = float(part)
        except ValueError:
            raise IlaError(f"--k {text}: give percentages separated by commas, e.g. 10,25,30,50,75") from None
        if not 0 < value <= 100:
            raise IlaError(f"--k {text}: {value:g} is not a percentage in (0, 100]")
        values.append(value)
    return values


# ------------------------------------------------------------------------------------------------------ plots


def plot_overlap(comparison: Comparison, path: Path) -> None:
    """Heatmap of pairwise top-K Jaccard at the heatmap's K, values written in the cells."""
    from ila.plots import plt, save_figure  # ila.plots selects the headless backend before pyplot loads

    heat = comparison.heatmap
    labels, matrix = heat["labels"], heat["jaccard"]
    size = max(3.5, 0.8 * len(labels) + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="black" if value > 0.6 else "white"
            )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    fig.colorbar(image, ax=ax, label="Jaccard")
    ax.set_title(f"top {heat['percent']:g}% overlap (K={heat['k']}; chance {heat['chance_jaccard']:.2f})")
    save_figure(fig, path)


def plot_profiles(rankings: Sequence[Ranking], labels: Sequence[str], path: Path) -> None:
    """Importance by relative depth, one subplot per module type, one line per ranking.

    Scores of different methods live on different scales, so each ranking is shown as its rank percentile within
    its own layers (1 = most important, 0 = least). The output head, outside the blocks, is not drawn.
    """
    from ila.plots import plt, save_figure

    keys = [type_keys(r) for r in rankings]
    ordered = []  # module types in the model's order where the ranking records it (rank_layers does)
    for ranking, keyed in zip(rankings, keys, strict=True):
        recorded = [t for t in ranking.info.get("module_types", []) if t in keyed]
        ordered += [keyed[t] for t in recorded] + [keyed[e.module_type] for e in _model_order(ranking.layers)]
    types = [t for t in dict.fromkeys(ordered) if t != "lm_head"]
    if not types:
        types = ["lm_head"]
    cols = min(4, len(types))
    rows = math.ceil(len(types) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for index, module_type in enumerate(types):
        ax = axes[index // cols][index % cols]
        for ranking, label, key in zip(rankings, labels, keys, strict=True):
            n = len(ranking.layers)
            points = sorted(
                (e.block / max(ranking.n_blocks - 1, 1), 1.0 - (e.rank - 1) / max(n - 1, 1))
                for e in ranking.layers
                if e.block >= 0 and key[e.module_type] == module_type
            )
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker=".", label=label)
        ax.set_title(module_type, fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("relative depth", fontsize=8)
    for index in range(len(types), rows * cols):
        axes[index // cols][index % cols].axis("off")
    for row in axes:
        row[0].set_ylabel("rank percentile", fontsize=8)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 5), fontsize=8, bbox_to_anchor=(0.5, 0.0))
    save_figure(fig, path)  # saved with a tight bounding box, so the legend below the plots is kept
