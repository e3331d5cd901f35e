"""SFT data: read alpaca / sharegpt / chat-messages / question-answer / preference rows, render them with the
tokenizer's chat template, mask the loss to assistant tokens, split off a held-out set, and batch by length.

Reads a JSON or JSONL file, the bundled data set, or a hub data set; writes nothing. Every problem with a row is
an `IlaError` naming `file:line`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ila.config import BUNDLED_DATA, DataConfig
from ila.errors import IlaError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Message = dict[str, str]

# Used only when the tokenizer has no chat template (documented in the README).
FALLBACK_TEMPLATE = "<|{role}|>\n{content}\n"

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bing": "assistant",
    "chatgpt": "assistant",
}


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on non-assistant tokens


@dataclass
class DataStats:
    """What happened to the rows; goes into the report."""

    source: str
    fingerprint: str
    format_counts: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_response: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    policy: str = ""


@dataclass
class SftData:
    train: list[Example]
    eval: list[Example]
    stats: DataStats


# ----------------------------------------------------------------------------------------------- reading rows


def bundled_data_path() -> Path:
    return Path(str(resources.files("ila") / "datasets" / "ila_align.jsonl"))


def _read_json_array(text: str, path: Path) -> list[tuple[Any, str]]:
    """Parse a JSON list element by element so each row keeps its line number."""
    decoder = json.JSONDecoder()
    rows: list[tuple[Any, str]] = []
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            if text[pos] == "\n":
                line += 1
            pos += 1
        if pos >= len(text):
            raise IlaError(f"{path}:{line}: unterminated JSON list")
        if text[pos] == "]":
            return rows
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise IlaError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        rows.append((value, f"{path}:{line}"))
        line += text.count("\n", pos, end)
        pos = end


def read_rows(path_or_id: str, split: str = "train") -> tuple[list[tuple[Any, str]], str, str]:
    """Return ([(row, location)], source, fingerprint) for a file, the bundled set or a hub id."""
    path = bundled_data_path() if path_or_id == BUNDLED_DATA else Path(path_or_id).expanduser()
    looks_local = (
        path_or_id == BUNDLED_DATA
        or path.suffix in (".json", ".jsonl")
        or path_or_id.startswith(("/", "./", "../", "~"))
    )
    if path.is_dir():
        raise IlaError(f"data path {path_or_id} is a folder; give a .json or .jsonl file or a hub data set id")
    if path.is_file():
        raw = path.read_bytes()
        fingerprint = hashlib.sha256(raw).hexdigest()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise IlaError(f"{path}:{line}: not valid UTF-8 text") from None
        rows: list[tuple[Any, str]] = []
        if text.lstrip().startswith("["):
            rows = _read_json_array(text, path)
        else:
            for number, line_text in enumerate(text.splitlines(), start=1):
                if not line_text.strip():
                    continue
                try:
                    rows.append((json.loads(line_text), f"{path}:{number}"))
                except json.JSONDecodeError as err:
                    raise IlaError(f"{path}:{number}: malformed JSON line ({err.msg})") from None
        return rows, str(path), fingerprint
    if looks_local:
        raise IlaError(f"data file not found: {path_or_id}")
    return _read_hub_rows(path_or_id, split)


def _read_hub_rows(dataset_id: str, split: str) -> tuple[list[tuple[Any, str]], str, str]:
    import datasets  # deferred: only hub users pay for the import

    try:
        loaded = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # the hub client raises many types; the user needs one line
        raise IlaError(
            f"data not found: '{dataset_id}' is neither a local .json/.jsonl file nor a loadable hub data set "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None
    fingerprint = f"hub:{dataset_id}:{split}:{getattr(loaded, '_fingerprint', '')}"
    return [(dict(row), f"{dataset_id}[{split}]:{i}") for i, row in enumerate(loaded)], dataset_id, fingerprint


# ------------------------------------------------------------------------------------ rows to conversations


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row and "chosen" in row:
        return "preference"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if ("question" in row and "answer" in row) or ("prompt" in row and ("response" in row or "completion" in row)):
        return "qa"
    return "unknown"


def _need_str(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise IlaError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _sharegpt_turns(turns: Any, where: str) -> list[Message]:
    if not isinstance(turns, list):
        raise IlaError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise IlaError(f"{where}: every turn in 'conversations' needs 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise IlaError(f"{where}: unknown speaker '{turn['from']}'; allowed: {', '.join(_SHAREGPT_ROLES)}")
        out.append({"role": role, "content": str(turn["value"])})
    return out


def row_to_messages(row: Any, fmt: str, where: str) -> tuple[list[Message], str]:
    """Convert one row to chat messages; returns (messages, detected format)."""
    if not isinstance(row, dict):
        raise IlaError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    detected = detect_format(row) if fmt == "auto" else fmt
    if detected == "alpaca":
        for key in ("instruction", "output"):
            if key not in row:
                raise IlaError(f"{where}: alpaca row is missing required field '{key}'")
        messages: list[Message] = []
        if isinstance(row.get("system"), str) and row["system"]:
            messages.append({"role": "system", "content": row["system"]})
        for pair in row.get("history") or []:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise IlaError(f"{where}: 'history' must be a list of [user, assistant] pairs")
            messages += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
        prompt = _need_str(row, "instruction", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise IlaError(f"{where}: field 'input' must be a string")
        messages.append({"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt})
        messages.append({"role": "assistant", "content": _need_str(row, "output", where)})
        return messages, detected
    if detected == "messages":
        raw = row.get("messages")
        if not isinstance(raw, list):
            raise IlaError(f"{where}: 'messages' must be a list of {{role, content}}")
        messages = []
        for message in raw:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise IlaError(f"{where}: every message needs 'role' and 'content'")
            if message["role"] not in ("system", "user", "assistant"):
                raise IlaError(f"{where}: unknown role '{message['role']}'; allowed: system, user, assistant")
            messages.append({"role": message["role"], "content": str(message["content"])})
        return messages, detected
    if detected in ("sharegpt", "preference"):
        if "conversations" not in row:
            raise IlaError(f"{where}: {detected} row is missing required field 'conversations'")
        messages = _sharegpt_turns(row["conversations"], where)
        if detected == "preference":  # SFT on the preferred answer
            chosen = row.get("chosen")
            if isinstance(chosen, dict) and "value" in chosen:
                messages.append({"role": "assistant", "content": str(chosen["value"])})
            elif isinstance(chosen, str):
                messages.append({"role": "assistant", "content": chosen})
            else:
                raise IlaError(f"{where}: preference row needs 'chosen' as a string or a {{from, value}} turn")
        return messages, detected
    if detected == "qa":
        prompt_key = "question" if "question" in row else "prompt"
        answer_key = next((k for k in ("answer", "response", "completion") if k in row), None)
        if prompt_key not in row or answer_key is None:
            raise IlaError(f"{where}: question/answer row needs 'question'/'prompt' and 'answer'/'response'")
        return [
            {"role": "user", "content": _need_str(row, prompt_key, where)},
            {"role": "assistant", "content": _need_str(row, answer_key, where)},
        ], detected
    raise IlaError(
        f"{where}: row has none of the supported layouts (fields seen: {', '.join(sorted(row)) or 'none'}); "
        "allowed: alpaca (instruction, output), sharegpt (conversations), messages, question/answer, "
        "preference (conversations + chosen)"
    )


# ------------------------------------------------------------------------------------------- tokenization


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return str(text)
    eos = tokenizer.eos_token or ""  # closes every assistant turn, so earlier turns render the same each time
    text = ""
    for m in messages:
        end = eos if m["role"] == "assistant" else ""
        text += FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"] + end)
    if add_generation_prompt:
        text += "<|assistant|>\n"
    return text


def tokenize_messages(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> Example:
    """Tokens of the rendered conversation with labels only on assistant turns (their end token included).

    The conversation is rendered prefix by prefix so each assistant turn's text is exactly what the template
    appends after the generation prompt; segments are tokenized separately and concatenated.
    """
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt_text = _render(tokenizer, messages[:i], add_generation_prompt=True)
            full_text = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            segments = [(prompt_text, False), (full_text, True)]
        else:
            segments = [(_render(tokenizer, messages[: i + 1], add_generation_prompt=False), False)]
        for text, trainable in segments:
            if not text.startswith(rendered):  # a template that rewrites earlier turns: keep the common prefix
                common = 0
                while common < min(len(text), len(rendered)) and text[common] == rendered[common]:
                    common += 1
                rendered = rendered[:common]
            piece = text[len(rendered) :]
            rendered = text
            if not piece:
                continue
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            piece_labels = list(piece_ids) if trainable else [IGNORE_INDEX] * len(piece_ids)
            eos = tokenizer.eos_token_id
            if trainable and eos in piece_ids:  # the turn ends at its end token; a newline after it is never generated
                end = len(piece_ids) - piece_ids[::-1].index(eos)
                piece_labels[end:] = [IGNORE_INDEX] * (len(piece_ids) - end)
            ids += piece_ids
            labels += piece_labels
    return Example(ids, labels)


def _fit_length(example: Example, cfg: DataConfig) -> tuple[Example | None, str]:
    """Apply the length policy; returns (example or None, "ok" | "truncated" | "dropped")."""
    if len(example.input_ids) <= cfg.max_length:
        return example, "ok"
    if cfg.too_long == "drop":
        return None, "dropped"
    cut = Example(example.input_ids[: cfg.max_length], example.labels[: cfg.max_length])
    # Keep a truncated example only if enough of its answer survives: labels are shifted by one at loss time.
    if sum(1 for t in cut.labels[1:] if t != IGNORE_INDEX) < cfg.min_response_tokens:
        return None, "dropped"
    return cut, "truncated"


def load_sft_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> SftData:
    """Read, convert, tokenize, length-filter and split the data deterministically."""
    rows, source, fingerprint = read_rows(cfg.path, cfg.split)
    if not rows:
        raise IlaError(f"data set {source} is empty: no rows found")
    stats = DataStats(
        source=source,
        fingerprint=fingerprint,
        rows=len(rows),
        policy=f"{cfg.too_long} at {cfg.max_length} tokens (min {cfg.min_response_tokens} response tokens kept)",
    )
    converted = []
    for row, where in rows:
        messages, fmt = row_to_messages(row, cfg.format, where)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            stats.dropped_no_response += 1
            continue
        stats.format_counts[fmt] = stats.format_counts.get(fmt, 0) + 1
        converted.append(messages)
    order = list(range(len(converted)))
    random.Random(seed).shuffle(order)  # deterministic shuffle, before any cap, so caps take a random sample
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    examples: list[Example] = []
    for index in order:
        example, outcome = _fit_length(tokenize_messages(tokenizer, converted[index]), cfg)
        if outcome == "truncated":
            stats.truncated += 1
        elif outcome == "dropped":
            stats.dropped_too_long += 1
        if example is not None:
            examples.append(example)
    if not examples:
        if stats.dropped_too_long:
            if cfg.too_long == "drop":
                advice = "raise data.max_length or use data.too_long=truncate"
            else:  # truncation was tried: the cut kept too few answer tokens
                advice = (
                    f"truncation kept fewer than data.min_response_tokens={cfg.min_response_tokens} answer tokens; "
                    "raise data.max_length or lower data.min_response_tokens"
                )
            raise IlaError(
                f"every example in {source} is longer than data.max_length={cfg.max_length} tokens and was dropped; "
                + advice
            )
        raise IlaError(f"data set {source} has no example with an assistant answer")
    if len(examples) < 2:
        raise IlaError(f"data set {source} has {len(examples)} usable example; at least 2 are needed to hold one out")
    n_eval = min(cfg.eval_max_examples, max(1, round(len(examples) * cfg.eval_fraction)))
    stats.eval_examples, stats.train_examples = n_eval, len(examples) - n_eval
    train = examples[n_eval:]
    stats.train_tokens = sum(len(e.input_ids) for e in train)
    return SftData(train=train, eval=examples[:n_eval], stats=stats)


# ---------------------------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example in the batch (length grouping keeps that close to every example)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels)


def length_grouped_order(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of full batches: shuffle, sort by length inside mega-chunks of 32 batches, shuffle the batches.

    The last len % batch_size examples of the shuffled epoch wait for the next epoch (a new shuffle), so every
    batch has exactly `batch_size` rows and splits evenly across processes.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[: len(order) - len(order) % batch_size]
    chunk = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_stream(examples: list[Example], batch_size: int, pad_id: int, seed: int, skip: int = 0) -> Iterator[Batch]:
    """Endless, deterministic, length-grouped batches; `skip` fast-forwards to resume at a data position."""
    rng = random.Random(seed)
    lengths = [len(e.input_ids) for e in examples]
    produced = 0
    while True:
        for indices in length_grouped_order(lengths, min(batch_size, len(examples)), rng):
            if produced >= skip:
                yield collate([examples[i] for i in indices], pad_id)
            produced += 1


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[Batch]:
    """Held-out batches in a fixed, length-sorted order (little padding, same numbers every time)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [collate([examples[i] for i in order[s : s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]
