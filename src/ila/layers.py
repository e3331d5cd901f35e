"""Layer discovery: find the transformer blocks and the linear layers inside them from the module tree.

A "layer" is one linear weight matrix of one block (e.g. block 12's `self_attn.q_proj`). Nothing here knows a
model family's names: the block list is the largest `nn.ModuleList` of identical modules, and a layer is any
`nn.Linear` or GPT-2 style `Conv1D` inside a block (fused `qkv_proj` and per-expert MoE linears included).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from ila.errors import IlaError


@dataclass(frozen=True)
class Layer:
    """One scorable linear layer."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    block: int  # block index; -1 for lm_head
    module_type: str  # path inside the block, e.g. "self_attn.q_proj" (or "lm_head")
    in_features: int
    out_features: int

    @property
    def n_params(self) -> int:
        return self.in_features * self.out_features


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):  # Conv1D stores weight as (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList of same-class children that holds the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(_is_linear(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise IlaError(
            f"unsupported architecture {type(model).__name__}: no list of transformer blocks with linear layers "
            "was found (ila needs a decoder whose blocks contain nn.Linear or Conv1D layers)"
        )
    return best[1], best[2]


def discover_layers(model: nn.Module, include_lm_head: bool = False) -> list[Layer]:
    """Every linear layer of every block, in block order then module order; optionally the output head."""
    prefix, blocks = find_block_list(model)
    layers: list[Layer] = []
    for index, block in enumerate(blocks):
        for sub_name, module in block.named_modules():
            if sub_name and _is_linear(module):
                fan_in, fan_out = _shape(module)
                layers.append(Layer(f"{prefix}.{index}.{sub_name}", index, sub_name, fan_in, fan_out))
    if not layers:
        raise IlaError(f"unsupported architecture {type(model).__name__}: its blocks contain no linear layers")
    if include_lm_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
        if head is None or not _is_linear(head):
            raise IlaError("model.include_lm_head=true, but this model has no linear output head")
        head_name = next(n for n, m in model.named_modules() if m is head)
        fan_in, fan_out = _shape(head)
        layers.append(Layer(head_name, -1, "lm_head", fan_in, fan_out))
    return layers


def module_types(layers: list[Layer]) -> list[str]:
    """Module types in first-seen order (the heatmap's columns)."""
    return list(dict.fromkeys(layer.module_type for layer in layers))


def summarize_layers(layers: list[Layer]) -> str:
    """A short human summary: blocks, layers per type, parameter counts."""
    counts = Counter(layer.module_type for layer in layers)
    n_blocks = len({layer.block for layer in layers if layer.block >= 0})
    total = sum(layer.n_params for layer in layers)
    lines = [f"{len(layers)} linear layers in {n_blocks} blocks ({total / 1e6:.1f}M weights)"]
    for module_type in module_types(layers):
        example = next(layer for layer in layers if layer.module_type == module_type)
        lines.append(f"  {module_type:<28} x{counts[module_type]:<4} {example.in_features}->{example.out_features}")
    return "\n".join(lines)
