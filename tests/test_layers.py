"""Layer discovery from the module tree: Llama, Qwen2 (nn.Linear) and GPT-2 (Conv1D), lm_head, and failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ila.config import LoraShapeConfig
from ila.errors import IlaError
from ila.layers import discover_layers, find_block_list, module_types, summarize_layers
from ila.lora_adapters import attach_lora
from tiny_models import BUILDERS, tiny_gpt2, tiny_llama, tiny_qwen2

LLAMA_TYPES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
GPT2_TYPES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_llama_style_blocks(build) -> None:
    model = build()
    layers = discover_layers(model)
    assert len(layers) == 28  # 7 per block x 4 blocks
    assert [layer.name for layer in layers] == [f"model.layers.{b}.{t}" for b in range(4) for t in LLAMA_TYPES]
    assert [layer.block for layer in layers] == [b for b in range(4) for _ in LLAMA_TYPES]
    assert module_types(layers) == LLAMA_TYPES
    for layer in layers:
        module = model.get_submodule(layer.name)
        assert isinstance(module, nn.Linear)
        assert (layer.out_features, layer.in_features) == tuple(module.weight.shape)
    k_proj = layers[1]
    assert (k_proj.in_features, k_proj.out_features) == (32, 16)  # 2 key/value heads of 8
    assert find_block_list(model)[0] == "model.layers"


def test_gpt2_conv1d_blocks() -> None:
    model = tiny_gpt2()
    layers = discover_layers(model)
    assert len(layers) == 16  # 4 per block x 4 blocks
    assert [layer.name for layer in layers] == [f"transformer.h.{b}.{t}" for b in range(4) for t in GPT2_TYPES]
    assert all(isinstance(model.get_submodule(layer.name), Conv1D) for layer in layers)
    c_attn, c_proj, c_fc, mlp_proj = layers[:4]
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)  # Conv1D stores (in, out): q, k, v fused
    assert (c_proj.in_features, c_proj.out_features) == (32, 32)
    assert (c_fc.in_features, c_fc.out_features) == (32, 128)
    assert (mlp_proj.in_features, mlp_proj.out_features) == (128, 32)
    assert c_fc.n_params == 32 * 128


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_include_lm_head_adds_one_layer(family: str) -> None:
    model = BUILDERS[family]()
    plain = discover_layers(model)
    with_head = discover_layers(model, include_lm_head=True)
    assert with_head[:-1] == plain
    head = with_head[-1]
    assert (head.name, head.block, head.module_type) == ("lm_head", -1, "lm_head")
    assert (head.in_features, head.out_features) == (32, 128)
    assert "4 blocks" in summarize_layers(with_head)  # the head is not counted as a block


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_lora_attaches_to_exactly_the_discovered_layers(family: str) -> None:
    model = BUILDERS[family]()
    layers = discover_layers(model)
    peft_model = attach_lora(model, layers, LoraShapeConfig(r=2, alpha=4, dropout=0.0))
    wrapped = [
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and len(module.lora_A) > 0
    ]
    assert wrapped == [layer.name for layer in layers]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Conv2d(8, 8, 1)


class NoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])


class Decoy(nn.Module):
    """Two module lists with linear layers: the block list is the one holding more parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(5)])
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2)])


def test_model_without_linear_layers_in_blocks_is_an_error() -> None:
    with pytest.raises(IlaError, match="unsupported architecture NoLinears"):
        discover_layers(NoLinears())


def test_block_list_is_the_largest_list_of_blocks() -> None:
    layers = discover_layers(Decoy())
    assert [layer.name for layer in layers] == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    assert [layer.module_type for layer in layers] == ["0", "2", "0", "2"]


def test_include_lm_head_without_a_head_is_an_error() -> None:
    with pytest.raises(IlaError, match="include_lm_head"):
        discover_layers(Decoy(), include_lm_head=True)


def test_discovery_does_not_touch_the_weights() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    discover_layers(model, include_lm_head=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
