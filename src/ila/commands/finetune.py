"""`ila finetune`: train only the selected layers (LoRA, AdaLoRA, QLoRA or full)."""

from __future__ import annotations

import argparse
import statistics

from ila.commands._shared import COMMON_FLAGS, Subparsers, add_config_flags, add_run_flags, config_values, print_config
from ila.config import BUNDLED_DATA, DEFAULT_MODEL, FinetuneConfig, load_config

FINETUNE_EXAMPLES = """examples:
  ila finetune --model ./my-llama --data train.jsonl --selection selection.json --method lora --output runs/ft
  ila finetune --model ./my-llama --data train.jsonl --method lora --output runs/ft-all   # baseline: all layers
  ila finetune --model M --data D --selection S --method full finetune.lr=2e-5 finetune.max_steps=300
  ila finetune --model M --data D --selection S --method adalora adalora.init_r=12 adalora.target_r=4
  ila finetune --model M --data D --selection S --method qlora                  # needs a CUDA GPU

config sections: model, data, lora, finetune, adalora, qlora, run (see `ila finetune --print-config`)
"""


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "finetune",
        help="train only the selected layers (LoRA, AdaLoRA, QLoRA or full)",
        description="Restart from the base model and train only the layers of a selection "
        "(none: every linear layer, the baseline) with the shared training loop; writes the "
        "adapter or the changed weights, loss curves, a manifest and a report to a run folder.",
        epilog=FINETUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL})")
    parser.add_argument("--data", help=f"JSON/JSONL file or hub data set id (default: {BUNDLED_DATA})")
    parser.add_argument("--selection", help="selection.json from `ila select` (default: all layers)")
    parser.add_argument("--method", choices=["lora", "adalora", "qlora", "full"], help="default lora")
    add_run_flags(parser, report_to=True)
    parser.add_argument("--output", help="run folder (default runs/finetune-<timestamp>)")
    parser.add_argument("--seed", type=int, help="random seed (run.seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run folder")
    add_config_flags(parser, "model, data, lora, finetune, adalora, qlora, run")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    flags = (*COMMON_FLAGS, ("selection", "finetune", "selection"), ("method", "finetune", "method"))
    cfg = load_config(FinetuneConfig, args.config, args.overrides, config_values(args, flags))
    if args.print_config:
        return print_config(cfg)
    from ila.finetune import run_finetune

    result = run_finetune(cfg, overwrite=args.overwrite)
    times = result.loop.step_seconds
    print(f"run folder: {result.run_dir}")
    print(
        f"{cfg.finetune.method} on {result.selection.description}: {result.trainable_params:,} trainable "
        f"parameters; lowest selected block {result.selection.lowest_block}"
    )
    print(
        f"held-out loss: base {result.heldout[0]['loss']:.4f} -> {result.heldout[-1]['loss']:.4f} after "
        f"{result.loop.steps_run} steps"
    )
    if times:
        print(
            f"median step {statistics.median(times):.3f} s, {result.loop.tokens_per_second:.0f} tokens/s; peak "
            "memory " + ", ".join(f"{k} {v:.2f}" for k, v in result.memory.items())
        )
    return 0
