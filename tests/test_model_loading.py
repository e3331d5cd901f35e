"""Model loading, directly: a local folder loads with its tokenizer and a fingerprint of its files, the module tree
builds on the meta device without weights, the dtype rule, and paths that are not models are one error each."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ila.config import ModelConfig
from ila.errors import IlaError
from ila.model_loading import (
    fingerprint_model_files,
    load_model,
    load_model_skeleton,
    pick_dtype,
    resolve_model_path,
)
from tiny_models import tiny_llama


def test_a_local_folder_loads_the_saved_weights_with_its_fingerprint(tiny_model_dir: Path) -> None:
    loaded = load_model(ModelConfig(name=str(tiny_model_dir)), torch.device("cpu"))
    saved = tiny_llama()
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), saved.state_dict().values(), strict=True)
    )
    assert loaded.tokenizer.pad_token_id is not None and loaded.resolved_path == str(tiny_model_dir)
    assert loaded.fingerprint == fingerprint_model_files(tiny_model_dir)
    assert next(loaded.model.parameters()).dtype == torch.float32  # fp32 on CPU


def test_the_fingerprint_changes_with_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert fingerprint_model_files(copy) == fingerprint_model_files(tiny_model_dir)
    tiny_llama(seed=1).save_pretrained(copy)  # same shapes and config, other weights
    assert fingerprint_model_files(copy) != fingerprint_model_files(tiny_model_dir)


def test_the_module_tree_builds_on_the_meta_device(tiny_model_dir: Path) -> None:
    skeleton = load_model_skeleton(ModelConfig(name=str(tiny_model_dir)))
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    names = [n for n, _ in skeleton.named_parameters()]
    assert names == [n for n, _ in tiny_llama().named_parameters()]


def test_dtype_rule() -> None:
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16


def test_what_is_not_a_model_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(IlaError, match="model not found"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(IlaError, match=r"is not a \.gguf file"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    with pytest.raises(IlaError, match=r"has no config\.json"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path("org/some-model") == ("org/some-model", False)  # a hub id, fetched when loaded
