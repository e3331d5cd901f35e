"""Session setup for the tests (offline, one thread) and the fixtures every test file shares."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tiny_models import make_rows, make_tokenizer, tiny_llama, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is ~15x faster than two here


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + tokenizer folder, loadable by path like any Hugging Face model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", make_rows())


@pytest.fixture
def fast_overrides() -> list[str]:
    """A config small enough for a tiny model to finish identify in seconds."""
    return [
        "stage1.max_steps=12",
        "stage1.window=4",
        "stage1.batch_size=4",
        "stage1.lr=0.01",
        "stage2.steps=8",
        "stage2.batch_size=4",
        "data.max_length=64",
        "run.threads=1",
    ]
