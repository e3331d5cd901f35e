"""`ila export`: write one selection as another trainer's config, checked against the model before it is written.

Reads selection.json and the model's module tree (the real model with --model, else built on the meta device from
the config of the model the selection names); writes one file for PEFT (JSON), TRL, axolotl, LLaMA-Factory,
ms-swift, unsloth or Spectrum-style `unfrozen_parameters` (YAML). Each export is parsed back and applied with the
trainer's own matching rule; unless that selects exactly the selected modules, nothing is written.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn
from transformers.pytorch_utils import Conv1D

from ila.config import LoraSettings, ModelConfig
from ila.errors import IlaError
from ila.lora_adapters import lora_targets
from ila.run_folder import atomic_write_text
from ila.selection import SelectedLayer, Selection, load_selection

log = logging.getLogger(__name__)

TARGETS = ("peft", "trl", "axolotl", "llama-factory", "ms-swift", "unsloth", "spectrum")
Method = Literal["lora", "full"]
# Which methods each trainer can express; the first is the default.
METHODS: dict[str, tuple[Method, ...]] = {
    "peft": ("lora",),
    "trl": ("lora",),
    "unsloth": ("lora",),
    "axolotl": ("lora", "full"),
    "llama-factory": ("lora", "full"),
    "ms-swift": ("lora", "full"),
    "spectrum": ("full",),
}


@dataclass
class Export:
    """One trainer config: the file's text and the checks it passed."""

    target: str
    method: Method
    text: str
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
    """axolotl/Spectrum `unfrozen_parameters`: one anchored pattern per weight; axolotl escapes the dots itself."""
    return [f"^{layer.name}.weight$" for layer in layers]


# -------------------------------------------------- the trainers' matching rules, applied to the model


def axolotl_unfrozen(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Parameters axolotl leaves trainable: each '.' not followed by '+' is escaped, then `re.match`."""
    compiled = [re.compile(re.sub(r"\.(?!\+)", r"\\.", p)) for p in patterns]
    return [name for name, _ in model.named_parameters() if any(c.match(name) for c in compiled)]


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


def _yaml(body: dict[str, Any], head: Sequence[str], *more: str) -> str:
    """YAML of `body` under comment lines (what it is, how to use it)."""
    comments = "".join(f"# {line}\n" if line else "#\n" for line in [*head, *more])
    return comments + yaml.safe_dump(body, sort_keys=False, width=1 << 16)


def _lora_kwargs(names: list[str] | str, lora: LoraSettings, fan_in_fan_out: bool) -> dict[str, Any]:
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

    def _compare(self, what: str, got: Sequence[str], wanted: Sequence[str], noun: str) -> None:
        extra, missing = sorted(set(got) - set(wanted)), sorted(set(wanted) - set(got))
        if extra or missing:
            problems = ([f"{len(extra)} extra {noun} (e.g. {extra[0]})"] if extra else []) + (
                [f"{len(missing)} selected {noun} missing (e.g. {missing[0]})"] if missing else []
            )
            raise IlaError(
                f"export check failed: {what} on {self.label} gives {' and '.join(problems)}; nothing was written"
            )
        self.checks.append(f"{what}: exactly the {len(wanted)} selected {noun} on {self.label}")

    def peft_targets(self, what: str, target_modules: list[str] | str) -> None:
        targeted = lora_targets(copy.deepcopy(self.model), target_modules, self.fan_in_fan_out)
        self._compare(f"{what} (PEFT LoraConfig applied)", targeted, self.names, "modules")

    def module_regex(self, what: str, regex: str) -> None:
        self._compare(f"{what} (re.fullmatch on module names)", regex_modules(self.model, regex), self.names, "modules")

    def parameters(self, what: str, got: Sequence[str]) -> None:
        self._compare(what, got, self.weights, "weights")


def export_selection(
    selection: Selection,
    target: str,
    model: nn.Module,
    model_label: str,
    method: Method | None = None,
    lora: LoraSettings | None = None,
) -> Export:
    """Build the `target` trainer's config for `selection` and verify it on `model`; raises IlaError if it fails."""
    if target not in TARGETS:
        raise IlaError(f"unknown export target '{target}'; choose one of {', '.join(TARGETS)}")
    allowed = METHODS[target]
    method = method or allowed[0]
    if method not in allowed:
        hint = (
            "axolotl, llama-factory, ms-swift or spectrum"
            if method == "full"
            else ", ".join(t for t, m in METHODS.items() if "lora" in m)
        )
        raise IlaError(f"{target} cannot express {method} fine-tuning of chosen layers; use --to {hint}")
    lora = lora or LoraSettings(r=selection.rule.lora_r, alpha=2 * selection.rule.lora_r)
    check = _Checker(model, selection, model_label)
    names = selection.names()
    head = [
        f"ila export --to {target}: {selection.description}",
        f"ranking: {selection.ranking_method} ({selection.ranking_path or 'no file'}); model: {selection.model}",
    ]
    notes: list[str] = []
    if target == "peft":
        kwargs = _lora_kwargs(names, lora, check.fan_in_fan_out)
        text = json.dumps(kwargs, indent=2) + "\n"
        check.peft_targets("target_modules list", json.loads(text)["target_modules"])
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
        body = {
            "r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "bias": "none",
            "target_modules": names,
        }
        warning = (
            "unsloth accepts custom target_modules, but modules outside its standard projection names "
            "(full module names included) lose its fused LoRA kernels: expect slower steps"
        )
        text = _yaml(
            body, head, "Python: FastLanguageModel.get_peft_model(model, **THIS_MAPPING)", f"WARNING: {warning}"
        )
        check.peft_targets("target_modules list", yaml.safe_load(text)["target_modules"])
        notes.append(warning)
    elif target == "axolotl":
        if method == "lora":
            body = {
                "adapter": "lora",
                "lora_r": lora.r,
                "lora_alpha": lora.alpha,
                "lora_dropout": lora.dropout,
                "lora_target_modules": names,
            }
            text = _yaml(body, head, "Merge these keys into your axolotl config (base_model, datasets, ...).")
            check.peft_targets("lora_target_modules list", yaml.safe_load(text)["lora_target_modules"])
        else:
            body = {"unfrozen_parameters": axolotl_patterns(selection.layers)}
            text = _yaml(
                body,
                head,
                "Full fine-tuning of the selected weights only (no adapter); merge into your axolotl config.",
                "axolotl escapes '.' itself and matches from the start.",
            )
            check.parameters(
                "unfrozen_parameters (axolotl rule)",
                axolotl_unfrozen(model, yaml.safe_load(text)["unfrozen_parameters"]),
            )
    elif target == "spectrum":
        body = {"unfrozen_parameters": axolotl_patterns(selection.layers)}
        text = _yaml(
            body,
            head,
            "Spectrum-style unfrozen_parameters (axolotl format): full fine-tuning of these weights only.",
            "Unlike Spectrum's own files, embeddings and lm_head stay frozen unless selected.",
        )
        check.parameters(
            "unfrozen_parameters (axolotl rule)", axolotl_unfrozen(model, yaml.safe_load(text)["unfrozen_parameters"])
        )
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
    return Export(target, method, text, check.checks, notes)


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


# ---------------------------------------------------------------------------------------- entry point


def verification_model(
    selection: Selection, model: str | None, meta: bool = False, trust_remote_code: bool = False
) -> tuple[nn.Module, str]:
    """The model to check an export against: the real `model`, or a weightless skeleton on the meta device."""
    from ila.model_loading import load_model, load_model_skeleton

    if model and not meta:
        loaded = load_model(ModelConfig(name=model, trust_remote_code=trust_remote_code), torch.device("cpu"))
        return loaded.model, f"{model} (loaded)"
    name = model or selection.model
    if not name:
        raise IlaError("the selection names no model: pass --model so the export can be verified")
    try:
        skeleton = load_model_skeleton(ModelConfig(name=name, trust_remote_code=trust_remote_code))
    except IlaError as err:
        if model:
            raise
        raise IlaError(f"{err}; pass --model to verify the export against a model you have") from None
    return skeleton, f"{name} (module tree on the meta device)"


def run_export(
    selection_path: str | Path,
    target: str,
    output: str | Path,
    model: str | None = None,
    meta: bool = False,
    method: Method | None = None,
    lora_r: int | None = None,
    lora_alpha: int | None = None,
    lora_dropout: float | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Export:
    """Load, build, verify, then write atomically; a failed check writes nothing.

    LoRA settings default to the rank the selection was counted with, alpha = 2·r and dropout 0.05.
    """
    out = Path(output)
    if out.is_dir():
        raise IlaError(f"--output {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise IlaError(f"{out} already exists; choose another --output or pass --overwrite")
    if target not in TARGETS:
        raise IlaError(f"unknown export target '{target}'; choose one of {', '.join(TARGETS)}")
    selection = load_selection(selection_path)
    r = lora_r or selection.rule.lora_r
    lora = LoraSettings(r=r, alpha=lora_alpha or 2 * r, dropout=0.05 if lora_dropout is None else lora_dropout)
    verify_on, label = verification_model(selection, model, meta, trust_remote_code)
    result = export_selection(selection, target, verify_on, label, method, lora)
    atomic_write_text(out, result.text)
    return result
