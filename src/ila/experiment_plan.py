"""An experiment's plan: the YAML (data sets x seeds x milestones x rankings, optional fine-tuning) read into a
typed config, and the units it declares with their folders, seeds and selection rules, in the order
`ila experiment` (ila.commands.experiment) computes them. Pure planning: nothing here trains.

Over 500 lines because the YAML's fields, the units they declare and the folder each unit writes must agree;
they change together.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

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
from ila.ranking_methods import DATA_FREE, METHODS

log = logging.getLogger(__name__)

ILA = "ila"
# the rules by `ila select`'s flag names (--top, --freeze-bottom, --param-budget, --lora-ranks); "all": no selection
FINETUNE_RULES = ("freeze-bottom", "top", "param-budget", "lora-ranks", "all")
RENAMED_RULES = {"params": "param-budget", "ranks": "lora-ranks"}  # the old names, still read
# "method" in an experiment means the training method (finetune.method, as `ila finetune --method`); the lists of
# ranking methods are "rankings". The old keys are still read, with a warning.
RENAMED_KEYS = {"methods": "rankings"}
RENAMED_FINETUNE_KEYS = {"methods": "rankings", "rank_methods": "ranks_from", "transfer_methods": "transfer_rankings"}
SEED_FREE = ("first", "last", "snr", "spectrum")  # baselines that read neither the seed nor the data
MILESTONE_METHODS = (ILA, "delta-norm")  # the only methods that read the Stage-1 update


TrainingMethod = Literal["lora", "adalora", "qlora", "full"]


@dataclass(frozen=True)
class ExperimentFinetuneConfig:
    """`finetune:` train the layers each rule selects, from the base model, with the same steps for all."""

    steps: int = 100
    # Training methods: every unit runs under each; folder names start with the method unless it is lora.
    method: tuple[TrainingMethod, ...] = ("lora",)
    fractions: tuple[float, ...] = (0.1, 0.3, 1.0)  # rule top: the top fraction of each ranking (the ablation)
    freeze_bottom: float = 0.25  # rule freeze-bottom: the least important fraction left frozen
    # rule param-budget: the best layers of each ranking up to this share of the all-layers trainable parameters
    # (counted for the training method), so rankings are compared at equal parameters as well as equal layers
    param_fractions: tuple[float, ...] = (0.3,)
    # rule param-budget applies to these rankings; default: every fine-tuned ranking. A ranking whose top layers
    # already hold their share of the parameters (random, last blocks, per-type selections) would repeat its
    # rule-top unit under a budget.
    param_rankings: tuple[str, ...] = ()
    # rule lora-ranks (LoRA only): every layer, each with a LoRA rank from these rankings' scores, within the same
    # parameter shares
    ranks_from: tuple[str, ...] = (ILA,)
    rules: tuple[str, ...] = ("freeze-bottom", "top", "all")
    # The rankings whose layers are fine-tuned; default: every ranking. `ila@25` (or `delta-norm@25`) is that
    # method's ranking from the 25% Stage-1 milestone, which must be one of the experiment's milestones.
    rankings: tuple[str, ...] = ()
    per_type: tuple[str, ...] = ("spectrum",)  # methods selected within each module type (Spectrum's own rule)
    # random: a new permutation for every train seed (seeded by it), so the random baseline's spread includes
    # the draw; false: the ranking seed's one permutation for all train seeds
    random_per_seed: bool = True
    data: str | None = None  # the data set (name) trained on and ranked on; default: the first
    seed: int | None = None  # the seed whose rankings select; default: the first
    # Data sets whose rankings select (the transfer test: a ranking from one data set, fine-tuned on another).
    # Default: the fine-tuning data set alone. Data-free methods rank alike everywhere and run once.
    ranked_on: tuple[str, ...] = ()
    transfer_rankings: tuple[str, ...] = ()  # rankings fine-tuned from the other ranked_on data sets; default: all
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
        if any(rule in RENAMED_RULES for rule in self.rules):
            renamed = [RENAMED_RULES.get(rule, rule) for rule in self.rules]
            log.warning("finetune.rules: %s are now spelled %s (as ila select's flags)", list(self.rules), renamed)
            object.__setattr__(self, "rules", tuple(renamed))
        for rule in self.rules:
            if rule not in FINETUNE_RULES:
                raise IlaError(f"finetune.rules: unknown rule '{rule}'; allowed: {', '.join(FINETUNE_RULES)}")


def split_milestone(method: str) -> tuple[str, int]:
    """`ila@25` -> ("ila", 25); `ila` -> ("ila", 100)."""
    name, _, at = method.partition("@")
    if not at:
        return name, 100
    if not at.isdigit() or not 0 < int(at) < 100:
        raise IlaError(f"finetune.rankings: '{method}': the milestone after '@' must be a percentage in (0, 100)")
    return name, int(at)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything `ila experiment` needs; paths are resolved against the YAML file's folder."""

    model: str = DEFAULT_MODEL
    datasets: tuple[tuple[str, str], ...] = ()  # (name, path) in the order given
    seeds: tuple[int, ...] = (0,)
    milestones: tuple[int, ...] = (25, 50, 100)  # percent of the Stage-1 steps; 100 is the final ranking
    rankings: tuple[str, ...] = (ILA, "random", "last", "first")  # the ranking methods run on every data set
    identify: tuple[str, ...] = ()  # IdentifyConfig `section.key=value` overrides, shared by every unit
    k_percents: tuple[float, ...] = (10.0, 30.0, 50.0)
    threads: int | None = None
    output: str | None = None  # default: runs/experiment-<config file stem>
    finetune: ExperimentFinetuneConfig | None = None
    trust_remote_code: bool = False  # from the command line only, never from the YAML

    def __post_init__(self) -> None:
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
        for method in self.rankings:
            if method != ILA and method not in METHODS:
                raise IlaError(f"rankings: unknown method '{method}'; allowed: {ILA}, {', '.join(METHODS)}")
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
            for method in self.finetune.rankings:
                name, milestone = split_milestone(method)
                if name not in self.rankings:
                    raise IlaError(f"finetune.rankings: '{name}' is not one of rankings {list(self.rankings)}")
                if milestone != 100 and (name not in MILESTONE_METHODS or milestone not in self.milestones):
                    raise IlaError(
                        f"finetune.rankings: '{method}' needs a method that reads the Stage-1 update "
                        f"({', '.join(MILESTONE_METHODS)}) and a milestone among {list(self.milestones)}"
                    )
            fine_tuned = self.finetune.rankings or self.rankings
            for method in self.finetune.ranks_from if "lora-ranks" in self.finetune.rules else ():
                if method not in fine_tuned:
                    raise IlaError(f"finetune.ranks_from: '{method}' is not one of the fine-tuned rankings")
            for key in ("transfer_rankings", "param_rankings"):
                for method in getattr(self.finetune, key):
                    if method not in fine_tuned:
                        raise IlaError(f"finetune.{key}: '{method}' is not one of the fine-tuned rankings")
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


def _rename_keys(values: dict[str, Any], renamed: dict[str, str], prefix: str, path: Path) -> None:
    for old, new in renamed.items():
        if old not in values:
            continue
        if new in values:
            raise IlaError(f"{path}: give {prefix}{new} only ({prefix}{old} is its old name)")
        log.warning("%s: %s%s is now spelled %s%s", path, prefix, old, prefix, new)
        values[new] = values.pop(old)


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
    _rename_keys(values, RENAMED_KEYS, "", path)
    finetune = values.get("finetune")
    ft_overrides: list[str] = []
    method_overrides: list[tuple[str, str]] = []
    if isinstance(finetune, dict):
        finetune = dict(finetune)
        _rename_keys(finetune, RENAMED_FINETUNE_KEYS, "finetune.", path)
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
    ft = (
        build_config(ExperimentFinetuneConfig, values["finetune"], prefix="finetune.") if "finetune" in values else None
    )
    if ft is not None:
        ft = replace(ft, overrides=tuple(ft_overrides), method_overrides=tuple(method_overrides))
    config = ExperimentConfig(
        model=cfg.model,
        datasets=pairs,
        seeds=cfg.seeds,
        milestones=cfg.milestones,
        rankings=cfg.rankings,
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
    rankings: tuple[str, ...] = (ILA, "random", "last", "first")
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
    seed = finetune_seed(cfg) if train_seed is None else train_seed
    run: dict[str, Any] = {"seed": seed, "output": output}
    if cfg.threads:
        run["threads"] = cfg.threads
    values = merge(
        values,
        {
            "model": {"name": cfg.model},
            "data": {"path": cfg.data_paths[finetune_data(cfg)]},
            "finetune": {"method": training, "max_steps": ft.steps, "selection": selection},
            "run": run,
        },
    )
    try:
        return build_config(FinetuneConfig, values)
    except IlaError as err:
        raise IlaError(f"finetune.overrides: {err}") from None


def finetune_data(cfg: ExperimentConfig) -> str:
    assert cfg.finetune is not None
    return cfg.finetune.data or cfg.datasets[0][0]


def finetune_seed(cfg: ExperimentConfig) -> int:
    assert cfg.finetune is not None
    return cfg.finetune.seed if cfg.finetune.seed is not None else cfg.seeds[0]


def train_seeds(cfg: ExperimentConfig) -> tuple[int, ...]:
    assert cfg.finetune is not None
    return cfg.finetune.train_seeds or (finetune_seed(cfg),)


def finetune_folder(cfg: ExperimentConfig, root: Path, name: str, train_seed: int) -> Path:
    """The run at the ranking seed keeps the plain unit name, so adding train seeds later reuses it."""
    suffix = "" if train_seed == finetune_seed(cfg) else f"-train-seed{train_seed}"
    return root / "finetune" / f"{name}{suffix}"


# ------------------------------------------------------------------------------------------- units and folders


def is_complete(folder: Path) -> bool:
    """Whether a unit's folder holds a finished run; an unreadable manifest means the unit is computed again."""
    from ila.manifest import Manifest

    try:
        manifest = Manifest.read(folder)
    except IlaError:
        return False
    return manifest is not None and manifest.complete


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


def planned_units(cfg: ExperimentConfig) -> int:
    """How many units the grid has (computed, skipped or missing), counted as run_experiment walks them."""
    per_run = 0  # per (data set, seed)
    if ILA in cfg.rankings or "delta-norm" in cfg.rankings:
        per_run += 1  # the identify run
        if ILA in cfg.rankings:
            per_run += len(set(cfg.milestones) - {100})
    for method in cfg.rankings:
        if method != ILA:
            per_run += len(set(cfg.milestones) | {100}) if method == "delta-norm" else 1
    finetune = 0
    if cfg.finetune is not None:
        finetune = len(finetune_units(cfg)) * len(train_seeds(cfg)) + len(random_seeds(cfg)) - len(cfg.seeds)
    return per_run * len(cfg.datasets) * len(cfg.seeds) + finetune


@dataclass(frozen=True)
class FinetuneUnit:
    name: str  # folder name under finetune/
    method: str | None  # the ranking method that selects; None: every layer
    rule: str
    fraction: float  # of the layers trained (rule param-budget: of the all-layers trainable parameters)
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
    data = finetune_data(cfg)
    methods = ft.rankings or cfg.rankings
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
                if ranked_on != data and ft.transfer_rankings and spelled not in ft.transfer_rankings:
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
                if "param-budget" in ft.rules and (not ft.param_rankings or spelled in ft.param_rankings):
                    # folder names keep their first spelling: kept results still match
                    wanted += [("param-budget", f"params{round(f * 100)}", f) for f in ft.param_fractions if f < 1.0]
                if "lora-ranks" in ft.rules and spelled in ft.ranks_from and training in ("lora", "qlora") and own:
                    wanted += [("lora-ranks", f"ranks{round(f * 100)}", f) for f in ft.param_fractions if f < 1.0]
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
        return group, int(each.rule == "param-budget"), ft.method.index(each.training)

    return sorted(units, key=priority)


def random_seeds(cfg: ExperimentConfig) -> list[int]:
    """The seeds random rankings are drawn with: the ranking seeds, and every train seed when each train seed
    draws its own permutation."""
    seeds = list(cfg.seeds)
    if cfg.finetune is not None and cfg.finetune.random_per_seed and "random" in finetune_methods(cfg):
        seeds += [s for s in train_seeds(cfg) if s not in seeds]
    return seeds


def finetune_methods(cfg: ExperimentConfig) -> list[str]:
    assert cfg.finetune is not None
    return [split_milestone(m)[0] for m in cfg.finetune.rankings or cfg.rankings]


def unit_ranking(cfg: ExperimentConfig, root: Path, each: FinetuneUnit, train_seed: int) -> Path:
    """The ranking.json that selects a unit's layers under `train_seed`."""
    assert cfg.finetune is not None and each.method is not None
    seed = finetune_seed(cfg)
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
    if each.rule == "lora-ranks":
        return SelectionRule("lora_ranks", each.fraction * total, lora_r=r)
    return SelectionRule("param_budget", each.fraction * total, method=counted, lora_r=r, per_type=each.per_type)


def plain_config(cfg: ExperimentConfig) -> dict[str, Any]:
    out = config_to_dict(cfg)
    out["datasets"] = dict(cfg.datasets)
    return out
