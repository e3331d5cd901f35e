"""Tiny models, a tokenizer and SFT rows built in code, so every test runs offline in seconds (the fixtures that
save them are in conftest.py; tests import the builders from here: `from tiny_models import tiny_llama`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "what",
    "how",
    "why",
    "explain",
    "list",
    "write",
    "give",
    "tell",
    "me",
    "about",
    "of",
    "to",
    "and",
    "in",
    "for",
    "on",
    "with",
    "python",
    "code",
    "data",
    "model",
    "layer",
    "train",
    "answer",
    "question",
    "short",
    "long",
    "good",
    "bad",
    "yes",
    "no",
    "please",
    "thanks",
    "help",
    "water",
    "sun",
    "moon",
    "cat",
    "dog",
    "tree",
    "book",
    "music",
    "art",
    "science",
    "history",
    "math",
    "one",
    "two",
    "three",
    "four",
    "five",
]
VOCAB_SIZE = 128


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small vocabulary; unknown words map to <unk>."""
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate([*specials, "\n", "user", "assistant", "system", *WORDS])}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?:;'\"()-":
        vocab.setdefault(ch, len(vocab))
    assert len(vocab) <= VOCAB_SIZE
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=1,
        eos_token_id=3,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=1,
        eos_token_id=3,
        bos_token_id=2,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_positions=256,
        pad_token_id=1,
        eos_token_id=3,
        bos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}

TOPICS = ["water", "sun", "moon", "cat", "dog", "tree", "book", "music", "art", "science", "history", "math"]


def make_rows(n: int = 48) -> list[dict[str, str]]:
    """Alpaca rows whose answers follow a learnable pattern (topic -> fixed answer words)."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "instruction": f"tell me about {topic} please",
                "input": "",
                "output": f"the {topic} is good and the {topic} is {WORDS[i % 7]} . thanks",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
