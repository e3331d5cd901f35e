"""Comparison of rankings (ILA runs across data, seeds, milestones, models, and the baselines): are they stable?

Stage: reporting. Reads two or more ranking.json files; writes compare.md (tables), compare.json (every number),
overlap.png (top-K Jaccard heatmap) and profiles.png (importance by depth per module type). For each K: pairwise
Jaccard of the top-K sets with its chance level and a hypergeometric p-value, and the stable core; Spearman and
Kendall correlation of the full rankings. Rankings of different models are mapped by module type and relative depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from ila.errors import IlaError
from ila.ranking import LayerScore, Ranking, load_ranking
from ila.run_folder import atomic_write_text, write_json

DEFAULT_K_PERCENTS: tuple[float, ...] = (10, 25, 30, 50, 75)
DEFAULT_HEATMAP_PERCENT = 30.0
OUTPUT_FILES = ("compare.md", "compare.json", "overlap.png", "profiles.png")
MAPPING_NAMES = "layer names"
MAPPING_TYPE_DEPTH = "module type and relative depth"


# ----------------------------------------------------------------------------------------------- statistics


def jaccard(a: set[str] | frozenset[str], b: set[str] | frozenset[str]) -> float:
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


# -------------------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class PairOverlap:
    a: str
    b: str
    overlap: int
    jaccard: float
    p_value: float


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

    rankings: list[dict[str, Any]]  # label, method, model, layers, blocks, source
    n_layers: int  # layers compared
    mapping: str
    reference: str
    notes: list[str]
    levels: list[KLevel]
    correlations: list[PairCorrelation]
    heatmap: dict[str, Any]  # percent, k, labels, jaccard matrix

    def to_dict(self) -> dict[str, Any]:
        return {
            "rankings": self.rankings,
            "n_layers": self.n_layers,
            "mapping": self.mapping,
            "reference": self.reference,
            "notes": self.notes,
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
        lines += [
            "",
            "## Top-K overlap",
            "",
            "Jaccard of the top-K sets; p: one-sided hypergeometric test of the overlap against two random K-sets.",
            "",
            f"| pair | {head} |",
            "|---" * (len(self.levels) + 1) + "|",
        ]
        for index, pair in enumerate(self.levels[0].pairs if self.levels else []):
            cells = [f"{lv.pairs[index].jaccard:.3f} (p={lv.pairs[index].p_value:.2g})" for lv in self.levels]
            lines.append(f"| {pair.a} vs {pair.b} | " + " | ".join(cells) + " |")
        lines.append("| chance level | " + " | ".join(f"{lv.chance_jaccard:.3f}" for lv in self.levels) + " |")
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


def _jaccard_matrix(aligned: AlignedRankings, k: int) -> list[list[float]]:
    tops = [aligned.top(i, k) for i in range(len(aligned.labels))]
    return [[jaccard(a, b) for b in tops] for a in tops]


def compare_rankings(
    rankings: Sequence[Ranking],
    labels: Sequence[str] | None = None,
    k_percents: Sequence[float] = DEFAULT_K_PERCENTS,
    heatmap_percent: float = DEFAULT_HEATMAP_PERCENT,
    sources: Sequence[str | None] | None = None,
) -> Comparison:
    """Compare two or more rankings at each K (percent of the compared layers) and over the full order."""
    if len(rankings) < 2:
        raise IlaError(f"compare needs at least 2 rankings, got {len(rankings)}")
    if not k_percents:
        raise IlaError("give at least one K")
    labels = unique_labels(list(labels) if labels is not None else [r.method for r in rankings])
    if len(labels) != len(rankings):
        raise IlaError(f"{len(labels)} labels for {len(rankings)} rankings")
    aligned = align(rankings, labels)
    n, m = len(aligned.names), len(rankings)
    pairs = list(combinations(range(m), 2))
    levels = []
    for percent in k_percents:
        k = k_for_percent(percent, n)
        tops = [aligned.top(i, k) for i in range(m)]
        overlaps = [
            PairOverlap(
                labels[i],
                labels[j],
                len(tops[i] & tops[j]),
                jaccard(tops[i], tops[j]),
                overlap_p_value(len(tops[i] & tops[j]), n, k),
            )
            for i, j in pairs
        ]
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
    described = [
        {
            "label": label,
            "method": r.method,
            "model": r.info.get("model"),
            "n_layers": len(r.layers),
            "n_blocks": r.n_blocks,
            "source": (sources[i] if sources else None),
        }
        for i, (label, r) in enumerate(zip(labels, rankings, strict=True))
    ]
    return Comparison(described, n, aligned.mapping, aligned.reference, aligned.notes, levels, correlations, heatmap)


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


# ------------------------------------------------------------------------------------------ `ila compare`


def write_comparison(
    comparison: Comparison, rankings: Sequence[Ranking], out_dir: Path, overwrite: bool = False
) -> list[Path]:
    """compare.md, compare.json, overlap.png and profiles.png in `out_dir`; other files there are left alone."""
    paths = [out_dir / name for name in OUTPUT_FILES]
    existing = [p.name for p in paths if p.exists()]
    if existing and not overwrite:
        raise IlaError(f"{out_dir} already holds {', '.join(existing)}; choose another --output or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "compare.md", comparison.markdown())
    write_json(out_dir / "compare.json", comparison.to_dict())
    plot_overlap(comparison, out_dir / "overlap.png")
    plot_profiles(rankings, [r["label"] for r in comparison.rankings], out_dir / "profiles.png")
    return paths


def compare_files(
    paths: Sequence[str | Path],
    k_percents: Sequence[float] = DEFAULT_K_PERCENTS,
    heatmap_percent: float = DEFAULT_HEATMAP_PERCENT,
    labels: Sequence[str] | None = None,
) -> tuple[Comparison, list[Ranking]]:
    """Load ranking files (or run folders) and compare them; labels default to the folder or file names."""
    if len(paths) < 2:
        raise IlaError(f"compare needs at least 2 rankings, got {len(paths)}")
    rankings = [load_ranking(p) for p in paths]
    names = list(labels) if labels is not None else [label_for(p) for p in paths]
    comparison = compare_rankings(rankings, names, k_percents, heatmap_percent, [str(p) for p in paths])
    return comparison, rankings
