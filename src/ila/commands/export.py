"""`ila export`: write a selection as another trainer's config, verified against the model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ila.commands import COMMANDS
from ila.commands._shared import Subparsers
from ila.config import LoraShapeConfig, ModelConfig
from ila.errors import IlaError
from ila.export import TARGETS, Export, Method, default_dropout, export_selection
from ila.run_folder import atomic_write_text
from ila.selection import Selection, load_selection

EXPORT_EXAMPLES = """examples:
  ila export --selection selection.json --to peft --output lora_config.json
  ila export --selection selection.json --to trl --output trl.yaml
  ila export --selection selection.json --to axolotl --method full --output axolotl.yaml
  ila export --selection selection.json --to llama-factory --output lf.yaml --model ./my-llama
  ila export --selection selection.json --to ms-swift --method full --output swift.yaml
  ila export --selection selection.json --to spectrum --output unfrozen.yaml

Every export is parsed back and applied to the model with the trainer's own matching rule (PEFT target_modules,
re.fullmatch, re.search, axolotl's pattern rule, LLaMA-Factory's freeze rule); unless it selects exactly the
selected modules, nothing is written. Without --model the module tree of the model the selection names is built
on the meta device (no weights).
"""


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "export",
        help=COMMANDS["export"],
        description="Write a selection as another trainer's config, verified against the "
        "model before anything is written.",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--selection", required=True, help="selection.json from `ila select`")
    parser.add_argument(
        "--to",
        required=True,
        choices=["peft", "trl", "axolotl", "llama-factory", "ms-swift", "unsloth", "spectrum"],
        help="the trainer",
    )
    parser.add_argument(
        "--method",
        choices=["lora", "full"],
        help="LoRA on the selection or full fine-tuning of its weights (default: lora; spectrum: full)",
    )
    parser.add_argument("--model", help="verify on this model (default: the model the selection names, meta device)")
    parser.add_argument("--meta", action="store_true", help="build --model on the meta device instead of loading it")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default: the selection's)")
    parser.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2*r)")
    parser.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    parser.add_argument("--output", required=True, help="the file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    result = run_export(
        args.selection,
        args.to,
        args.output,
        model=args.model,
        meta=args.meta,
        method=args.method,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"{args.output}: {args.to} ({result.method})")
    for check in result.checks:
        print(f"  verified: {check}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


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

    LoRA settings default to the rank the selection was counted with, alpha = 2·r and dropout 0.05 (unsloth: 0).
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
    dropout = default_dropout(target) if lora_dropout is None else lora_dropout
    lora = LoraShapeConfig(r=r, alpha=lora_alpha or 2 * r, dropout=dropout)
    verify_on, label = verification_model(selection, model, meta, trust_remote_code)
    result = export_selection(selection, target, verify_on, label, method, lora)
    atomic_write_text(out, result.text)
    return result
