"""`ila export`: write a selection as another trainer's config, verified against the model."""

from __future__ import annotations

import argparse

from ila.commands._shared import Subparsers

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
        help="write a selection as a PEFT/TRL/axolotl/LLaMA-Factory/... config",
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
    from ila.export import run_export

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
