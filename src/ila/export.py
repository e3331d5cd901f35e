"""Export one selection as another trainer's config (`ila export` writes it), checked against the model first.

Reads selection.json and the model's module tree (the real model with --model, else built on the meta device from
the config of the model the selection names); writes one file for PEFT (JSON), TRL, axolotl, LLaMA-Factory,
ms-swift, unsloth or Spectrum-style `unfrozen_parameters` (YAML), or a `requires_grad` recipe (Python) for full
fine-tuning under TRL or plain transformers. Each export is parsed back (the recipe is run) and applied with every
matching rule it claims; unless each selects exactly the selected modules, nothing is written.

Over 500 lines because each trainer's format is written beside the check that applies that trainer's own
matching rule to the model; a format without its check would not be worth exporting.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from torch import nn
from transformers.pytorch_utils import Conv1D

from ila.config import LoraShapeConfig
from ila.errors import IlaError
from ila.lora_adapters import applied_ranks, lora_targets, rank_patterns
from ila.selection import SelectedLayer, Selection

log = logging.getLogger(__name__)

TARGETS = ("peft", "trl", "axolotl", "llama-factory", "ms-swift", "unsloth", "spectrum")
Method = Literal["lora", "full"]
# Which methods each trainer can express; the first is the default.
METHODS: dict[str, tuple[Method, ...]] = {
    "peft": ("lora",),
    "trl": ("lora", "full"),
    "unsloth": ("lora",),
    "axolotl": ("lora", "full"),
    "llama-factory": ("lora", "full"),
    "ms-swift": ("lora", "full"),
    "spectrum": ("full",),
}


@dataclass(frozen=True)
class BlockPath:
    """Which selected modules of one block run in unsloth's fused LoRA kernels and which on PEFT's plain forward."""

    block: int
    fused: list[str]  # module types, e.g. "self_attn.q_proj"
    slow: list[str]


@dataclass
class Export:
    """One trainer config: the file's text and the checks it passed."""

    target: str
    method: Method
    text: str
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unsloth_paths: list[BlockPath] = field(default_factory=list)  # unsloth only: per block with a selected module


def default_dropout(target: str) -> float:
    """LoRA dropout when none is given: 0.05, but 0 for unsloth, whose fused kernels run only without dropout."""
    return 0.0 if target == "unsloth" else 0.05


# ------------------------------------------------------------------------------------------ patterns


def _alternation(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


def module_regex(layers: Sequence[SelectedLayer]) -> str:
    """One regex whose full match is exactly these module names (PEFT's rule for a string `target_modules`).

    Compact: blocks that select the same module types share one alternative, e.g.
    `model\\.layers\\.(?:2|3)\\.(?:mlp\\.up_proj|self_attn\\.v_proj)`.
    """
    grouped: dict[str, dict[int, set[str]]] = {}
    singles: list[str] = []
    for layer in layers:
        suffix = f".{layer.block}.{layer.module_type}"
        if layer.block >= 0 and layer.name.endswith(suffix):
            grouped.setdefault(layer.name[: -len(suffix)], {}).setdefault(layer.block, set()).add(layer.module_type)
        else:
            singles.append(re.escape(layer.name))
    alternatives: list[str] = []
    for prefix, blocks in grouped.items():
        by_types: dict[tuple[str, ...], list[int]] = {}
        for block in sorted(blocks):
            by_types.setdefault(tuple(sorted(blocks[block])), []).append(block)
        for types, block_list in by_types.items():
            alternatives.append(
                f"{re.escape(prefix)}\\.{_alternation([str(b) for b in block_list])}\\."
                f"{_alternation([re.escape(t) for t in types])}"
            )
    return _alternation(alternatives + singles)


def parameter_regex(layers: Sequence[SelectedLayer]) -> str:
    """An anchored regex for the selected weight tensors, for trainers that use `re.search` (ms-swift)."""
    return f"^{module_regex(layers)}\\.weight$"


def axolotl_patterns(layers: Sequence[SelectedLayer]) -> list[str]:
    """axolotl `unfrozen_parameters`: one anchored pattern per weight; axolotl escapes the dots itself."""
    return [f"^{layer.name}.weight$" for layer in layers]


def spectrum_entries(layers: Sequence[SelectedLayer]) -> list[str]:
    """Spectrum-style `unfrozen_parameters`: the exact weight names, so that axolotl's rule (a pattern matches from
    the start) and Spectrum's README recipe (an entry is a substring of the name) read them alike.

    An anchored `^name$` contains characters no parameter name has, so the substring rule would match nothing.
    Each rule selects every name that starts with (or contains) an entry, so no entry can be narrower than the
    full name: if these select too much on a model, no list of entries can select exactly the selection.
    """
    return [f"{layer.name}.weight" for layer in layers]


# -------------------------------------------------- the trainers' matching rules, applied to the model


def axolotl_unfrozen(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Parameters axolotl leaves trainable: each '.' not followed by '+' is escaped, then `re.match`."""
    compiled = [re.compile(re.sub(r"\.(?!\+)", r"\\.", p)) for p in patterns]
    return [name for name, _ in model.named_parameters() if any(c.match(name) for c in compiled)]


def substring_unfrozen(model: nn.Module, entries: Sequence[str]) -> list[str]:
    """Parameters Spectrum's README recipe for other trainers unfreezes: those whose name contains an entry."""
    return [name for name, _ in model.named_parameters() if any(entry in name for entry in entries)]


def regex_match_unfrozen(model: nn.Module, entries: Sequence[str]) -> list[str]:
    """Parameters a plain `re.match(entry, name)` unfreezes ('.' is any character), as some copies of that recipe do."""
    compiled = [re.compile(entry) for entry in entries]
    return [name for name, _ in model.named_parameters() if any(c.match(name) for c in compiled)]


def axolotl_lora_target_modules(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """The `target_modules` axolotl hands PEFT: `lora_target_modules`, plus, when `lora_target_linear` is true, the
    last name part of every `nn.Linear` but lm_head (so every block's projections)."""
    value = config.get("lora_target_modules") or []
    targets = list(value) if isinstance(value, list) else [value]
    if config.get("lora_target_linear"):
        leaves = {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        targets = sorted(set(targets) | (leaves - {"lm_head"}))
    return targets


def ms_swift_trainable(model: nn.Module, regex: str) -> list[str]:
    """Parameters ms-swift re-enables with `trainable_parameters_regex` (`re.search` on parameter names)."""
    pattern = re.compile(regex)
    return [name for name, _ in model.named_parameters() if pattern.search(name)]


def regex_modules(model: nn.Module, regex: str) -> list[str]:
    """Modules a PEFT string `target_modules` reaches: `re.fullmatch` on every module name."""
    return [name for name, _ in model.named_modules() if re.fullmatch(regex, name)]


def llamafactory_freeze_trainable(
    model: nn.Module, n_blocks: int, trainable_layers: int, modules: Sequence[str]
) -> list[str]:
    """Parameters LLaMA-Factory's freeze tuning trains: the last n (n > 0) or first n (n < 0) blocks, restricted
    to `modules` (first-level names inside a block, or "all"), matched as substrings '.{idx}.{module}'."""
    if trainable_layers > 0:
        ids = range(max(0, n_blocks - trainable_layers), n_blocks)
    else:
        ids = range(min(-trainable_layers, n_blocks))
    needles = [f".{idx}.{'' if module == 'all' else module}" for module in modules for idx in ids]
    return [name for name, _ in model.named_parameters() if any(needle in name for needle in needles)]


# -------------------------------------------------------------------------------------------- exporting


def _comments(lines: Sequence[str]) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def _yaml(body: dict[str, Any], head: Sequence[str], *more: str, why: dict[str, str] | None = None) -> str:
    """YAML of `body` under comment lines (what it is, how to use it); `why` puts a comment after top-level keys."""
    lines = yaml.safe_dump(body, sort_keys=False, width=1 << 16).splitlines()
    for key, comment in (why or {}).items():
        lines = [f"{line}  # {comment}" if line.startswith(f"{key}: ") else line for line in lines]
    return _comments([*head, *more]) + "\n".join(lines) + "\n"


def _lora_kwargs(
    names: list[str] | str, lora: LoraShapeConfig, fan_in_fan_out: bool, ranks: dict[str, int] | None = None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": names,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    if fan_in_fan_out:
        kwargs["fan_in_fan_out"] = True
    kwargs.update(rank_patterns(ranks, lora))
    return kwargs


class _Checker:
    """Applies exported values to copies of the model with each trainer's rule and compares with the selection."""

    def __init__(self, model: nn.Module, selection: Selection, model_label: str) -> None:
        self.model = model
        self.label = model_label
        self.names = selection.names()
        self.weights = [f"{name}.weight" for name in self.names]
        modules = dict(model.named_modules())
        missing = [name for name in self.names if name not in modules]
        if missing:
            raise IlaError(
                f"the selection does not match {model_label}: module {missing[0]} (and "
                f"{len(missing) - 1} more) is not in it; export with the model the ranking was made on"
            )
        self.fan_in_fan_out = any(isinstance(modules[name], Conv1D) for name in self.names)
        self.checks: list[str] = []

    def _compare(self, what: str, got: Sequence[str], wanted: Sequence[str], noun: str, hint: str = "") -> None:
        extra, missing = sorted(set(got) - set(wanted)), sorted(set(wanted) - set(got))
        if extra or missing:
            problems = ([f"{len(extra)} extra {noun} (e.g. {extra[0]})"] if extra else []) + (
                [f"{len(missing)} selected {noun} missing (e.g. {missing[0]})"] if missing else []
            )
            raise IlaError(
                f"export check failed: {what} on {self.label} gives {' and '.join(problems)}{hint}; nothing was written"
            )
        self.checks.append(f"{what}: exactly the {len(wanted)} selected {noun} on {self.label}")

    def peft_targets(self, what: str, target_modules: list[str] | str) -> None:
        targeted = lora_targets(copy.deepcopy(self.model), target_modules, self.fan_in_fan_out)
        self._compare(f"{what} (PEFT LoraConfig applied)", targeted, self.names, "modules")

    def ranks(self, what: str, lora_kwargs: dict[str, Any], ranks: dict[str, int], lora: LoraShapeConfig) -> None:
        """Each selected module gets its own rank, and the scale alpha/r of the uniform setting, under PEFT."""
        got = applied_ranks(copy.deepcopy(self.model), lora_kwargs)
        self._compare(f"{what} (PEFT LoraConfig applied)", list(got), self.names, "modules")
        scale = lora.alpha / lora.r
        wrong = [n for n, (r, s) in got.items() if r != ranks[n] or not math.isclose(s, scale, rel_tol=1e-9)]
        if wrong:
            r, s = got[wrong[0]]
            raise IlaError(
                f"export check failed: {what} on {self.label} gives {wrong[0]} rank {r} and scale {s:g} instead of "
                f"{ranks[wrong[0]]} and {scale:g} ({len(wrong)} modules differ); nothing was written"
            )
        self.checks.append(
            f"{what}: each of the {len(ranks)} modules at its own rank ({min(ranks.values())}-{max(ranks.values())}),"
            f" scale alpha/r = {scale:g}, on {self.label}"
        )

    def module_regex(self, what: str, regex: str) -> None:
        self._compare(f"{what} (re.fullmatch on module names)", regex_modules(self.model, regex), self.names, "modules")

    def parameters(self, what: str, got: Sequence[str], hint: str = "") -> None:
        self._compare(what, got, self.weights, "weights", hint)


def export_selection(
    selection: Selection,
    target: str,
    model: nn.Module,
    model_label: str,
    method: Method | None = None,
    lora: LoraShapeConfig | None = None,
) -> Export:
    """Build the `target` trainer's config for `selection` and verify it on `model`; raises IlaError if it fails."""
    if target not in TARGETS:
        raise IlaError(f"unknown export target '{target}'; choose one of {', '.join(TARGETS)}")
    allowed = METHODS[target]
    method = method or allowed[0]
    if method not in allowed:
        hint = ", ".join(t for t, m in METHODS.items() if method in m)
        raise IlaError(f"{target} cannot express {method} fine-tuning of chosen layers; use --to {hint}")
    r = selection.rule.lora_r
    lora = lora or LoraShapeConfig(r=r, alpha=2 * r, dropout=default_dropout(target))
    check = _Checker(model, selection, model_label)
    names = selection.names()
    ranks = selection.lora_ranks()
    if ranks is not None and (method != "lora" or target not in RANK_PATTERN_TARGETS):
        raise IlaError(
            f"this selection gives each layer its own LoRA rank, which {target} --method {method} cannot express "
            f"({RANK_PATTERN_WHY.get(target, 'not a LoRA export')}); export it with --to "
            f"{' or '.join(RANK_PATTERN_TARGETS)}"
        )
    head = [
        f"ila export --to {target}: {selection.description}",
        f"ranking: {selection.ranking_method} ({selection.ranking_path or 'no file'}); model: {selection.model}",
    ]
    notes: list[str] = []
    unsloth_paths: list[BlockPath] = []
    if target == "trl" and method == "full":
        text = _requires_grad_recipe(selection, check, head)
    elif target == "peft":
        kwargs = _lora_kwargs(names, lora, check.fan_in_fan_out, ranks)
        text = json.dumps(kwargs, indent=2) + "\n"
        check.peft_targets("target_modules list", json.loads(text)["target_modules"])
        if ranks is not None:
            check.ranks("rank_pattern and alpha_pattern", json.loads(text), ranks, lora)
        notes.append("use it as LoraConfig(**json.load(open(FILE)))")
    elif target == "trl":
        regex = module_regex(selection.layers)
        body = {
            "use_peft": True,
            "lora_r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "lora_target_modules": [regex],
        }
        python = _lora_kwargs(names, lora, check.fan_in_fan_out)
        text = _yaml(
            body,
            head,
            "CLI: trl sft --config THIS_FILE --model_name_or_path MODEL --dataset_name DATA --output_dir OUT",
            f"  or: trl sft ... --use_peft --lora_r {lora.r} --lora_alpha {lora.alpha} --lora_dropout "
            f"{lora.dropout} --lora_target_modules '{regex}'",
            "TRL turns a single --lora_target_modules value into a string, which PEFT matches with re.fullmatch.",
            "Python: SFTTrainer(model, args=SFTConfig(...), train_dataset=..., peft_config=LoraConfig(**kwargs))",
            f"  kwargs = {json.dumps(python)}",
        )
        parsed = yaml.safe_load(text)
        value = parsed["lora_target_modules"]
        value = value[0] if isinstance(value, list) and len(value) == 1 else value  # TRL's ModelConfig rule
        check.module_regex("--lora_target_modules regex", value)
        check.peft_targets("--lora_target_modules regex", value)
        check.peft_targets("Python LoraConfig kwargs", python["target_modules"])
    elif target == "unsloth":
        head_names = [name for name in names if name.split(".")[-1] == "lm_head"]
        if head_names:
            raise IlaError(
                f"unsloth moves {head_names[0]} from target_modules to modules_to_save and trains the whole matrix, "
                "not a LoRA on it; export this selection with --to peft or trl, or select without the output head"
            )
        body = {
            "r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "bias": "none",
            "target_modules": names,
            **rank_patterns(ranks, lora),  # get_peft_model passes unknown keywords on to PEFT's LoraConfig
        }
        unsloth_paths = unsloth_fast_paths(selection, model, lora.dropout)
        path_lines = _unsloth_path_lines(unsloth_paths, lora.dropout)
        text = _yaml(
            body,
            head,
            "Python: FastLanguageModel.get_peft_model(model, **THIS_MAPPING)",
            "unsloth prints 'You added custom modules' for full module names; which modules run its fused LoRA",
            "kernels depends only on which get LoRA: per block, q/k/v only together, o_proj alone, gate/up/down",
            "only together, each without a bias, and only with lora_dropout 0 and bias none. Here:",
            *(f"  {line}" for line in path_lines),
        )
        parsed = yaml.safe_load(text)
        check.peft_targets("target_modules list", parsed["target_modules"])
        if ranks is not None:
            check.ranks(
                "rank_pattern and alpha_pattern (passed through to LoraConfig)", _unsloth_kwargs(parsed), ranks, lora
            )
        if unsloth_fast_paths(selection, model, parsed["lora_dropout"]) != unsloth_paths or parsed["bias"] != "none":
            raise IlaError("export check failed: the unsloth file's dropout or bias differs from what was reported")
        notes.extend(path_lines)
    elif target == "axolotl":
        if method == "lora":
            body = {
                "adapter": "lora",
                "lora_r": lora.r,
                "lora_alpha": lora.alpha,
                "lora_dropout": lora.dropout,
                "lora_target_modules": names,
                "lora_target_linear": False,
            }
            if ranks is not None:  # axolotl's own keys, handed to LoraConfig as rank_pattern and alpha_pattern
                patterns = rank_patterns(ranks, lora)
                body["lora_rank_pattern"] = patterns["rank_pattern"]
                body["lora_alpha_pattern"] = patterns["alpha_pattern"]
            text = _yaml(
                body,
                head,
                "Merge these keys into your axolotl config (base_model, datasets, ...); they replace yours.",
                why={"lora_target_linear": "true (as in many axolotl examples) adds every linear layer to the targets"},
            )
            # Merged over a config that sets lora_target_linear: true, as many of axolotl's examples do.
            merged = {"lora_target_linear": True, **yaml.safe_load(text)}
            check.peft_targets(
                "lora_target_modules over lora_target_linear: true (axolotl rule)",
                axolotl_lora_target_modules(model, merged),
            )
            if ranks is not None:
                check.ranks(
                    "lora_rank_pattern and lora_alpha_pattern (axolotl rule)",
                    axolotl_lora_kwargs(model, merged),
                    ranks,
                    lora,
                )
        else:
            body = {"unfrozen_parameters": axolotl_patterns(selection.layers)}
            text = _yaml(
                body,
                head,
                "Full fine-tuning of the selected weights only (no adapter); merge into your axolotl config.",
                "axolotl escapes '.' itself and matches from the start.",
                *textwrap.wrap(f"WARNING: {SPECTRUM_PLUGIN_WARNING}", 116),
            )
            check.parameters(
                "unfrozen_parameters (axolotl rule)",
                axolotl_unfrozen(model, yaml.safe_load(text)["unfrozen_parameters"]),
            )
            notes.append(SPECTRUM_PLUGIN_WARNING)
    elif target == "spectrum":
        body = {"unfrozen_parameters": spectrum_entries(selection.layers)}
        text = _yaml(
            body,
            head,
            "Spectrum-style unfrozen_parameters: full fine-tuning of these weights only. The entries are exact",
            "parameter names, so axolotl (re.match, '.' literal) and Spectrum's README recipe for other trainers",
            "(`unfrozen_param in name`) unfreeze the same weights, as does a plain re.match; all three were",
            "checked on the model. Unlike Spectrum's own files, embeddings and lm_head stay frozen unless selected.",
            *textwrap.wrap(f"WARNING: {SPECTRUM_PLUGIN_WARNING}", 116),
        )
        entries = yaml.safe_load(text)["unfrozen_parameters"]
        refusal = (
            ": entries must be literal parts of parameter names for Spectrum's README rule and the exact names are "
            "the narrowest, so no unfrozen_parameters list selects exactly the selection on this model; export with "
            "--to ms-swift or trl --method full"
        )
        for rule, unfrozen in (
            ("axolotl rule", axolotl_unfrozen),
            ("Spectrum README rule, entry in name", substring_unfrozen),
            ("plain re.match", regex_match_unfrozen),
        ):
            check.parameters(f"unfrozen_parameters ({rule})", unfrozen(model, entries), refusal)
        notes.append(SPECTRUM_PLUGIN_WARNING)
    elif target == "ms-swift":
        if method == "lora":
            regex = module_regex(selection.layers)
            body = {
                "tuner_type": "lora",
                "lora_rank": lora.r,
                "lora_alpha": lora.alpha,
                "lora_dropout": lora.dropout,
                "target_regex": regex,
            }
            text = _yaml(
                body,
                head,
                f"CLI: swift sft --tuner_type lora --lora_rank {lora.r} --lora_alpha {lora.alpha} "
                f"--target_regex '{regex}' ...",
                "ms-swift 3.x calls tuner_type train_type. target_regex goes to PEFT (re.fullmatch on module names).",
            )
            value = yaml.safe_load(text)["target_regex"]
            check.module_regex("target_regex", value)
            check.peft_targets("target_regex", value)
        else:
            regex = parameter_regex(selection.layers)
            body = {"tuner_type": "full", "freeze_parameters_ratio": 1.0, "trainable_parameters_regex": regex}
            text = _yaml(
                body,
                head,
                f"CLI: swift sft --tuner_type full --freeze_parameters_ratio 1 "
                f"--trainable_parameters_regex '{regex}' ...",
                "ms-swift 3.x calls tuner_type train_type. freeze_parameters_ratio 1 freezes "
                "everything; the regex (re.search on parameter names) re-enables the selection.",
            )
            check.parameters(
                "trainable_parameters_regex (re.search on parameter names)",
                ms_swift_trainable(model, yaml.safe_load(text)["trainable_parameters_regex"]),
            )
    else:  # llama-factory
        if method == "lora":
            body = {
                "finetuning_type": "lora",
                "lora_rank": lora.r,
                "lora_alpha": lora.alpha,
                "lora_dropout": lora.dropout,
                "lora_target": ",".join(names),
            }
            text = _yaml(body, head, "Merge into your LLaMA-Factory training YAML (llamafactory-cli train FILE).")
            check.peft_targets("lora_target (comma list)", yaml.safe_load(text)["lora_target"].split(","))
        else:
            text, note = _llamafactory_freeze(selection, model, check, head)
            notes.append(note)
    return Export(target, method, text, check.checks, notes, unsloth_paths)


# Checked against each trainer's source (2026-12): PEFT's LoraConfig, axolotl's lora_rank_pattern and
# lora_alpha_pattern (loaders/adapter.py), unsloth's get_peft_model(**kwargs -> LoraConfig).
RANK_PATTERN_TARGETS = ("peft", "axolotl", "unsloth")
RANK_PATTERN_WHY = {
    "trl": "TRL's ModelConfig and get_peft_config build LoraConfig from fixed fields; in Python, pass the peft "
    "export as SFTTrainer(peft_config=LoraConfig(**kwargs))",
    "llama-factory": "its finetuning arguments have no per-module rank",
    "ms-swift": "its tuner arguments have no per-module rank",
}


def axolotl_lora_kwargs(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """The LoraConfig keywords axolotl builds from a config (loaders/adapter.py, _build_lora_config_kwargs), as far
    as targets and ranks go."""
    kwargs: dict[str, Any] = {
        "r": config["lora_r"],
        "lora_alpha": config["lora_alpha"],
        "target_modules": axolotl_lora_target_modules(model, config),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    if config.get("lora_rank_pattern"):
        kwargs["rank_pattern"] = config["lora_rank_pattern"]
    if config.get("lora_alpha_pattern"):
        kwargs["alpha_pattern"] = config["lora_alpha_pattern"]
    return kwargs


def _unsloth_kwargs(mapping: dict[str, Any]) -> dict[str, Any]:
    """What unsloth's get_peft_model hands to LoraConfig from the exported mapping."""
    keys = ("r", "lora_alpha", "lora_dropout", "bias", "target_modules", "rank_pattern", "alpha_pattern")
    return {**{k: mapping[k] for k in keys if k in mapping}, "task_type": "CAUSAL_LM"}


SPECTRUM_PLUGIN_WARNING = (
    "do not enable axolotl's Spectrum plugin (plugins: axolotl.integrations.spectrum.SpectrumPlugin with "
    "spectrum_top_fraction) together with this file: it overwrites unfrozen_parameters with its own SNR choice "
    "plus embeddings and lm_head"
)
# unsloth's fused LoRA groups per block (FastLanguageModel.patch_peft_model): q/k/v together, o alone, the MLP together.
UNSLOTH_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)


def unsloth_fast_paths(selection: Selection, model: nn.Module, dropout: float) -> list[BlockPath]:
    """Per block of `model.layers`, which selected modules unsloth runs fused: a group is fused only if every module
    in it gets LoRA and has no bias, and only when dropout is 0 (bias "none" is always exported); the rest of the
    selection (partial groups, other names, other layouts) runs PEFT's plain LoRA forward."""
    modules = dict(model.named_modules())
    selected = set(selection.names())
    by_block: dict[int, list[str]] = {}
    for layer in selection.layers:
        by_block.setdefault(layer.block, []).append(layer.module_type)
    paths = []
    for block, types in by_block.items():
        fused: list[str] = []
        for group in UNSLOTH_GROUPS:
            group_names = [f"model.layers.{block}.{t}" for t in group]
            if dropout == 0 and all(n in selected and getattr(modules[n], "bias", None) is None for n in group_names):
                fused += group
        paths.append(BlockPath(block, [t for t in types if t in fused], [t for t in types if t not in fused]))
    return paths


def _unsloth_path_lines(paths: Sequence[BlockPath], dropout: float) -> list[str]:
    n_fused, n_all = sum(len(p.fused) for p in paths), sum(len(p.fused) + len(p.slow) for p in paths)
    summary = f"unsloth fast path: {n_fused} of {n_all} selected modules run fused"
    if dropout != 0:
        summary += f" (lora_dropout {dropout:g}: unsloth fuses nothing unless it is 0)"
    lines = [summary]
    for path in paths:
        parts = ([f"fused {', '.join(path.fused)}"] if path.fused else []) + (
            [f"slow {', '.join(path.slow)}"] if path.slow else []
        )
        lines.append(f"block {path.block}: {'; '.join(parts)}")
    return lines


def _requires_grad_recipe(selection: Selection, check: _Checker, head: list[str]) -> str:
    """A self-contained Python file that freezes all but the selected weights by exact name and checks the count;
    it is run on the model here, and nothing is written unless exactly the selected weights then train."""
    n_params = selection.trainable_params["full"]
    if n_params is None:  # older selection files: count on the model instead
        weights = set(check.weights)
        n_params = sum(p.numel() for name, p in check.model.named_parameters() if name in weights)
    comments = [
        *head,
        "",
        "Full fine-tuning of the selected weights only, for TRL's SFTTrainer or a plain transformers Trainer or",
        "loop. TRL has no unfrozen_parameters option (huggingface/trl#2504), so freeze by exact parameter name:",
        "",
        "    from THIS_FILE import freeze_all_but_selection",
        "    model = AutoModelForCausalLM.from_pretrained(MODEL)",
        "    freeze_all_but_selection(model)  # before SFTTrainer(...) / Trainer(...) builds the optimizer",
        "    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=...)  # no peft_config",
        "",
        "DeepSpeed ZeRO-3:",
        "- freeze before the Trainer (or deepspeed.initialize) is created: ZeRO builds its optimizer and gradient",
        "  partitions from what requires grad at that moment, and freezing later does not take tensors out of it.",
        "- ZeRO-3 partitions parameters (inside from_pretrained already when the Trainer's DeepSpeed config is",
        "  active), so p.numel() is 0 there: count with p.ds_numel, as the check below does.",
        "- a module with some tensors trainable and some frozen (here the weight trains, a bias stays frozen) is fine.",
        "Gradient checkpointing: with reentrant checkpoints (use_reentrant=True, older transformers' default) and",
        "frozen embeddings the selected weights inside checkpointed blocks get no gradient; use",
        'gradient_checkpointing_kwargs={"use_reentrant": False} or call model.enable_input_require_grads().',
    ]
    selected = "".join(f"    {json.dumps(name)},\n" for name in check.weights)
    text = f"""{_comments(comments)}
SELECTED = (
{selected})
EXPECTED_TENSORS = {len(check.weights)}
EXPECTED_PARAMETERS = {n_params}


def freeze_all_but_selection(model):
    \"\"\"Freeze every parameter but SELECTED (exact names); raise unless ila's tensor and parameter counts train.\"\"\"
    wanted = set(SELECTED)
    named = dict(model.named_parameters())
    missing = sorted(wanted - set(named))
    if missing:
        raise ValueError(
            f"{{len(missing)}} selected parameters are not in this model (e.g. {{missing[0]}}): call this on the "
            "model the selection was made for, before PEFT, DDP or torch.compile wrap it"
        )
    for name, param in named.items():
        param.requires_grad_(name in wanted)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)  # ZeRO-3: numel() is 0
    if (len(trainable), n_parameters) != (EXPECTED_TENSORS, EXPECTED_PARAMETERS):
        raise RuntimeError(
            f"{{len(trainable)}} tensors with {{n_parameters}} parameters would train; ila selected "
            f"{{EXPECTED_TENSORS}} tensors with {{EXPECTED_PARAMETERS}}"
        )
    return model
"""
    what = "freeze_all_but_selection (run on the model)"
    check.parameters(what, run_requires_grad_recipe(text, check.model, f"{what} on {check.label}"))
    return text


def run_requires_grad_recipe(text: str, model: nn.Module, label: str = "the recipe") -> list[str]:
    """Run the recipe's freezing function on `model` and return what it leaves trainable; `model`'s own
    requires_grad flags are restored afterwards. A failing check inside the recipe becomes an IlaError."""
    namespace: dict[str, Any] = {}
    exec(compile(text, "<ila export --to trl --method full>", "exec"), namespace)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        namespace["freeze_all_but_selection"](model)
        return [name for name, p in model.named_parameters() if p.requires_grad]
    except (ValueError, RuntimeError) as err:
        raise IlaError(f"export check failed: {label}: {err}; nothing was written") from None
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def _llamafactory_freeze(selection: Selection, model: nn.Module, check: _Checker, head: list[str]) -> tuple[str, str]:
    """Freeze tuning can express only 'the last n blocks' or 'the first n blocks' (optionally some modules of
    them); any other selection is refused rather than exported as something different."""
    blocks = sorted({layer.block for layer in selection.layers})
    n, n_blocks = len(blocks), selection.n_blocks
    refuse = (
        f"LLaMA-Factory freeze tuning can only train the first or last n blocks (freeze_trainable_layers); "
        f"this selection ({selection.description}, blocks {blocks[:8]}{'...' if n > 8 else ''}) cannot be "
        "expressed; export it with --method lora, or for full fine-tuning --to axolotl, ms-swift or spectrum"
    )
    if -1 in blocks:
        raise IlaError(refuse)
    signed = [s for s, ids in ((n, list(range(n_blocks - n, n_blocks))), (-n, list(range(n)))) if ids == blocks]
    if not signed:
        raise IlaError(refuse)
    linear_weights = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name != "lm_head"
    }
    top_level = sorted({layer.module_type.split(".")[0] for layer in selection.layers})
    for trainable_layers in signed:
        for modules in (["all"], top_level):
            trained = llamafactory_freeze_trainable(model, n_blocks, trainable_layers, modules)
            if set(trained) & linear_weights != set(check.weights):
                continue
            check.parameters(
                f"freeze_trainable_layers={trainable_layers}, freeze_trainable_modules="
                f"{','.join(modules)} (LLaMA-Factory rule, linear weights)",
                sorted(set(trained) & linear_weights),
            )
            others = sorted(set(trained) - linear_weights)
            note = (
                f"LLaMA-Factory also trains {len(others)} non-linear tensors of those blocks (norms, biases), "
                f"e.g. {others[0]}"
                if others
                else "no other tensors train"
            )
            body = {
                "finetuning_type": "freeze",
                "freeze_trainable_layers": trainable_layers,
                "freeze_trainable_modules": ",".join(modules),
            }
            text = _yaml(
                body,
                head,
                "Merge into your LLaMA-Factory training YAML (llamafactory-cli train FILE).",
                f"Note: {note}.",
            )
            return text, note
    raise IlaError(refuse)
