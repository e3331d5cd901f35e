"""Rankings: layers ordered by importance, the saved result that selection, comparison and export read.

`ranking.json` holds one entry per layer (name, block, module type, score, γ, rank, size) plus where the
ranking came from; `ranking.csv` is the same table for spreadsheets. Any method (ILA or a baseline) writes
this format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ila.errors import IlaError
from ila.layers import Layer
from ila.run_folder import write_csv, write_json

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerScore:
    name: str
    block: int
    module_type: str
    score: float
    gamma: float | None  # ILA's mask value σ(score); None for methods without one
    rank: int  # 1 = most important
    n_params: int
    rank_low: int | None = None  # best and worst rank over Stage-2 repeats (`stage2.repeats` > 1)
    rank_high: int | None = None


@dataclass
class Ranking:
    method: str
    layers: list[LayerScore]  # sorted by rank
    n_blocks: int
    info: dict[str, Any] = field(default_factory=dict)  # model, data, seed, milestone, stability trace ...

    def names(self) -> list[str]:
        return [entry.name for entry in self.layers]

    def top(self, k: int) -> list[str]:
        return self.names()[:k]

    def ranks(self) -> dict[str, int]:
        return {entry.name: entry.rank for entry in self.layers}

    def top_fraction(self, fraction: float) -> list[str]:
        return self.top(max(1, round(fraction * len(self.layers))))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "n_layers": len(self.layers),
            "n_blocks": self.n_blocks,
            "info": self.info,
            "layers": [asdict(e) for e in self.layers],
        }

    def save(self, folder: Path, stem: str = "ranking") -> None:
        write_json(folder / f"{stem}.json", self.to_dict())
        write_csv(folder / f"{stem}.csv", [asdict(e) for e in self.layers])


def rank_layers(
    layers: Sequence[Layer],
    scores: Sequence[float],
    method: str,
    gammas: Sequence[float] | None = None,
    info: dict[str, Any] | None = None,
    rank_intervals: Sequence[tuple[int, int]] | None = None,
) -> Ranking:
    """Sort by score, highest first; ties keep discovery order so the ranking is deterministic.

    `rank_intervals` (per layer, in `layers` order) gives the best and worst rank over repeated measurements.
    """
    if len(scores) != len(layers):
        raise ValueError(f"{len(scores)} scores for {len(layers)} layers")
    order = sorted(range(len(layers)), key=lambda i: (-scores[i], i))
    entries = [
        LayerScore(
            layers[i].name,
            layers[i].block,
            layers[i].module_type,
            float(scores[i]),
            None if gammas is None else float(gammas[i]),
            rank,
            layers[i].n_params,
            None if rank_intervals is None else rank_intervals[i][0],
            None if rank_intervals is None else rank_intervals[i][1],
        )
        for rank, i in enumerate(order, start=1)
    ]
    n_blocks = len({layer.block for layer in layers if layer.block >= 0})
    details = {"module_types": list(dict.fromkeys(layer.module_type for layer in layers)), **(info or {})}
    return Ranking(method, entries, n_blocks, details)


def load_ranking(path: str | Path) -> Ranking:
    """Read a ranking.json (or the ranking.json inside a run folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "ranking.json"
    if not p.is_file():
        raise IlaError(f"ranking not found: {path} (give a ranking.json or a run folder that holds one)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        entries = [LayerScore(**entry) for entry in data["layers"]]
        return Ranking(
            data["method"], sorted(entries, key=lambda e: e.rank), int(data["n_blocks"]), data.get("info", {})
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # ValueError: bad JSON or bad UTF-8
        raise IlaError(f"{p}: not a valid ila ranking file ({type(err).__name__}: {err})") from None
