"""`ila experiment`: a declared grid (data sets x seeds x milestones x methods, optional fine-tuning) run resumably.

Reads an experiment YAML; writes one folder per unit (identify run, milestone ranking, baseline ranking, finetune
run) under the experiment folder, skipping units that are already complete, then report.md with overlap tables.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from ila.config import (
    DEFAULT_MODEL,
    FinetuneConfig,
    IdentifyConfig,
    build_config,
    config_to_dict,
    drop_remote_code,
    merge,
    parse_overrides,
    read_yaml,
)
from ila.errors import IlaError
from ila.html_report import write_html_report
from ila.ranking import Ranking, load_ranking
from ila.run_folder import atomic_write_text, write_json, write_yaml

log = logging.getLogger(__name__)

ILA = "ila"
FINETUNE_RULES = ("freeze-bottom", "top", "params", "ranks", "all")
SEED_FREE = ("first", "last", "snr", "spectrum")  # baselines that read neither the seed nor the data
DATA_FREE = ("random", "first", "last", "snr", "spectrum")
MILESTONE_METHODS = (ILA, "delta-norm")  # the only methods that read the Stage-1 update


TrainingMethod = Literal["lora", "adalora", "qlora", "full"]


@dataclass(frozen=True)
class ExperimentFinetune:
    """`finetune:` train the layers each rule selects, from the base model, with the same steps for all."""

    steps: int = 100
    # Training methods: every unit runs under each; folder names start with the method unless it is lora.
    method: tuple[TrainingMethod, ...] = ("lora",)
    fractions: tuple[float, ...] = (0.1, 0.3, 1.0)  # rule top: the top fraction of each ranking (the ablation)
    freeze_bottom: float = 0.25  # rule freeze-bottom: the least important fraction left frozen
    # rule params: the best layers of each ranking up to this share of the all-layers trainable parameters
    # (counted for the training method), so rankings are compared at equal parameters as well as equal layers
    param_fractions: tuple[float, ...] = (0.3,)
    # rule ranks (LoRA only): every layer, each with a LoRA rank from its score, within the same parameter shares
    rank_methods: tuple[str, ...] = (ILA,)
    rules: tuple[str, ...] = ("freeze-bottom", "top", "all")
    # Ranking methods whose rankings select layers; default: every method. `ila@25` (or `delta-norm@25`) is that
    # method's ranking from the 25% Stage-1 milestone, which must be one of the experiment's milestones.
    methods: tuple[str, ...] = ()
    per_type: tuple[str, ...] = ("spectrum",)  # methods selected within each module type (Spectrum's own rule)
    # random: a new permutation for every train seed (seeded by it), so the random baseline's spread includes
    # the draw; false: the ranking seed's one permutation for all train seeds
    random_per_seed: bool = True
    data: str | None = None  # the data set (name) trained on and ranked on; default: the first
    seed: int | None = None  # the seed whose rankings select; default: the first
    # Data sets whose rankings select (the transfer test: a ranking from one data set, fine-tuned on another).
    # Default: the fine-tuning data set alone. Data-free methods rank alike everywhere and run once.
    ranked_on: tuple[str, ...] = ()
    transfer_methods: tuple[str, ...] = ()  # methods fine-tuned from the other ranked_on data sets; default: all
    # Training seeds (data split and order, adapter init): each unit runs once per seed with the same selection,
    # so method differences can be read against the seed-to-seed spread. Default: the ranking seed alone.
    train_seeds: tuple[int, ...] = ()
    overrides: tuple[str, ...] = ()  # FinetuneConfig `section.key=value` (from a mapping of dotted keys)
    # Per training method, applied after `overrides` (say a learning rate for full): (method, `section.key=value`)
    method_overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise IlaError(f"finetune.steps={self.steps} must be >= 1")
        if not self.method or len(set(self.method)) != len(self.method):
            raise IlaError(f"finetune.method={list(self.method)} must name each training method once")
        for key, values in (("fractions", self.fractions), ("param_fractions", self.param_fractions)):
            if any(not 0 < f <= 1 for f in values):
                raise IlaError(f"finetune.{key}={list(values)} must be fractions in (0, 1]")
        if not 0 <= self.freeze_bottom < 1:
            raise IlaError(f"finetune.freeze_bottom={self.freeze_bottom} must lie in [0, 1)")
        if len(set(self.train_seeds)) != len(self.train_seeds):
            raise IlaError(f"finetune.train_seeds={list(self.train_seeds)} lists a seed twice")
        for method, _ in self.method_overrides:
            if method not in self.method:
                allowed = list(self.method)
                raise IlaError(f"finetune.method_overrides: '{method}' is not one of finetune.method {allowed}")
        for rule in self.rules:
            if rule not in FINETUNE_RULES:
                raise IlaError(f"finetune.rules: unknown rule '{rule}'; allowed: {', '.join(FINETUNE_RULES)}")


def split_milestone(method: str) -> tuple[str, int]:
    """`ila@25` -> ("ila", 25); `ila` -> ("ila", 100)."""
    name, _, at = method.partition("@")
    if not at:
        return name, 100
    if not at.isdigit() or not 0 < int(at) < 100:
        raise IlaError(f"finetune.methods: '{method}': the milestone after '@' must be a percentage in (0, 100)")
    return name, int(at)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything `ila experiment` needs; paths are resolved against the YAML file's folder."""

    model: str = DEFAULT_MODEL
    datasets: tuple[tuple[str, str], ...] = ()  # (name, path) in the order given
    seeds: tuple[int, ...] = (0,)
    milestones: tuple[int, ...] = (25, 50, 100)  # percent of the Stage-1 steps; 100 is the final ranking
    methods: tuple[str, ...] = (ILA, "random", "last", "first")
    identify: tuple[str, ...] = ()  # IdentifyConfig `section.key=value` overrides, shared by every unit
    k_percents: tuple[float, ...] = (10.0, 30.0, 50.0)
    threads: int | None = None
    output: str | None = None  # default: runs/experiment-<config file stem>
    finetune: ExperimentFinetune | None = None
    trust_remote_code: bool = False  # from the command line only, never from the YAML

    def __post_init__(self) -> None:
        from ila.baselines import METHODS

        if not self.datasets:
            raise IlaError("datasets: give at least one data set (name: path)")
        for name, _ in self.datasets:  # names become folder names: they must not reach outside the run folder
            if not _SAFE_NAME.fullmatch(name):
                raise IlaError(
                    f"datasets: name {name!r} is not allowed; use letters, digits, '_', '-' and '.' "
                    "(not starting with '.'), since it names folders inside the experiment folder"
                )
        if not self.seeds:
            raise IlaError("seeds: give at least one seed")
        if any(not 0 < m <= 100 for m in self.milestones):
            raise IlaError(f"milestones={list(self.milestones)} must be percentages in (0, 100]")
        for method in self.methods:
            if method != ILA and method not in METHODS:
                raise IlaError(f"methods: unknown method '{method}'; allowed: {ILA}, {', '.join(METHODS)}")
        if any(not 0 < k <= 100 for k in self.k_percents):
            raise IlaError(f"k_percents={list(self.k_percents)} must be percentages in (0, 100]")
        if self.finetune is not None:
            names = [name for name, _ in self.datasets]
            if self.finetune.data is not None and self.finetune.data not in names:
                raise IlaError(f"finetune.data={self.finetune.data!r} is not a data set; allowed: {', '.join(names)}")
            for name in self.finetune.ranked_on:
                if name not in names:
                    raise IlaError(f"finetune.ranked_on: {name!r} is not a data set; allowed: {', '.join(names)}")
            if self.finetune.seed is not None and self.finetune.seed not in self.seeds:
                raise IlaError(f"finetune.seed={self.finetune.seed} is not one of seeds {list(self.seeds)}")
            for method in self.finetune.methods:
                name, milestone = split_milestone(method)
                if name not in self.methods:
                    raise IlaError(f"finetune.methods: '{name}' is not one of methods {list(self.methods)}")
                if milestone != 100 and (name not in MILESTONE_METHODS or milestone not in self.milestones):
                    raise IlaError(
                        f"finetune.methods: '{method}' needs a method that reads the Stage-1 update "
                        f"({', '.join(MILESTONE_METHODS)}) and a milestone among {list(self.milestones)}"
                    )
            for method in self.finetune.rank_methods if "ranks" in self.finetune.rules else ():
                if method not in (self.finetune.methods or self.methods):
                    raise IlaError(f"finetune.rank_methods: '{method}' is not one of the fine-tuned methods")
            for method in self.finetune.transfer_methods:
                if method not in (self.finetune.methods or self.methods):
                    raise IlaError(f"finetune.transfer_methods: '{method}' is not one of the fine-tuned methods")
            for method in self.finetune.per_type:
                if method != ILA and method not in METHODS:
                    raise IlaError(
                        f"finetune.per_type: unknown method '{method}'; allowed: {ILA}, {', '.join(METHODS)}"
                    )

    @property
    def data_paths(self) -> dict[str, str]:
        return dict(self.datasets)


def _dotted_pairs(values: Any, key: str, prefix: str = "") -> list[str]:
    """A mapping (nested, or with dotted keys) as `section.key=value` override strings; `key` names it in errors."""
    import json

    if values is None:
        return []
    if not isinstance(values, dict):
        raise IlaError(f"{key} must be a mapping of section.key: value")
    out = []
    for name, value in values.items():
        if isinstance(value, dict):
            out += _dotted_pairs(value, f"{key}.{name}", f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}={json.dumps(value)}")  # JSON is YAML: parse_overrides reads it back
    return out


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    if p.is_absolute() or (not (base / p).exists() and not p.suffix):
        return str(p)  # absolute, or a hub id such as "tatsu-lab/alpaca"
    return str((base / p).resolve())


def load_experiment(path: str | Path, trust_remote_code: bool = False) -> ExperimentConfig:
    """Read and check an experiment YAML; unknown keys are IlaErrors naming the dotted key. The YAML cannot turn
    on the model's own code; `trust_remote_code` (the command line's flag) can."""
    path = Path(path)
    raw = read_yaml(path)
    base = path.resolve().parent
    values = dict(raw)
    datasets = values.pop("datasets", None)
    if not isinstance(datasets, dict) or not datasets:
        raise IlaError(f"{path}: datasets must be a mapping of name: path (at least one)")
    identify = _dotted_pairs(values.pop("identify", None), "identify")
    finetune = values.get("finetune")
    ft_overrides: list[str] = []
    method_overrides: list[tuple[str, str]] = []
    if isinstance(finetune, dict):
        finetune = dict(finetune)
        ft_overrides = _dotted_pairs(finetune.pop("overrides", None), "finetune.overrides")
        by_method = finetune.pop("method_overrides", None) or {}
        if not isinstance(by_method, dict):
            raise IlaError(f"{path}: finetune.method_overrides must be a mapping of training method: overrides")
        method_overrides = [
            (str(method), item)
            for method, values in by_method.items()
            for item in _dotted_pairs(values, f"finetune.method_overrides.{method}")
        ]
        values["finetune"] = finetune
    pairs = tuple((str(name), _resolve(str(p), base)) for name, p in datasets.items())
    model = values.get("model")
    if isinstance(model, str):
        values["model"] = _resolve(model, base)
    if values.get("output") is not None:
        values["output"] = _resolve(str(values["output"]), base)
    # datasets, identify and finetune.overrides are mappings the generic loader cannot type; the rest is checked
    # field by field by build_config (unknown keys name the dotted key)
    plain = {k: v for k, v in values.items() if k != "finetune"}
    cfg = build_config(_ExperimentFields, plain)
    ft = build_config(ExperimentFinetune, values["finetune"], prefix="finetune.") if "finetune" in values else None
    if ft is not None:
        ft = replace(ft, overrides=tuple(ft_overrides), method_overrides=tuple(method_overrides))
    config = ExperimentConfig(
        model=cfg.model,
        datasets=pairs,
        seeds=cfg.seeds,
        milestones=cfg.milestones,
        methods=cfg.methods,
        identify=tuple(identify),
        k_percents=cfg.k_percents,
        threads=cfg.threads,
        output=cfg.output,
        finetune=ft,
        trust_remote_code=trust_remote_code,
    )
    for section in (config.identify, ft.overrides if ft is not None else ()):
        drop_remote_code(parse_overrides(list(section)), str(path))  # warns once if the YAML asks for remote code
    identify_config(config, pairs[0][1], config.seeds[0], "unused")  # overrides: unknown keys fail now
    if ft is not None:
        for training in ft.method:
            finetune_config(config, "unused", None, training=training)
    return config


@dataclass(frozen=True)
class _ExperimentFields:
    """The plainly typed keys of an experiment YAML (checked by build_config)."""

    model: str = DEFAULT_MODEL
    seeds: tuple[int, ...] = (0,)
    milestones: tuple[int, ...] = (25, 50, 100)
    methods: tuple[str, ...] = (ILA, "random", "last", "first")
    k_percents: tuple[float, ...] = (10.0, 30.0, 50.0)
    threads: int | None = None
    output: str | None = None


def _with_remote_code(values: dict[str, Any], trusted: bool) -> dict[str, Any]:
    """The experiment YAML's say on remote code is dropped (load_experiment warned); the command line's stands."""
    model = {k: v for k, v in values.get("model", {}).items() if k != "trust_remote_code"}
    return {**values, "model": {**model, "trust_remote_code": trusted}}


def identify_config(cfg: ExperimentConfig, data_path: str, seed: int, output: str) -> IdentifyConfig:
    """The IdentifyConfig of one identify unit: shared overrides, then model, data, seed, milestones, output."""
    values = parse_overrides([f"identify.{item}" for item in cfg.identify]).get("identify", {})
    values = _with_remote_code(values, cfg.trust_remote_code)
    run: dict[str, Any] = {"seed": seed, "output": output}
    if cfg.threads:
        run["threads"] = cfg.threads
    values = merge(
        values,
        {
            "model": {"name": cfg.model},
            "data": {"path": data_path},
            "run": run,
            "stage1": {"milestones": sorted(set(cfg.milestones) | {100})},
        },
    )
    try:
        return build_config(IdentifyConfig, values, prefix="")
    except IlaError as err:
        raise IlaError(f"identify: {err}") from None


def finetune_config(
    cfg: ExperimentConfig,
    output: str,
    selection: str | None,
    train_seed: int | None = None,
    training: TrainingMethod | None = None,
) -> FinetuneConfig:
    """The FinetuneConfig of one finetune unit; data and LoRA settings follow the identify overrides."""
    assert cfg.finetune is not None
    ft = cfg.finetune
    training = training or ft.method[0]
    shared = parse_overrides([f"identify.{item}" for item in cfg.identify]).get("identify", {})
    values: dict[str, Any] = {key: shared[key] for key in ("data", "lora") if key in shared}
    own = [item for method, item in ft.method_overrides if method == training]
    values = merge(values, parse_overrides([f"finetune.{item}" for item in (*ft.overrides, *own)]).get("finetune", {}))
    values = _with_remote_code(values, cfg.trust_remote_code)
    seed = _finetune_seed(cfg) if train_seed is None else train_seed
    run: dict[str, Any] = {"seed": seed, "output": output}
    if cfg.threads:
        run["threads"] = cfg.threads
    values = merge(
        values,
        {
            "model": {"name": cfg.model},
            "data": {"path": cfg.data_paths[_finetune_data(cfg)]},
            "finetune": {"method": training, "max_steps": ft.steps, "selection": selection},
            "run": run,
        },
    )
    try:
        return build_config(FinetuneConfig, values)
    except IlaError as err:
        raise IlaError(f"finetune.overrides: {err}") from None


def _finetune_data(cfg: ExperimentConfig) -> str:
    assert cfg.finetune is not None
    return cfg.finetune.data or cfg.datasets[0][0]


def _finetune_seed(cfg: ExperimentConfig) -> int:
    assert cfg.finetune is not None
    return cfg.finetune.seed if cfg.finetune.seed is not None else cfg.seeds[0]


def train_seeds(cfg: ExperimentConfig) -> tuple[int, ...]:
    assert cfg.finetune is not None
    return cfg.finetune.train_seeds or (_finetune_seed(cfg),)


def finetune_folder(cfg: ExperimentConfig, root: Path, name: str, train_seed: int) -> Path:
    """The run at the ranking seed keeps the plain unit name, so adding train seeds later reuses it."""
    suffix = "" if train_seed == _finetune_seed(cfg) else f"-train-seed{train_seed}"
    return root / "finetune" / f"{name}{suffix}"


# ------------------------------------------------------------------------------------------- units and folders


def _is_complete(folder: Path) -> bool:
    import json

    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("status") == "complete"


def identify_dir(root: Path, data: str, seed: int) -> Path:
    return root / "identify" / f"{data}-seed{seed}"


def ranking_dir(root: Path, method: str, data: str, seed: int, milestone: int = 100) -> Path:
    """Where one ranking lives; baselines that ignore the data or the seed share one folder across them."""
    if method == ILA:
        run = identify_dir(root, data, seed)
        return run if milestone == 100 else run / f"milestone-{milestone}"
    parts = [method]
    if method not in DATA_FREE:
        parts.append(data)
    if method not in SEED_FREE:
        parts.append(f"seed{seed}")
    if method == "delta-norm" and milestone != 100:
        parts.append(f"milestone-{milestone}")
    return root / "rank" / "-".join(parts)


@dataclass
class ExperimentResult:
    root: Path
    computed: list[str] = field(default_factory=list)  # units run by this call (folder paths)
    skipped: list[str] = field(default_factory=list)  # units already complete
    missing: list[str] = field(default_factory=list)  # units that could not be computed (with the reason)
    report: Path | None = None


def run_experiment(cfg: ExperimentConfig, output: str | Path | None = None) -> ExperimentResult:
    """Run every unit of the grid that is not complete yet, then write report.md."""
    root = Path(output or cfg.output or "runs/experiment")
    root.mkdir(parents=True, exist_ok=True)
    write_yaml(root / "experiment.yaml", _plain(cfg))
    result = ExperimentResult(root)
    total = planned_units(cfg)
    seconds: list[float] = []  # per computed unit: the ETA assumes the remaining units cost the same on average
    bar = tqdm(total=total, desc="experiment", unit="unit", dynamic_ncols=True)

    def unit(folder: Path, work: Callable[[], Any]) -> None:
        if not folder.resolve().is_relative_to(root.resolve()):  # names are checked; this is the last guard
            raise IlaError(f"experiment unit {folder} would be written outside {root}")
        done = len(result.computed) + len(result.skipped) + len(result.missing)
        if _is_complete(folder):
            result.skipped.append(str(folder))
            bar.update()
            return
        left = total - done
        eta = f", ETA {_duration(statistics.fmean(seconds) * left)}" if seconds else ""
        log.info("experiment unit %d of %d: %s%s", done + 1, total, folder.relative_to(root), eta)
        bar.set_postfix_str(str(folder.relative_to(root)))
        started = time.perf_counter()
        try:
            work()
        except IlaError as err:  # one failed unit (say a non-finite loss) must not stop a grid of hours
            log.error("experiment unit %s failed: %s", folder, err)
            result.missing.append(f"{folder} (failed: {err})")
            return
        finally:
            bar.update()
        seconds.append(time.perf_counter() - started)
        result.computed.append(str(folder))

    for data, data_path in cfg.datasets:
        for seed in cfg.seeds:
            _identify_units(cfg, root, data, data_path, seed, unit, result)
    for data, data_path in cfg.datasets:
        for seed in cfg.seeds:
            _baseline_units(cfg, root, data, data_path, seed, unit, result)
    if cfg.finetune is not None:
        _random_units(cfg, root, unit, result)
        _finetune_units(cfg, root, unit)
    bar.close()
    result.report = root / "report.md"
    atomic_write_text(result.report, write_report(cfg, root, result))
    write_html_report(result.report)
    return result


def planned_units(cfg: ExperimentConfig) -> int:
    """How many units the grid has (computed, skipped or missing), counted as run_experiment walks them."""
    per_run = 0  # per (data set, seed)
    if ILA in cfg.methods or "delta-norm" in cfg.methods:
        per_run += 1  # the identify run
        if ILA in cfg.methods:
            per_run += len(set(cfg.milestones) - {100})
    for method in cfg.methods:
        if method != ILA:
            per_run += len(set(cfg.milestones) | {100}) if method == "delta-norm" else 1
    finetune = 0
    if cfg.finetune is not None:
        finetune = len(finetune_units(cfg)) * len(train_seeds(cfg)) + len(random_seeds(cfg)) - len(cfg.seeds)
    return per_run * len(cfg.datasets) * len(cfg.seeds) + finetune


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _identify_units(
    cfg: ExperimentConfig,
    root: Path,
    data: str,
    data_path: str,
    seed: int,
    unit: Callable[[Path, Callable[[], Any]], None],
    result: ExperimentResult,
) -> None:
    from ila.identify import resume_identify, run_identify, run_milestone

    if ILA not in cfg.methods and "delta-norm" not in cfg.methods:
        return
    run_dir = identify_dir(root, data, seed)

    def identify() -> None:
        if (run_dir / "config.yaml").is_file() and (run_dir / "stage1").is_dir():
            resume_identify(run_dir, command="ila experiment")  # continue from its checkpoints
        else:
            run_identify(identify_config(cfg, data_path, seed, str(run_dir)), overwrite=True, command="ila experiment")

    unit(run_dir, identify)
    if ILA not in cfg.methods:
        return
    for milestone in sorted(set(cfg.milestones) - {100}):
        folder = ranking_dir(root, ILA, data, seed, milestone)
        stage1_adapter = run_dir / "stage1" / f"milestone-{milestone}" / "adapter_config.json"
        if not _is_complete(folder) and not stage1_adapter.is_file():  # kept results carry no adapters
            result.missing.append(f"{folder} (Stage 1 stopped before milestone {milestone}%)")
            continue

        def rank_milestone(milestone: int = milestone) -> None:
            run_milestone(run_dir, milestone, overwrite=True, command="ila experiment")

        unit(folder, rank_milestone)


def _baseline_units(
    cfg: ExperimentConfig,
    root: Path,
    data: str,
    data_path: str,
    seed: int,
    unit: Callable[[Path, Callable[[], Any]], None],
    result: ExperimentResult,
    methods: Sequence[str] | None = None,
) -> None:
    """The baseline rankings of one data set and seed (`methods`, default every method of the grid)."""
    from ila.baselines import BaselineSettings, run_rank

    icfg = identify_config(cfg, data_path, seed, "unused")
    settings = BaselineSettings(seed=seed, lora=icfg.lora)
    for method in cfg.methods if methods is None else methods:
        if method == ILA:
            continue
        milestones = sorted(set(cfg.milestones) | {100}) if method == "delta-norm" else [100]
        for milestone in milestones:
            folder = ranking_dir(root, method, data, seed, milestone)
            adapter = None
            if method == "delta-norm":
                stage1 = identify_dir(root, data, seed) / "stage1"
                adapter = stage1 / ("adapter" if milestone == 100 else f"milestone-{milestone}")
                if not _is_complete(folder) and not (adapter / "adapter_config.json").is_file():
                    result.missing.append(f"{folder} (no Stage-1 adapter {adapter})")
                    continue

            def work(method: str = method, folder: Path = folder, adapter: Path | None = adapter) -> None:
                run_rank(
                    method,
                    cfg.model,
                    data=None if method in DATA_FREE else data_path,
                    adapter=str(adapter) if adapter else None,
                    output=str(folder),
                    settings=settings,
                    max_length=icfg.data.max_length,
                    include_lm_head=icfg.model.include_lm_head,
                    trust_remote_code=cfg.trust_remote_code,
                    threads=cfg.threads,
                    overwrite=True,
                    command="ila experiment",
                )

            unit(folder, work)


def _random_units(
    cfg: ExperimentConfig, root: Path, unit: Callable[[Path, Callable[[], Any]], None], result: ExperimentResult
) -> None:
    """The random rankings of train seeds that are not ranking seeds (finetune.random_per_seed)."""
    data, data_path = cfg.datasets[0]
    for seed in random_seeds(cfg)[len(cfg.seeds) :]:
        _baseline_units(cfg, root, data, data_path, seed, unit, result, methods=("random",))


@dataclass(frozen=True)
class FinetuneUnit:
    name: str  # folder name under finetune/
    method: str | None  # the ranking method that selects; None: every layer
    rule: str
    fraction: float  # of the layers trained (rule params: of the all-layers trainable parameters)
    ranked_on: str  # the data set whose ranking selects
    label: str  # the ranking as tables name it: the method, and its data set when that is not the trained one
    training: TrainingMethod = "lora"
    milestone: int = 100  # the Stage-1 milestone whose ranking selects (ila@25)
    per_type: bool = False  # the rule is applied within each module type


def finetune_units(cfg: ExperimentConfig) -> list[FinetuneUnit]:
    """Every finetune unit, in report order: per training method, all layers, then per ranking (own data set
    first) its rules."""
    assert cfg.finetune is not None
    ft = cfg.finetune
    data = _finetune_data(cfg)
    methods = ft.methods or cfg.methods
    out: list[FinetuneUnit] = []
    for training in ft.method:
        prefix = "" if training == "lora" else f"{training}-"
        if "all" in ft.rules:
            out.append(FinetuneUnit(f"{prefix}all", None, "all", 1.0, data, "-", training))
        for ranked_on in sorted(ft.ranked_on or (data,), key=lambda name: name != data):  # stable: own data first
            for spelled in methods:
                method, milestone = split_milestone(spelled)
                if ranked_on != data and method in DATA_FREE:
                    continue  # the same ranking as on the fine-tuning data
                if ranked_on != data and ft.transfer_methods and spelled not in ft.transfer_methods:
                    continue
                per_type = method in ft.per_type
                own = ranked_on == data
                slug = method if milestone == 100 else f"{method}-m{milestone}"
                suffix = ("-per-type" if per_type and method not in _PER_TYPE_BY_NATURE else "") + (
                    "" if ranked_on == data else f"-from-{ranked_on}"
                )
                label = spelled + (" per type" if per_type else "")
                label = label if ranked_on == data else f"{label} from {ranked_on}"
                wanted: list[tuple[str, str, float]] = []  # (rule, its name in the folder, fraction)
                if "freeze-bottom" in ft.rules:
                    wanted.append(
                        ("freeze-bottom", f"freeze-bottom{round(ft.freeze_bottom * 100)}", 1 - ft.freeze_bottom)
                    )
                if "top" in ft.rules:
                    wanted += [("top", f"top{round(f * 100)}", f) for f in ft.fractions if f < 1.0]
                if "params" in ft.rules:
                    wanted += [("params", f"params{round(f * 100)}", f) for f in ft.param_fractions if f < 1.0]
                if "ranks" in ft.rules and spelled in ft.rank_methods and training in ("lora", "qlora") and own:
                    wanted += [("ranks", f"ranks{round(f * 100)}", f) for f in ft.param_fractions if f < 1.0]
                out += [
                    FinetuneUnit(
                        f"{prefix}{slug}-{part}{suffix}",
                        method,
                        rule,
                        f,
                        ranked_on,
                        label,
                        training,
                        milestone,
                        per_type,
                    )
                    for rule, part, f in wanted
                ]
    return out


# Spectrum selects within each module type by definition: its folder names need no "-per-type"
_PER_TYPE_BY_NATURE = ("spectrum",)


def walk_order(cfg: ExperimentConfig, units: Sequence[FinetuneUnit]) -> list[FinetuneUnit]:
    """The order units are computed in, so that an interrupted grid has whole comparisons: all layers first, then
    each fraction in the YAML's order (every training method and ranking at it), then freeze-bottom, then per
    parameter share the LoRA ranks from scores and the parameter budgets. The report keeps finetune_units' order."""
    assert cfg.finetune is not None
    ft = cfg.finetune

    def priority(each: FinetuneUnit) -> tuple[int, int, int]:
        if each.rule == "all":
            group = 0
        elif each.rule == "top":
            group = 1 + ft.fractions.index(each.fraction)
        elif each.rule == "freeze-bottom":
            group = 1 + len(ft.fractions)
        else:
            group = 2 + len(ft.fractions) + ft.param_fractions.index(each.fraction)
        return group, int(each.rule == "params"), ft.method.index(each.training)

    return sorted(units, key=priority)


def random_seeds(cfg: ExperimentConfig) -> list[int]:
    """The seeds random rankings are drawn with: the ranking seeds, and every train seed when each train seed
    draws its own permutation."""
    seeds = list(cfg.seeds)
    if cfg.finetune is not None and cfg.finetune.random_per_seed and "random" in _finetune_methods(cfg):
        seeds += [s for s in train_seeds(cfg) if s not in seeds]
    return seeds


def _finetune_methods(cfg: ExperimentConfig) -> list[str]:
    assert cfg.finetune is not None
    return [split_milestone(m)[0] for m in cfg.finetune.methods or cfg.methods]


def unit_ranking(cfg: ExperimentConfig, root: Path, each: FinetuneUnit, train_seed: int) -> Path:
    """The ranking.json that selects a unit's layers under `train_seed`."""
    assert cfg.finetune is not None and each.method is not None
    seed = _finetune_seed(cfg)
    if each.method == "random" and cfg.finetune.random_per_seed:
        seed = train_seed
    return ranking_dir(root, each.method, each.ranked_on, seed, each.milestone) / "ranking.json"


def unit_rule(cfg: ExperimentConfig, each: FinetuneUnit, ranking: Path) -> Any:
    """The SelectionRule of a unit; a parameter budget is the fraction of the all-layers count for its method."""
    from ila.selection import SelectionRule, select_from_file

    assert cfg.finetune is not None
    counted: Literal["lora", "qlora", "full"] = "full" if each.training == "full" else "lora"
    r = finetune_config(cfg, "unused", None, training=each.training).lora.r
    if each.rule == "top":
        return SelectionRule("top_fraction", each.fraction, per_type=each.per_type)
    if each.rule == "freeze-bottom":
        return SelectionRule("freeze_bottom", cfg.finetune.freeze_bottom, per_type=each.per_type)
    everything = select_from_file(ranking, SelectionRule("all", method=counted, lora_r=r), cfg.model)
    total = everything.trainable_params[counted if counted == "full" else "lora"]
    if total is None:
        raise IlaError(f"a parameter budget needs the model's layer shapes ({cfg.model})")
    if each.rule == "ranks":
        return SelectionRule("lora_ranks", each.fraction * total, lora_r=r)
    return SelectionRule("param_budget", each.fraction * total, method=counted, lora_r=r, per_type=each.per_type)


def _finetune_units(cfg: ExperimentConfig, root: Path, unit: Callable[[Path, Callable[[], Any]], None]) -> None:
    from ila.finetune import run_finetune
    from ila.selection import select_from_file

    assert cfg.finetune is not None
    selections = root / "finetune" / "selections"
    for each, train_seed in product(walk_order(cfg, finetune_units(cfg)), train_seeds(cfg)):
        folder = finetune_folder(cfg, root, each.name, train_seed)

        def work(each: FinetuneUnit = each, folder: Path = folder, train_seed: int = train_seed) -> None:
            selection_path = None
            if each.method is not None:
                ranking = unit_ranking(cfg, root, each, train_seed)
                selection = select_from_file(ranking, unit_rule(cfg, each, ranking), cfg.model)
                selections.mkdir(parents=True, exist_ok=True)
                selection_path = selections / f"{folder.name}.json"
                selection.save(selection_path)
            config = finetune_config(
                cfg, str(folder), str(selection_path) if selection_path else None, train_seed, each.training
            )
            run_finetune(config, overwrite=True, command="ila experiment")

        unit(folder, work)


def _plain(cfg: ExperimentConfig) -> dict[str, Any]:
    out = config_to_dict(cfg)
    out["datasets"] = dict(cfg.datasets)
    return out


# ---------------------------------------------------------------------------------------------------- report


def _load(folder: Path) -> Ranking | None:
    path = folder / "ranking.json"
    return load_ranking(path) if path.is_file() else None


def _overlap_rows(
    cfg: ExperimentConfig, rankings: Sequence[Ranking], labels: Sequence[str], context: str
) -> tuple[list[str], dict[str, Any]]:
    from ila.compare import compare_rankings

    comparison = compare_rankings(rankings, labels, cfg.k_percents)
    rows = []
    for index, pair in enumerate(comparison.levels[0].pairs):
        cells = [f"{lv.pairs[index].jaccard:.3f} (p={lv.pairs[index].p_value:.2g})" for lv in comparison.levels]
        corr = comparison.correlations[index]
        rows.append(f"| {context} | {pair.a} vs {pair.b} | " + " | ".join(cells) + f" | {corr.spearman:.3f} |")
    return rows, comparison.to_dict()


def _overlap_table(
    cfg: ExperimentConfig,
    title: str,
    groups: list[tuple[str, list[Ranking], list[str]]],
    note: str,
    saved: dict[str, Any],
    key: str,
) -> list[str]:
    lines = [f"### {title}", "", note, ""]
    usable = [(context, r, labels) for context, r, labels in groups if len(r) >= 2]
    if not usable:
        return [*lines, "(not enough rankings for this comparison)", ""]
    head = " | ".join(f"top {k:g}%" for k in cfg.k_percents)
    lines += [f"| group | pair | {head} | Spearman |", "|---" * (len(cfg.k_percents) + 3) + "|"]
    chance: list[str] = []
    for context, rankings, labels in usable:
        rows, data = _overlap_rows(cfg, rankings, labels, context)
        lines += rows
        saved[f"{key}/{context}"] = data
        chance = [f"{level['chance_jaccard']:.3f}" for level in data["k"]]
    lines += ["| chance level | | " + " | ".join(chance) + " | 0 |", ""]
    return lines


def write_report(cfg: ExperimentConfig, root: Path, result: ExperimentResult | None = None) -> str:
    """report.md: overlap tables per method (cross-data-set, cross-seed, milestone vs final) and fine-tuning."""
    names = [name for name, _ in cfg.datasets]
    lines = [
        "# Experiment report",
        "",
        f"Model: `{cfg.model}`; data sets: {', '.join(names)}; seeds: "
        f"{', '.join(map(str, cfg.seeds))}; milestones: {', '.join(f'{m}%' for m in cfg.milestones)}; "
        f"methods: {', '.join(cfg.methods)}.",
        "",
        "Cells: Jaccard of the top-K sets (p: one-sided hypergeometric test against two random K-sets); "
        "Spearman over the full rankings. The chance level is the expected Jaccard of two random K-sets.",
        "",
    ]
    saved: dict[str, Any] = {}
    lines += _overview(cfg, root, names)
    for method in cfg.methods:
        lines += [f"## {method}", ""]
        if method in DATA_FREE:
            lines += [
                f"{method} does not read the data: its rankings are identical across data sets by construction.",
                "",
            ]
        else:
            groups = []
            for seed in cfg.seeds:
                pairs = [(name, _load(ranking_dir(root, method, name, seed))) for name in names]
                found = [(n, r) for n, r in pairs if r is not None]
                groups.append((f"seed {seed}", [r for _, r in found], [n for n, _ in found]))
            lines += _overlap_table(
                cfg, "Across data sets", groups, "Final rankings of each data set, per seed.", saved, f"{method}/data"
            )
        if method in SEED_FREE:
            lines += [f"{method} does not depend on the seed: identical across seeds by construction.", ""]
        else:
            groups = []
            for name in names[:1] if method in DATA_FREE else names:
                pairs2 = [(f"seed {s}", _load(ranking_dir(root, method, name, s))) for s in cfg.seeds]
                found2 = [(n, r) for n, r in pairs2 if r is not None]
                context = "any data set" if method in DATA_FREE else name
                groups.append((context, [r for _, r in found2], [n for n, _ in found2]))
            lines += _overlap_table(
                cfg, "Across seeds", groups, "Final rankings of each seed, per data set.", saved, f"{method}/seed"
            )
        early = sorted(set(cfg.milestones) - {100})
        if method in MILESTONE_METHODS and early:
            lines += [
                "### Milestone vs final",
                "",
                "Ranking from each Stage-1 milestone (percent of the planned steps) against the final ranking.",
                "",
            ]
            head = " | ".join(f"top {k:g}%" for k in cfg.k_percents)
            lines += [f"| group | pair | {head} | Spearman |", "|---" * (len(cfg.k_percents) + 3) + "|"]
            chance: list[str] = []
            for name in names:
                for seed in cfg.seeds:
                    final = _load(ranking_dir(root, method, name, seed))
                    for milestone in early:
                        at = _load(ranking_dir(root, method, name, seed, milestone))
                        if final is None or at is None:
                            continue
                        context = f"{name} seed {seed}"
                        rows, data = _overlap_rows(cfg, [at, final], [f"{milestone}%", "final"], context)
                        lines += rows
                        saved[f"{method}/milestone/{context}/{milestone}"] = data
                        chance = [f"{level['chance_jaccard']:.3f}" for level in data["k"]]
            lines += ["| chance level | | " + " | ".join(chance) + " | 0 |", ""]
        elif method not in MILESTONE_METHODS:
            lines += [f"{method} does not read the Stage-1 update: no milestone comparison.", ""]
    if ILA in cfg.methods and len(cfg.methods) > 1:
        lines += _against_methods(cfg, root, names, saved)
    if cfg.finetune is not None:
        lines += finetune_section(cfg, root)
    if result is not None and result.missing:
        lines += ["## Missing units", ""] + [f"- {item}" for item in result.missing] + [""]
    write_json(root / "comparisons.json", saved)
    return "\n".join(lines)


def _overview(cfg: ExperimentConfig, root: Path, names: list[str]) -> list[str]:
    """Two figures over the first seed: every final ranking's top-30% overlap, and ILA's score profiles by depth."""
    from ila.compare import compare_rankings, plot_overlap, plot_profiles

    seed = cfg.seeds[0]
    found: list[tuple[str, Ranking]] = []
    ila_found: list[tuple[str, Ranking]] = []  # (data set, ranking) for the profiles
    for method in cfg.methods:
        for name in names[:1] if method in DATA_FREE else names:
            ranking = _load(ranking_dir(root, method, name, seed))
            if ranking is None:
                continue
            if method in SEED_FREE:
                label = method
            elif method in DATA_FREE:
                label = f"{method} seed {seed}"
            else:
                label = f"{method} {name}"
            found.append((label, ranking))
            if method == ILA:
                ila_found.append((name, ranking))
    if len(found) < 2:
        return []
    comparison = compare_rankings([r for _, r in found], [label for label, _ in found], [30.0], 30.0)
    plot_overlap(comparison, root / "overlap.png")
    lines = [
        "## Overview",
        "",
        f"Top-30% overlap of every final ranking of seed {seed} (Jaccard in the cells):",
        "",
        "![overlap](overlap.png)",
        "",
    ]
    if ila_found:
        plot_profiles([r for _, r in ila_found], [f"ila {name}" for name, _ in ila_found], root / "profiles.png")
        lines += [
            f"ILA's scores by depth for each module type, per data set (seed {seed}):",
            "",
            "![profiles](profiles.png)",
            "",
        ]
    return lines


def _against_methods(cfg: ExperimentConfig, root: Path, names: list[str], saved: dict[str, Any]) -> list[str]:
    """ILA's final ranking against each other method's on the same data set and seed."""
    lines = [
        "## ila against the other methods",
        "",
        "ILA's final ranking against each other method's on the same data set and seed: how much of ILA's "
        "selection a cheaper rule picks anyway (high overlap with last or first means ILA mostly finds depth).",
        "",
    ]
    head = " | ".join(f"top {k:g}%" for k in cfg.k_percents)
    lines += [f"| method | pair | {head} | Spearman |", "|---" * (len(cfg.k_percents) + 3) + "|"]
    chance: list[str] = []
    for other in [m for m in cfg.methods if m != ILA]:
        for name in names:
            for seed in cfg.seeds:
                ila_ranking, theirs = (
                    _load(ranking_dir(root, ILA, name, seed)),
                    _load(ranking_dir(root, other, name, seed)),
                )
                if ila_ranking is None or theirs is None:
                    continue
                rows, data = _overlap_rows(cfg, [ila_ranking, theirs], [f"ila {name} seed {seed}", other], other)
                lines += rows
                saved[f"ila-vs/{other}/{name}/seed{seed}"] = data
                chance = [f"{level['chance_jaccard']:.3f}" for level in data["k"]]
    return [*lines, "| chance level | | " + " | ".join(chance) + " | 0 |", ""]


def finetune_rows(cfg: ExperimentConfig, root: Path) -> list[dict[str, Any]]:
    """One row per complete finetune run (unit x train seed): rule, ranking, fraction, layers, loss, cost."""
    import json

    rows = []
    for each, train_seed in product(finetune_units(cfg), train_seeds(cfg)):
        folder = finetune_folder(cfg, root, each.name, train_seed)
        if not _is_complete(folder):
            continue
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        selection = json.loads((folder / "selection.json").read_text(encoding="utf-8"))
        heldout = manifest.get("heldout_loss") or [{}]
        share = (selection.get("trainable_share") or {}).get("full" if each.training == "full" else "lora")
        rows.append(
            {
                "unit": each.name,
                "train_seed": train_seed,
                "training": each.training,
                "method": each.label,
                "rule": each.rule,
                "fraction": each.fraction,
                "layers": f"{selection.get('n_selected')}/{selection.get('n_layers')}",
                "lowest_block": selection.get("lowest_block"),
                "params": manifest.get("trainable_params", {}).get("count"),
                "share": 1.0 if each.rule == "all" else share,
                "base_loss": heldout[0].get("loss"),
                "loss": heldout[-1].get("loss"),
                "median_step_s": manifest.get("training", {}).get("median_step_s"),
                "peak_gb": max(manifest.get("memory", {}).values() or [float("nan")]),
                "train_examples": manifest.get("data", {}).get("train_examples"),
                "batch_size": manifest.get("config", {}).get("finetune", {}).get("batch_size"),
            }
        )
    return rows


def mean_over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per unit: losses averaged over its train seeds (listed in `losses`), step time their median."""
    from statistics import mean, median

    by_unit: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_unit.setdefault(row["unit"], []).append(row)
    out = []
    for runs in by_unit.values():
        losses = [r["loss"] for r in runs if r["loss"] is not None]
        bases = [r["base_loss"] for r in runs if r["base_loss"] is not None]
        steps = [r["median_step_s"] for r in runs if r["median_step_s"] is not None]
        shares = [r["share"] for r in runs if r.get("share") is not None]
        out.append(
            {
                **runs[0],
                "train_seed": None,
                "losses": losses,
                "loss": mean(losses) if losses else None,
                "base_loss": mean(bases) if bases else None,
                "median_step_s": median(steps) if steps else None,
                "peak_gb": max(r["peak_gb"] for r in runs),
                "share": mean(shares) if shares else None,  # random draws differ by seed
            }
        )
    return out


def paired_differences(rows: list[dict[str, Any]], method: str = ILA) -> list[str]:
    """Markdown: `method` minus each other ranking at the same training method, rule and fraction, paired by
    train seed."""
    from statistics import stdev

    def setting(row: dict[str, Any]) -> tuple[str, str, float]:
        return row.get("training", "lora"), row["rule"], row["fraction"]

    loss = {(r["method"], *setting(r), r["train_seed"]): r["loss"] for r in rows if r["loss"] is not None}
    several = len({r.get("training", "lora") for r in rows}) > 1
    lines = []
    for training, rule, fraction in sorted({setting(r) for r in rows if r["method"] == method}):
        for other in sorted({r["method"] for r in rows if r["method"] not in (method, "-")}):
            mine = {s for (m, t, ru, f, s) in loss if (m, t, ru, f) == (method, training, rule, fraction)}
            seeds = sorted(s for s in mine if (other, training, rule, fraction, s) in loss)
            if not seeds:
                continue
            diffs = [
                loss[(method, training, rule, fraction, s)] - loss[(other, training, rule, fraction, s)] for s in seeds
            ]
            wins = sum(d < 0 for d in diffs)
            values = ", ".join(f"{d:+.4f}" for d in diffs)
            spread = f"{stdev(diffs):.4f}" if len(diffs) > 1 else "-"
            where = f"{training} {rule} {fraction:.2f}" if several else f"{rule} {fraction:.2f}"
            lines.append(
                f"| {where} | {other} | {sum(diffs) / len(diffs):+.4f} | {spread} | {values} | {wins}/{len(diffs)} |"
            )
    if not lines:
        return []
    return [
        f"### {method} against the baselines",
        "",
        f"Held-out loss of {method}'s selection minus the baseline's at the same training method, rule and "
        f"fraction, paired by train seed (same data split and order); negative means {method} is better. The "
        "spread (standard deviation of the paired differences across seeds) is the noise floor a mean difference "
        "has to clear.",
        "",
        "| setting | baseline | mean difference | spread | per train seed | seeds where " + method + " is lower |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def ranks_against_budget(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: each ranking's LoRA ranks from scores (rule ranks) minus its top layers at full rank within the
    same LoRA-parameter share (rule params), paired by train seed."""
    from statistics import stdev

    loss = {
        (r["method"], r.get("training", "lora"), r["rule"], r["fraction"], r["train_seed"]): r["loss"]
        for r in rows
        if r["loss"] is not None
    }
    lines = []
    for method, training, fraction in sorted({(k[0], k[1], k[3]) for k in loss if k[2] == "ranks"}):
        seeds = sorted(
            s
            for (m, t, ru, f, s) in loss
            if (m, t, ru, f) == (method, training, "ranks", fraction)
            and (method, training, "params", fraction, s) in loss
        )
        if not seeds:
            continue
        diffs = [
            loss[(method, training, "ranks", fraction, s)] - loss[(method, training, "params", fraction, s)]
            for s in seeds
        ]
        spread = f"{stdev(diffs):.4f}" if len(diffs) > 1 else "-"
        lines.append(
            f"| {training} {fraction:.2f} | {method} | {sum(diffs) / len(diffs):+.4f} | {spread} | "
            f"{', '.join(f'{d:+.4f}' for d in diffs)} | {sum(d < 0 for d in diffs)}/{len(diffs)} |"
        )
    if not lines:
        return []
    return [
        "### LoRA ranks from scores against top layers at the same budget",
        "",
        "Held-out loss with every layer at a rank from its score (rule ranks) minus the same ranking's top layers "
        "at the uniform rank (rule params), both within the same share of the all-layers LoRA parameters, paired "
        "by train seed; negative means the ranks are better.",
        "",
        "| training, share | ranking | mean difference | spread | per train seed | seeds where ranks are lower |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def finetune_section(cfg: ExperimentConfig, root: Path) -> list[str]:
    assert cfg.finetune is not None
    runs = finetune_rows(cfg, root)
    rows = mean_over_seeds(runs)
    ft = cfg.finetune
    seeds = train_seeds(cfg)
    seed_note = (
        f"train seed {seeds[0]}"
        if len(seeds) == 1
        else f"mean over train seeds {', '.join(map(str, seeds))}; the values per seed in brackets"
    )
    random_note = (
        " random draws a new permutation for every train seed."
        if ft.random_per_seed and "random" in _finetune_methods(cfg)
        else ""
    )
    lines = [
        "## Fine-tuning",
        "",
        f"{', '.join(ft.method)}, {ft.steps} steps each, from the base model on {_finetune_data(cfg)} (rankings of "
        f"seed {_finetune_seed(cfg)}). Held-out loss: base -> after training ({seed_note}).{random_note}",
        "",
    ]
    if any(name != _finetune_data(cfg) for name in ft.ranked_on):
        lines += [
            f"'METHOD from DATA': that method's ranking on another data set, fine-tuned on {_finetune_data(cfg)} "
            "(does a ranking carry over?).",
            "",
        ]
    lines += [
        "'per type': the rule is applied within each module type (q, k, v, o, gate, up, down separately), as "
        "Spectrum does; rule params: the best layers up to that share of the all-layers trainable parameters; "
        "rule ranks: every layer, each with a LoRA rank from its score, within the same share of LoRA parameters. "
        "Backward has to reach the lowest selected block, so a step's cost follows that block more than the "
        "number of layers. Step time and peak memory come from each unit's own run, one unit at a time.",
        "",
        "| unit | rule | ranking | fraction | layers | trainable share | lowest block | trainable params | "
        "held-out loss | median step s | peak memory GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    for row in rows:
        each = f" ({', '.join(f'{v:.4f}' for v in row['losses'])})" if len(row["losses"]) > 1 else ""
        lines.append(
            f"| {row['unit']} | {row['rule']} | {row['method']} | {num(row['fraction'], '.2f')} | "
            f"{row['layers']} | {num(row['share'], '.1%')} | {num(row['lowest_block'], 'd')} | "
            f"{num(row['params'], ',')} | {num(row['base_loss'], '.4f')} -> "
            f"{num(row['loss'], '.4f')}{each} | {num(row['median_step_s'], '.3f')} | {num(row['peak_gb'], '.2f')} |"
        )
    lines.append("")
    lines += paired_differences(runs)
    lines += ranks_against_budget(runs)
    trainings = [t for t in ft.method if any(r["training"] == t for r in rows)]
    for training in trainings:
        # freeze-bottom f keeps the top 1 - f of the same ranking, so it is one more point on the fraction axis
        ablation = [r for r in rows if r["training"] == training and r["rule"] in ("top", "freeze-bottom", "all")]
        if not ablation:
            continue
        name = "ablation.png" if len(ft.method) == 1 else f"ablation-{training}.png"
        title = "### Ablation: selected fraction" + ("" if len(ft.method) == 1 else f" ({training})")
        lines += [
            title,
            "",
            "Held-out loss and median step time against the fraction of layers trained (rule top, and "
            f"freeze-bottom {ft.freeze_bottom:g} as the top {1 - ft.freeze_bottom:g}; fraction 1.0 is every layer).",
            "",
            *ablation_table(ablation),
            f"![ablation]({name})",
            "",
        ]
        plot_ablation(ablation, root / name)
    lines += cost_section(cfg, root, rows)
    if runs:
        write_json(root / "finetune.json", runs)
    return [*lines, ""]


def _manifest(folder: Path) -> dict[str, Any]:
    import json

    try:
        loaded = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def ranking_cost(cfg: ExperimentConfig, root: Path, method: str, milestone: int, data: str) -> float | None:
    """Seconds one ranking cost to produce from nothing, from its run folders' timings (None when a folder is
    missing): ila is the whole identify run; ila@m Stage 1 up to the milestone's step plus the milestone's own run
    (model load, Stage 2); delta-norm Stage 1 (to the milestone) plus its ranking run; every other method its
    ranking run. Identify's held-out evaluations count: a user pays them too."""
    from ila.stage1_lora import milestone_steps

    seed = _finetune_seed(cfg)
    identify = _manifest(identify_dir(root, data, seed))
    if method == ILA and milestone == 100:
        return identify.get("timings", {}).get("total")
    if method not in MILESTONE_METHODS:
        return _manifest(ranking_dir(root, method, data, seed)).get("timings", {}).get("total")
    timings, stage1 = identify.get("timings", {}), identify.get("stage1", {})
    steps, window = stage1.get("steps"), identify.get("config", {}).get("stage1", {}).get("window")
    if "stage 1" not in timings or not steps or not window:
        return None
    at = milestone_steps(steps, window, [milestone])[milestone]
    stage1_s = timings["stage 1"] * at / steps
    if method == ILA:
        own = _manifest(ranking_dir(root, ILA, data, seed, milestone)).get("timings", {}).get("total")
        return stage1_s + own if own is not None else None
    loads = timings.get("load model", 0.0) + timings.get("load data", 0.0)
    own = _manifest(ranking_dir(root, method, data, seed, milestone)).get("timings", {}).get("total")
    return stage1_s + loads + own if own is not None else None


def cost_section(cfg: ExperimentConfig, root: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: what each ranking cost, in seconds and in all-layers fine-tuning steps, and what ranking plus a
    selective fine-tune costs against an all-layers fine-tune of the same steps (40 steps, one epoch, and one
    ranking serving two data sets)."""
    assert cfg.finetune is not None
    ft = cfg.finetune
    step_all = {r["training"]: r["median_step_s"] for r in rows if r["rule"] == "all" and r["median_step_s"]}
    reference = step_all.get(ft.method[0])
    used = sorted(
        {(u.method, u.milestone, u.ranked_on, u.label) for u in finetune_units(cfg) if u.method},
        key=lambda item: [u.label for u in finetune_units(cfg)].index(item[3]),
    )
    costs: dict[str, float] = {}
    lines = [
        "### Cost",
        "",
        "What producing each ranking cost (seconds, from the timings in its run folders), and the same as a "
        f"number of all-layers {ft.method[0]} fine-tuning steps (median step of the all-layers unit). 'from DATA' "
        "rankings were produced on that data set.",
        "",
        "| ranking | seconds | all-layers steps |",
        "|---|---|---|",
    ]
    for method, milestone, ranked_on, label in used:
        seconds = ranking_cost(cfg, root, method, milestone, ranked_on)
        if seconds is None or label in costs:
            continue
        costs[label] = seconds
        steps = f"{seconds / reference:.0f}" if reference else "-"
        lines.append(f"| {label} | {seconds:.0f} | {steps} |")
    train_examples = next((r["train_examples"] for r in rows if r.get("train_examples")), None)
    batch = next((r["batch_size"] for r in rows if r.get("batch_size")), None)
    epoch = -(-train_examples // batch) if train_examples and batch else None
    horizons = [(f"{ft.steps} steps", ft.steps, 1)]
    if epoch:
        horizons += [(f"1 epoch ({epoch} steps)", epoch, 1), (f"2 data sets x {epoch} steps", epoch, 2)]
    lines += [
        "",
        "Ranking plus fine-tuning the selection, as a multiple of fine-tuning every layer for the same steps "
        "(below 1: the selection pays for its ranking). Step times are the units' medians; longer horizons assume "
        "the same step time, and '2 data sets' ranks once and fine-tunes twice.",
        "",
        "| training | ranking | rule, fraction | step vs all layers | " + " | ".join(h for h, _, _ in horizons) + " |",
        "|---|---|---|---|" + "---|" * len(horizons),
    ]
    for row in rows:
        full = step_all.get(row["training"])
        seconds = costs.get(row["method"])
        if row["rule"] == "all" or not full or seconds is None or not row["median_step_s"]:
            continue
        ratio = row["median_step_s"] / full
        cells = [f"{(seconds + n * runs * row['median_step_s']) / (n * runs * full):.2f}" for _, n, runs in horizons]
        lines.append(
            f"| {row['training']} | {row['method']} | {row['rule']} {row['fraction']:.2f} | {ratio:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def _ablation_points(rows: list[dict[str, Any]]) -> dict[str, dict[float, dict[str, Any]]]:
    """Per ranking method: fraction -> row, sorted by fraction; the all-layers run is every method's 1.0."""
    full = [r for r in rows if r["rule"] == "all"]
    methods = sorted({r["method"] for r in rows if r["rule"] != "all"}) or ["-"]
    out = {}
    for method in methods:
        points = [(r["fraction"], r) for r in rows if r["method"] == method and r["rule"] != "all"]
        out[method] = dict(sorted(points + [(1.0, r) for r in full], key=lambda item: item[0]))
    return out


def ablation_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: one row per fraction, held-out loss per ranking method (median step time in brackets)."""
    points = _ablation_points(rows)
    fractions = sorted({f for by_fraction in points.values() for f in by_fraction})
    lines = ["| fraction | " + " | ".join(points) + " |", "|---|" + "---|" * len(points)]
    for f in fractions:
        cells = []
        for by_fraction in points.values():
            row = by_fraction.get(f)
            loss, step = (row or {}).get("loss"), (row or {}).get("median_step_s")
            cells.append(f"{loss:.4f} ({step:.2f} s)" if loss is not None and step is not None else "-")
        lines.append(f"| {f:.2f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_ablation(rows: list[dict[str, Any]], path: Path) -> None:
    """Held-out loss and median step time vs selected fraction, one line per ranking method."""
    import matplotlib.pyplot as plt

    from ila.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, points in _ablation_points(rows).items():
        xs = list(points)
        for ax, key in zip(axes, ("loss", "median_step_s"), strict=True):
            ys = [points[f][key] if points[f][key] is not None else float("nan") for f in xs]
            ax.plot(xs, ys, marker="o", label=method)
    axes[0].set_ylabel("held-out loss")
    axes[1].set_ylabel("median step (s)")
    for ax in axes:
        ax.set_xlabel("fraction of layers trained")
        ax.legend(fontsize=8)
    save_figure(fig, path)
