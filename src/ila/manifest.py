"""manifest.json, the record beside every artifact, written and read by one class.

What ran (the command, the resolved config, the model and data with their hashes, the seed, package versions,
hardware), how it ended (status, error) and what it cost (timings, peak memory), plus the sections only one kind of
run records (Stage 1 and Stage 2 summaries, the selection, trainable parameters, held-out losses, SFT metrics).

Reading is tolerant by design: `ila report` and `ila experiment` read folders written by older versions of ila, so
a manifest that lacks a field (or spells an old one) gives None for it rather than an error. Only a file that is
not a JSON object is an error, named with its path.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ila.config import config_to_dict
from ila.errors import IlaError, reading
from ila.run_folder import hardware, write_json
from ila.versions import package_versions

if TYPE_CHECKING:
    from ila.model_loading import LoadedModel
    from ila.sft_data import SftData

FILE = "manifest.json"
# identify and milestone (Stage 2 on a saved Stage-1 milestone) hold rankings, rank a cheap ranking, finetune a
# trained selection, evaluate metrics of a model, report a side-by-side table of other folders
KINDS = ("identify", "milestone", "rank", "finetune", "evaluate", "report")
STATUSES = ("running", "complete", "failed")
_COMMON = ("kind", "status", "ila_command", "created", "config", "model", "data", "seed", "versions", "hardware")
_OUTCOME = ("timings", "memory", "error", "resumed")


@dataclass(frozen=True)
class ModelRecord:
    """The model a run loaded: as given, as resolved on disk, a fingerprint of its files, its class."""

    source: str
    resolved: str | None = None
    fingerprint: str | None = None
    class_name: str | None = None  # "class" in the file
    n_layers: int | None = None  # linear layers discovered (what a ranking ranks)

    @classmethod
    def of(cls, loaded: LoadedModel, n_layers: int | None = None) -> ModelRecord:
        # the model's own class: every caller records it before an adapter wraps it
        return cls(loaded.source, loaded.resolved_path, loaded.fingerprint, type(loaded.model).__name__, n_layers)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "resolved": self.resolved, "fingerprint": self.fingerprint}
        out["class"] = self.class_name
        if self.n_layers is not None:
            out["n_layers"] = self.n_layers
        return out

    @classmethod
    def from_json(cls, raw: Any) -> ModelRecord | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("source"), str):
            return None
        resolved, fingerprint, class_name = (_text(raw.get(k)) for k in ("resolved", "fingerprint", "class"))
        return cls(raw["source"], resolved, fingerprint, class_name, _integer(raw.get("n_layers")))


@dataclass(frozen=True)
class DataRecord:
    """The data a run read: its source, the sha256 of its rows, and how they were split."""

    source: str
    sha256: str | None = None
    rows: int | None = None
    train_examples: int | None = None
    eval_examples: int | None = None

    @classmethod
    def of(cls, data: SftData) -> DataRecord:
        stats = data.stats
        return cls(stats.source, stats.fingerprint, stats.rows, stats.train_examples, stats.eval_examples)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_json(cls, raw: Any) -> DataRecord | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("source"), str):
            return None
        counts = (_integer(raw.get(k)) for k in ("rows", "train_examples", "eval_examples"))
        return cls(raw["source"], _text(raw.get("sha256")), *counts)


def invoked(command: str = "") -> str:
    """The command line a manifest records: the one a caller names (the CLI passes its own argv), else this
    process's."""
    return command or " ".join(sys.argv)


@dataclass
class Manifest:
    """One run folder's manifest.json.

    `sections` holds what only this kind of run records, under its top-level key in the file (identify: stage1,
    stage2, heldout_loss; finetune: method, selection, trainable_params, training, artifacts, heldout_loss; rank:
    method, settings, adapter; evaluate: adapter, sft, samples; report: runs). The accessors below read the ones
    other code needs, whatever version of ila wrote them.
    """

    kind: str
    status: str = "running"
    command: str = field(default_factory=invoked)  # "ila_command" in the file
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    config: dict[str, Any] = field(default_factory=dict)
    model: ModelRecord | None = None
    data: DataRecord | None = None
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=package_versions)
    hardware: dict[str, Any] = field(default_factory=hardware)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    resumed: int = 0  # how many times an interrupted run was continued
    sections: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_training(
        cls, kind: str, cfg: Any, loaded: LoadedModel, data: SftData, n_layers: int, command: str = ""
    ) -> Manifest:
        """The start of an identify, milestone or finetune run's manifest: config, model, data, seed."""
        manifest = cls(
            kind, command=invoked(command), config=config_to_dict(cfg), model=ModelRecord.of(loaded, n_layers)
        )
        manifest.data, manifest.seed = DataRecord.of(data), cfg.run.seed
        return manifest

    # ----------------------------------------------------------------------------------------------- writing

    def write(self, folder: Path) -> None:
        write_json(folder / FILE, self.to_json())

    def finish(self, folder: Path, timings: dict[str, float], memory: dict[str, float], **sections: Any) -> None:
        """Status complete, with what the run cost and recorded; written last, after every other artifact, so
        that "complete" means every artifact is in place."""
        self.status, self.timings, self.memory = "complete", dict(timings), dict(memory)
        self.sections.update(sections)
        self.write(folder)

    def fail(self, folder: Path, error: str, timings: dict[str, float], memory: dict[str, float]) -> None:
        self.status, self.error, self.timings, self.memory = "failed", error, dict(timings), dict(memory)
        self.write(folder)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "status": self.status, "ila_command": self.command}
        out.update(created=self.created, config=self.config)
        out["model"] = self.model.to_json() if self.model is not None else None
        out["data"] = self.data.to_json() if self.data is not None else None  # null: the run read no data
        out.update(seed=self.seed, versions=self.versions, hardware=self.hardware)
        out.update({k: v for k, v in self.sections.items() if k not in _COMMON + _OUTCOME})
        if self.timings or self.status != "running":
            out.update(timings=self.timings, memory=self.memory)
        if self.error is not None:
            out["error"] = self.error
        if self.resumed:
            out["resumed"] = self.resumed
        return out

    # ----------------------------------------------------------------------------------------------- reading

    @classmethod
    def read(cls, folder: Path, name: str = FILE) -> Manifest | None:
        """The folder's manifest (or `name`: eval.json is an evaluate manifest with its results); None when the
        folder has no such file; an IlaError naming the file when it is not a JSON object."""
        path = folder / name
        if not path.is_file():
            return None
        with reading(path, "an ila manifest (JSON object)"):
            text = path.read_text(encoding="utf-8")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise IlaError(
                f"{path}:{err.lineno}: not valid JSON ({err.msg}); an ila manifest is a JSON object"
            ) from None
        if not isinstance(raw, dict):
            raise IlaError(f"{path}: an ila manifest is a JSON object, found {type(raw).__name__}")
        return cls.from_json(raw, folder)

    @classmethod
    def from_json(cls, raw: dict[str, Any], folder: Path | None = None) -> Manifest:
        """Any manifest ila ever wrote (eval.json too, which is an evaluate manifest with its results)."""
        config = raw.get("config")
        return cls(
            kind=_kind(raw, folder),
            status=_text(raw.get("status")) or "unknown",
            command=_text(raw.get("ila_command")) or "",
            created=_text(raw.get("created")) or "",
            config=config if isinstance(config, dict) else {},
            model=ModelRecord.from_json(raw.get("model")),
            data=DataRecord.from_json(raw.get("data")),
            seed=_integer(raw.get("seed")),
            versions=_mapping(raw.get("versions")),
            hardware=_mapping(raw.get("hardware")),
            timings={k: v for k, v in _mapping(raw.get("timings")).items() if _number(v) is not None},
            memory={k: v for k, v in _mapping(raw.get("memory")).items() if _number(v) is not None},
            error=_text(raw.get("error")),
            resumed=_integer(raw.get("resumed")) or 0,
            sections={k: v for k, v in raw.items() if k not in _COMMON + _OUTCOME},
        )

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def get(self, *keys: str) -> Any:
        """A value inside the kind's sections (or the config, with "config" first); None where any key is missing."""
        value: Any = self.config if keys[:1] == ("config",) else self.sections
        for key in keys[1:] if keys[:1] == ("config",) else keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def heldout_losses(self) -> tuple[float | None, float | None]:
        """(base, trained) held-out loss: from finetune's curve [{step, loss}] or identify's {base, stage1, ...}."""
        heldout = self.sections.get("heldout_loss")
        if isinstance(heldout, list):
            points = [_number(p.get("loss")) if isinstance(p, dict) else None for p in heldout]
            return (points[0], points[-1]) if points else (None, None)
        if isinstance(heldout, dict):
            return _number(heldout.get("base")), _number(heldout.get("stage1", heldout.get("final")))
        return None, _number(heldout)

    @property
    def trainable_params(self) -> int | None:
        value = self.sections.get("trainable_params")
        return _integer(value.get("count") if isinstance(value, dict) else value)

    @property
    def median_step_s(self) -> float | None:
        """Median seconds of one training step: finetune's loop, else identify's Stage 1."""
        for section in ("training", "train", "stage", "stage1"):
            value = _number(self.get(section, "median_step_s"))
            if value is not None:
                return value
        return None

    @property
    def peak_gb(self) -> float | None:
        """The larger of peak resident memory and peak CUDA memory."""
        values = [float(v) for v in self.memory.values()]
        return max(values) if values else None

    @property
    def total_seconds(self) -> float | None:
        return _number(self.timings.get("total"))


def _kind(raw: dict[str, Any], folder: Path | None) -> str:
    """The kind a manifest states; older ones (before "kind" was written everywhere) by what they record."""
    kind = raw.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    config = _mapping(raw.get("config"))
    if "milestone" in raw:
        return "milestone"
    if "settings" in raw and "method" in raw:
        return "rank"
    if {"method", "selection", "trainable_params"} & raw.keys() or "finetune" in config:
        return "finetune"
    if {"stage1", "stage2"} & raw.keys() or "stage1" in config:
        return "identify"
    if "sft" in raw:
        return "evaluate"
    if folder is not None and (folder / "ranking.json").is_file():
        return "identify"
    return "unknown"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    """A finite number, else None (a NaN loss reads as "not measured")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}
