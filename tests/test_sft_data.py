"""SFT data: every row format, assistant-only labels, file:line errors, length policy, deterministic split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ila.config import DataConfig
from ila.errors import IlaError
from ila.sft_data import (
    IGNORE_INDEX,
    Example,
    collate,
    detect_format,
    load_sft_data,
    read_rows,
    row_to_messages,
    tokenize_messages,
)
from tiny_models import make_rows, make_tokenizer, write_jsonl

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def label_segments(example: Example) -> list[list[int]]:
    """Contiguous runs of labelled tokens (one per assistant turn)."""
    segments: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                segments.append([])
            segments[-1].append(label)
        previous = label
    return segments


def assert_labels_are_answers(tokenizer: PreTrainedTokenizerFast, example: Example, answers: list[str]) -> None:
    """Labels are exactly each assistant answer followed by the end token, nothing else."""
    assert len(example.labels) == len(example.input_ids)
    for label, token in zip(example.labels, example.input_ids, strict=True):
        assert label in (IGNORE_INDEX, token)  # labels are the tokens themselves (shifted at loss time)
    segments = label_segments(example)
    assert len(segments) == len(answers)
    for segment, answer in zip(segments, answers, strict=True):
        assert tokenizer.decode(segment) == f"{answer} {tokenizer.eos_token}"
        assert segment == tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def newline_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """The test tokenizer, but newlines are tokens: catches labels that run past the end-of-turn token."""
    tokenizer = make_tokenizer(chat_template=chat_template)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Split(" ", "removed")]
    )
    return tokenizer


def data_cfg(path: Path, **kwargs: Any) -> DataConfig:
    values: dict[str, Any] = {"path": str(path), "max_length": 64, "min_response_tokens": 2}
    values.update(kwargs)
    return DataConfig(**values)


# --------------------------------------------------------------------------------------------- row formats


def test_alpaca_with_system_history_and_input() -> None:
    row = {
        "system": "help me",
        "instruction": "explain the sun",
        "input": "short please",
        "output": "the sun is good",
        "history": [["what is a cat", "a cat is an art"], ["and a dog", "a dog is good"]],
    }
    messages, fmt = row_to_messages(row, "auto", "f:1")
    assert fmt == "alpaca"
    assert messages == [
        {"role": "system", "content": "help me"},
        {"role": "user", "content": "what is a cat"},
        {"role": "assistant", "content": "a cat is an art"},
        {"role": "user", "content": "and a dog"},
        {"role": "assistant", "content": "a dog is good"},
        {"role": "user", "content": "explain the sun\n\nshort please"},
        {"role": "assistant", "content": "the sun is good"},
    ]
    plain, _ = row_to_messages({"instruction": "explain the sun", "input": "", "output": "yes"}, "alpaca", "f:1")
    assert plain == [{"role": "user", "content": "explain the sun"}, {"role": "assistant", "content": "yes"}]


def test_sharegpt() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "help"},
            {"from": "human", "value": "what is math"},
            {"from": "gpt", "value": "math is good"},
            {"from": "human", "value": "why"},
            {"from": "gpt", "value": "yes"},
        ]
    }
    messages, fmt = row_to_messages(row, "auto", "f:1")
    assert fmt == "sharegpt"
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages] == ["help", "what is math", "math is good", "why", "yes"]


def test_messages() -> None:
    raw = [{"role": "user", "content": "tell me a book"}, {"role": "assistant", "content": "the book is good"}]
    messages, fmt = row_to_messages({"messages": raw}, "auto", "f:1")
    assert fmt == "messages" and messages == raw
    with pytest.raises(IlaError, match=r"f:7: unknown role 'robot'"):
        row_to_messages({"messages": [{"role": "robot", "content": "x"}]}, "auto", "f:7")


@pytest.mark.parametrize(
    "row",
    [
        {"question": "what is two", "answer": "two is a math"},
        {"prompt": "what is two", "response": "two is a math"},
        {"prompt": "what is two", "completion": "two is a math"},
    ],
)
def test_question_answer(row: dict[str, str]) -> None:
    messages, fmt = row_to_messages(row, "auto", "f:1")
    assert fmt == "qa"
    assert messages == [{"role": "user", "content": "what is two"}, {"role": "assistant", "content": "two is a math"}]


@pytest.mark.parametrize("chosen", [{"from": "gpt", "value": "the cat is good"}, "the cat is good"])
def test_preference_uses_the_chosen_answer(chosen: Any) -> None:
    row = {
        "conversations": [{"from": "human", "value": "tell me about the cat"}],
        "chosen": chosen,
        "rejected": {"from": "gpt", "value": "no"},
    }
    messages, fmt = row_to_messages(row, "auto", "f:1")
    assert fmt == "preference"
    assert messages == [
        {"role": "user", "content": "tell me about the cat"},
        {"role": "assistant", "content": "the cat is good"},
    ]


def test_detect_format_unknown_row_names_location_and_fields() -> None:
    assert detect_format({"text": "x"}) == "unknown"
    with pytest.raises(IlaError, match=r"data\.jsonl:4: .*fields seen: text"):
        row_to_messages({"text": "x"}, "auto", "data.jsonl:4")
    with pytest.raises(IlaError, match=r"data\.jsonl:2: alpaca row is missing required field 'output'"):
        row_to_messages({"instruction": "x"}, "alpaca", "data.jsonl:2")
    with pytest.raises(IlaError, match=r"data\.jsonl:3: .*'conversations'"):
        row_to_messages({"instruction": "x", "output": "y"}, "sharegpt", "data.jsonl:3")
    with pytest.raises(IlaError, match=r"data\.jsonl:5: field 'answer' must be a string"):
        row_to_messages({"question": "x", "answer": 3}, "qa", "data.jsonl:5")
    with pytest.raises(IlaError, match=r"data\.jsonl:6: each row must be a JSON object"):
        row_to_messages(["x"], "auto", "data.jsonl:6")


# ------------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("make", [make_tokenizer, newline_tokenizer])
def test_labels_only_on_assistant_tokens(make: Any) -> None:
    tokenizer = make()
    messages = [
        {"role": "system", "content": "help me"},
        {"role": "user", "content": "what is the sun"},
        {"role": "assistant", "content": "the sun is good"},
        {"role": "user", "content": "and the moon"},
        {"role": "assistant", "content": "the moon is bad"},
    ]
    example = tokenize_messages(tokenizer, messages)
    assert_labels_are_answers(tokenizer, example, ["the sun is good", "the moon is bad"])
    # the labelled and unlabelled tokens together are exactly the rendered conversation
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert example.labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("make", [make_tokenizer, newline_tokenizer])
def test_fallback_template_without_chat_template(make: Any) -> None:
    tokenizer = make(chat_template=False)
    assert not getattr(tokenizer, "chat_template", None)
    messages = [
        {"role": "user", "content": "what is the sun"},
        {"role": "assistant", "content": "the sun is good"},
        {"role": "user", "content": "and the moon"},
        {"role": "assistant", "content": "the moon is bad"},
    ]
    example = tokenize_messages(tokenizer, messages)
    assert_labels_are_answers(tokenizer, example, ["the sun is good", "the moon is bad"])
    eos = tokenizer.eos_token  # the documented fallback: <|role|>\ncontent\n, eos closing each assistant turn
    text = (
        f"<|user|>\nwhat is the sun\n<|assistant|>\nthe sun is good{eos}\n"
        f"<|user|>\nand the moon\n<|assistant|>\nthe moon is bad{eos}\n"
    )
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in example.input_ids  # not the chat template
    with_template = tokenize_messages(make_tokenizer(), messages)
    assert with_template.input_ids != example.input_ids


def test_every_row_format_gives_answer_labels(tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [
        {
            "instruction": "tell me about the dog",
            "input": "",
            "output": "the dog is good",
            "history": [["what is a cat", "a cat is art"]],
        },
        {"conversations": [{"from": "human", "value": "what is math"}, {"from": "gpt", "value": "math is good"}]},
        {"messages": [{"role": "user", "content": "a book"}, {"role": "assistant", "content": "the book is long"}]},
        {"question": "what is two", "answer": "two is a math"},
        {"conversations": [{"from": "human", "value": "tell me"}], "chosen": {"from": "gpt", "value": "yes"}},
    ]
    expected = [["a cat is art", "the dog is good"], ["math is good"], ["the book is long"], ["two is a math"], ["yes"]]
    for row, answers in zip(rows, expected, strict=True):
        messages, _ = row_to_messages(row, "auto", "f:1")
        assert_labels_are_answers(tokenizer, tokenize_messages(tokenizer, messages), answers)


def test_collate_pads_without_labels(tokenizer: PreTrainedTokenizerFast) -> None:
    short = Example([5, 6, 7], [IGNORE_INDEX, 6, 7])
    long = Example([5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9])
    batch = collate([short, long], pad_id=1)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 1], [5, 6, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], long.labels]
    assert batch.real_tokens == 8


# ------------------------------------------------------------------------------------------- reading files


def test_json_list_and_jsonl_read_the_same_rows(tmp_path: Path) -> None:
    rows = make_rows(5)
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    from_jsonl, _, sha_jsonl = read_rows(str(jsonl))
    from_list, _, sha_list = read_rows(str(listed))
    assert [r for r, _ in from_jsonl] == rows == [r for r, _ in from_list]
    assert [where for _, where in from_jsonl] == [f"{jsonl}:{n}" for n in range(1, 6)]
    lines = listed.read_text().splitlines()
    for row, where in from_list:  # each location points at the line where that row's object opens
        line = int(where.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"
        assert json.dumps(row["instruction"]) in lines[line]
    assert sha_jsonl != sha_list


def test_malformed_jsonl_line_reports_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(make_rows(1)[0])
    path.write_text(f'{good}\n\n{good}\n{{"instruction": "x", "output": }}\n{good}\n', encoding="utf-8")
    with pytest.raises(IlaError, match=rf"^{path}:4: malformed JSON"):
        read_rows(str(path))


def test_malformed_json_list_reports_its_line(tmp_path: Path) -> None:
    rows = make_rows(4)
    rows[2]["output"] = "BROKEN"
    text = json.dumps(rows, indent=2).replace('"BROKEN"', "BROKEN")
    bad_line = next(i for i, line in enumerate(text.splitlines(), start=1) if "BROKEN" in line)
    assert bad_line > 10
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(IlaError, match=rf"^{path}:{bad_line}: malformed JSON"):
        read_rows(str(path))


def test_row_missing_required_field_names_file_line_and_field(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    rows: list[dict[str, Any]] = [*make_rows(2), {"instruction": "tell me"}, *make_rows(2)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(IlaError, match=rf"{path}:3: alpaca row is missing required field 'output'"):
        load_sft_data(data_cfg(path, format="alpaca"), tokenizer, seed=0)
    with pytest.raises(IlaError, match=rf"{path}:3: row has none of the supported layouts"):
        load_sft_data(data_cfg(path), tokenizer, seed=0)


@pytest.mark.parametrize("content", ["", "\n\n", "[]", "[\n]\n"])
def test_empty_file(tmp_path: Path, tokenizer: PreTrainedTokenizerFast, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(IlaError, match="empty"):
        load_sft_data(data_cfg(path), tokenizer, seed=0)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(IlaError, match="data file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(IlaError, match="is a folder"):
        read_rows(str(tmp_path))


# ----------------------------------------------------------------------------------------- length policy


def long_row(n_words: int) -> dict[str, str]:
    return {"instruction": "tell me", "input": "", "output": " ".join(["good"] * n_words)}


def test_every_example_too_long_is_an_error(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [long_row(40) for _ in range(4)])
    with pytest.raises(IlaError, match=r"longer than data\.max_length=16"):
        load_sft_data(data_cfg(path, max_length=16, too_long="drop"), tokenizer, seed=0)


def test_truncation_and_drops_are_counted(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    long_prompt = {"instruction": " ".join(["what"] * 80), "input": "", "output": "yes"}
    rows = [*make_rows(10), long_row(100), long_row(100), long_row(100), long_prompt]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    data = load_sft_data(data_cfg(path, max_length=48, min_response_tokens=4), tokenizer, seed=0)
    assert data.stats.rows == 14
    assert data.stats.truncated == 3
    assert data.stats.dropped_too_long == 1  # its answer would not survive the cut
    kept = data.train + data.eval
    assert len(kept) == 13
    assert all(len(e.input_ids) <= 48 for e in kept)
    assert sum(len(e.input_ids) == 48 for e in kept) == 3
    dropped = load_sft_data(data_cfg(path, max_length=48, too_long="drop"), tokenizer, seed=0)
    assert dropped.stats.truncated == 0 and dropped.stats.dropped_too_long == 4
    assert len(dropped.train) + len(dropped.eval) == 10


def test_row_without_answer_is_counted_not_trained(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [*make_rows(6), {"instruction": "tell me", "input": "", "output": "  "}]
    data = load_sft_data(data_cfg(write_jsonl(tmp_path / "r.jsonl", rows)), tokenizer, seed=0)
    assert data.stats.dropped_no_response == 1
    assert len(data.train) + len(data.eval) == 6


# -------------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_per_seed(tiny_data: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = data_cfg(tiny_data, eval_fraction=0.25)
    first = load_sft_data(cfg, tokenizer, seed=0)
    again = load_sft_data(cfg, tokenizer, seed=0)
    other = load_sft_data(cfg, tokenizer, seed=1)
    assert first.train == again.train and first.eval == again.eval
    assert first.eval != other.eval
    assert len(first.eval) == len(other.eval) == 12
    assert first.stats.train_examples + first.stats.eval_examples == 48
    train_ids = {tuple(e.input_ids) for e in first.train}
    assert len(train_ids) == 36  # the 48 rows are all different ...
    assert not any(tuple(e.input_ids) in train_ids for e in first.eval)  # ... and none is both trained and held out
    assert first.stats.fingerprint == again.stats.fingerprint and len(first.stats.fingerprint) == 64


def test_max_examples_and_eval_cap(tiny_data: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    data = load_sft_data(data_cfg(tiny_data, max_examples=20, eval_max_examples=3), tokenizer, seed=0)
    assert len(data.train) + len(data.eval) == 20
    assert len(data.eval) == 2  # 10% of 20, under the cap
    capped = load_sft_data(data_cfg(tiny_data, eval_fraction=0.5, eval_max_examples=3), tokenizer, seed=0)
    assert len(capped.eval) == 3


# ------------------------------------------------------------------------------------- the shared data sets


@pytest.mark.parametrize(
    "name, rows, formats",
    [
        ("lima.json", 1029, {"alpaca"}),
        ("alpaca_gpt4_1k.json", 999, {"alpaca"}),
        ("dpo_en_demo.json", 300, {"preference"}),
        ("gsm8k_train.jsonl", 7473, {"qa"}),
        ("gsm8k_test.jsonl", 1319, {"qa"}),
    ],
)
def test_shared_data_sets_convert_without_errors(name: str, rows: int, formats: set[str]) -> None:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    read, _, fingerprint = read_rows(str(path))
    assert len(read) == rows
    seen = set()
    for row, where in read:
        messages, fmt = row_to_messages(row, "auto", where)
        seen.add(fmt)
        assert messages[-1]["role"] == "assistant"
        assert messages[-1]["content"].strip()
    assert seen == formats
    assert len(fingerprint) == 64
