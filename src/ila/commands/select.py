"""`ila select`: turn a ranking into the layers to fine-tune (top-K, freeze-bottom, budgets)."""

from __future__ import annotations

import argparse

from ila.commands import COMMANDS
from ila.commands._shared import Subparsers
from ila.errors import IlaError

SELECT_EXAMPLES = """examples:
  ila select --ranking runs/llama-lima --top 0.3 --output selection.json        # best 30% of the layers
  ila select --ranking runs/llama-lima/ranking.json --top 12 --output top12.json
  ila select --ranking R --freeze-bottom 0.25 --output sel.json                  # = top 75%
  ila select --ranking R --param-budget 2M --lora-r 16 --output sel.json         # LoRA parameters r*(in+out)
  ila select --ranking R --param-budget 50M --method full --output sel.json      # weights in*out
  ila select --ranking R --memory-budget 12 --method qlora --output sel.json     # estimated training GB
  ila select --ranking R --memory-budget 20 --gradient-checkpointing --output sel.json  # as trained with it
  ila select --ranking runs/spectrum --top 0.25 --per-type --output sel.json     # best 25% of each module type
  ila select --ranking R --param-budget 2M --per-type --output sel.json          # split by type, by type's size
  ila select --ranking R --param-budget 30% --output sel.json                    # 30% of all layers' LoRA params
  ila select --ranking R --lora-ranks 30% --output sel.json     # every layer, rank from its score (rank_pattern)

Budgets are greedy by rank and skip layers that do not fit, so they are never exceeded. Any ranking.json works
(ILA or a baseline such as random-K or last-K). The memory estimate counts weights, adapter/optimizer state,
activations from the lowest selected block up (backward stops there: the depth cost; with
--gradient-checkpointing only each block's input plus one recomputed block) and logits. --per-type
applies the rule to each module type in the ranking's order: a count per type, a fraction rounded down per type
(at least 1; Spectrum's int(n*P/100)), freeze-bottom per type, a parameter budget split in proportion to each
type's parameters (a memory budget is not split). The summary prints the trainable share and the lowest block.
"""


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "select",
        help=COMMANDS["select"],
        description="Pick layers from a ranking by count, fraction, freeze-bottom fraction, "
        "trainable-parameter budget or estimated memory budget; writes selection.json with the "
        "chosen layers in model order, their parameter counts and the lowest selected block.",
        epilog=SELECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ranking", required=True, help="ranking.json, or a run folder that holds one")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--top", metavar="K|FRACTION", help="a count (12) or a fraction (0.3) of the best layers")
    rule.add_argument(
        "--freeze-bottom",
        type=float,
        metavar="FRACTION",
        help="freeze this fraction of the least important layers (0.25 = keep the top 75%%)",
    )
    rule.add_argument(
        "--param-budget",
        metavar="N",
        help="at most N trainable parameters (2000000, 2e6, 1.5M, 300k, or 30%% of every layer's count)",
    )
    rule.add_argument(
        "--lora-ranks",
        metavar="N",
        help="keep every layer and give each a LoRA rank in proportion to its score (ILA's gamma), using at most "
        "N LoRA parameters (as --param-budget); exported as PEFT rank_pattern/alpha_pattern",
    )
    rule.add_argument("--memory-budget", type=float, metavar="GB", help="at most this much estimated training memory")
    parser.add_argument(
        "--method",
        choices=["lora", "qlora", "full"],
        default="lora",
        help="what a budget counts: LoRA factors r*(in+out) or full weights in*out (default lora)",
    )
    parser.add_argument(
        "--per-type",
        action="store_true",
        help="apply --top, --freeze-bottom or --param-budget within each module type (q_proj, k_proj, ... "
        "separately), as Spectrum does; a fraction is rounded down per type, at least 1 layer each",
    )
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank for parameter counts (default 8)")
    parser.add_argument(
        "--rank-choices",
        default="1,2,4,8,16,32",
        metavar="LIST",
        help="--lora-ranks: the ranks a layer can get (default 1,2,4,8,16,32)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="memory estimate: sequences per step (default 4)")
    parser.add_argument("--max-length", type=int, default=256, help="memory estimate: tokens per sequence (256)")
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=0.05,
        help="memory estimate: LoRA dropout (default 0.05, ila's; with 0 the adapters keep no input copies)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="memory estimate: blocks keep only their inputs and are recomputed in backward, as "
        "run.gradient_checkpointing=true trains (default: on for qlora, whose qlora.gradient_checkpointing is on, "
        "off otherwise)",
    )
    parser.add_argument(
        "--fsdp",
        type=int,
        default=1,
        metavar="N",
        help="memory estimate per process under FSDP across N processes (configs/fsdp.yaml; default 1: no FSDP)",
    )
    parser.add_argument("--model", help="model for layer shapes and order (default: the model the ranking names)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    parser.add_argument("--output", required=True, help="selection.json to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ila.selection import RuleKind, SelectionRule, parse_param_count, parse_share, select_from_file

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise IlaError(f"{output} already exists; choose another --output or pass --overwrite")
    common = {
        "method": args.method,
        "lora_r": args.lora_r,
        "batch_size": args.batch_size,
        "seq_len": args.max_length,
        "per_type": args.per_type,
        "fsdp_processes": args.fsdp,
        "lora_dropout": args.lora_dropout,
        "gradient_checkpointing": (
            args.method == "qlora" if args.gradient_checkpointing is None else args.gradient_checkpointing
        ),
    }
    if args.top is not None:
        try:
            rule = SelectionRule("top_count", float(int(args.top)), **common)
        except ValueError:
            try:
                rule = SelectionRule("top_fraction", float(args.top), **common)
            except ValueError:
                raise IlaError(f"--top {args.top}: give a count (12) or a fraction (0.3)") from None
    elif args.freeze_bottom is not None:
        rule = SelectionRule("freeze_bottom", args.freeze_bottom, **common)
    elif args.param_budget is not None or args.lora_ranks is not None:
        kind: RuleKind = "param_budget" if args.param_budget is not None else "lora_ranks"
        text = args.param_budget if args.param_budget is not None else args.lora_ranks
        try:
            choices = tuple(int(r) for r in args.rank_choices.split(",") if r.strip())
        except ValueError:
            raise IlaError(f"--rank-choices {args.rank_choices}: give whole numbers such as 1,2,4,8,16") from None
        if text.strip().endswith("%"):  # a share of what every layer would train
            everything = select_from_file(
                args.ranking, SelectionRule("all", **common), args.model, args.trust_remote_code
            )
            counted = "full" if args.method == "full" else "lora"
            total = everything.trainable_params[counted]
            if total is None:
                raise IlaError(f"--{kind.replace('_', '-')} {text} needs the model's layer shapes: pass --model")
            value = parse_share(text) * total
        else:
            value = parse_param_count(text)
        rule = SelectionRule(kind, value, rank_choices=choices, **common)
    else:
        rule = SelectionRule("memory_budget", args.memory_budget, **common)
    selection = select_from_file(args.ranking, rule, args.model, args.trust_remote_code)
    selection.save(output)
    print(f"{output}: {selection.summary()}")
    for layer in selection.layers[:12]:
        print(f"  {layer.name}  (rank {layer.rank})")
    if len(selection.layers) > 12:
        print(f"  ... and {len(selection.layers) - 12} more (model order) in {output}")
    return 0
