"""What trains in `ila finetune`: the selection's layers made trainable by LoRA, AdaLoRA, QLoRA or full fine-tuning
(every other parameter frozen before the optimizer exists, the count checked against the selection), and what is
saved afterwards: the adapter, or only the changed weight matrices with a note on applying them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ila import distributed, fsdp
from ila.config import FinetuneConfig
from ila.errors import IlaError
from ila.layers import Layer
from ila.lora_adapters import (
    adalora_orthogonal_penalty,
    adalora_update,
    adapted_module_names,
    attach_adalora,
    attach_lora,
    prepare_quantized_for_training,
)
from ila.model_loading import LoadedModel
from ila.run_folder import atomic_dir, atomic_write_bytes, atomic_write_text
from ila.selection import Selection
from ila.training_loop import enable_gradient_checkpointing

log = logging.getLogger(__name__)

CHANGED_WEIGHTS = "selected_weights.safetensors"


def check_method_available(cfg: FinetuneConfig) -> None:
    """Refuse a method this machine cannot run, before anything is loaded or written."""
    if distributed.fsdp_enabled() and cfg.finetune.method in ("adalora", "qlora"):
        raise IlaError(
            f"finetune.method={cfg.finetune.method} cannot run under FSDP (AdaLoRA's rank allocator and 4-bit "
            "weights need whole tensors); use lora or full with configs/fsdp.yaml, or configs/ddp.yaml"
        )
    if distributed.fsdp_enabled() and cfg.finetune.save_model:
        raise IlaError("finetune.save_model=true is not supported under FSDP; apply the changed weights instead")
    if cfg.finetune.method != "qlora":
        return
    if cfg.run.device == "cpu" or not torch.cuda.is_available():
        raise IlaError(
            "finetune.method=qlora needs a CUDA GPU (4-bit bitsandbytes weights) and none is available; "
            "use --method lora here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise IlaError("finetune.method=qlora needs bitsandbytes: pip install bitsandbytes")


def quantization_config(cfg: FinetuneConfig) -> Any:
    from transformers import BitsAndBytesConfig

    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.qlora.quant_type,
        bnb_4bit_use_double_quant=cfg.qlora.double_quant,
        bnb_4bit_compute_dtype=compute[cfg.qlora.compute_dtype],
    )


def resolve_selection(selection: Selection, layers: Sequence[Layer], model_name: str) -> list[Layer]:
    """The model's Layer objects for the selected names; every name must exist in this model."""
    by_name = {layer.name: layer for layer in layers}
    missing = [name for name in selection.names() if name not in by_name]
    if missing:
        raise IlaError(
            f"the selection does not match {model_name}: layer {missing[0]} (and {len(missing) - 1} more) "
            f"is not a linear layer of this model; select with a ranking of the same model"
        )
    if not selection.layers:
        raise IlaError("the selection is empty; select at least one layer")
    return [by_name[name] for name in selection.names()]


@dataclass
class TrainableSetup:
    """What the method made trainable, and the extra hooks it needs in the shared loop."""

    model: nn.Module
    params: list[nn.Parameter]
    names: list[str]
    extra_loss: Callable[[], torch.Tensor] | None = None
    before_zero_grad: Callable[[int], None] | None = None


def make_trainable(
    model: nn.Module, chosen: Sequence[Layer], cfg: FinetuneConfig, ranks: dict[str, int] | None = None
) -> TrainableSetup:
    """Set up the method on exactly `chosen`, at each layer's own LoRA rank where `ranks` gives one; every other
    parameter is frozen before the optimizer exists."""
    method = cfg.finetune.method
    if ranks and method not in ("lora", "qlora"):
        raise IlaError(
            f"the selection gives each layer its own LoRA rank, which --method {method} cannot use; "
            "train it with --method lora or qlora"
        )
    if method == "full":
        model.requires_grad_(False)
        for layer in chosen:
            _weight(model, layer).requires_grad_(True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        expected = {f"{layer.name}.weight" for layer in chosen}
        if set(names) != expected:  # a tied weight (lm_head = embeddings) is reported under one name
            log.warning(
                "full fine-tuning trains %s (selected: %d weights); tied weights are shared",
                ", ".join(sorted(set(names) ^ expected)),
                len(expected),
            )
        return TrainableSetup(model, [p for p in model.parameters() if p.requires_grad], names)
    if method == "qlora":
        model = prepare_quantized_for_training(model)  # type: ignore[arg-type]
        if cfg.qlora.gradient_checkpointing:
            enable_gradient_checkpointing(model)
    if method == "adalora":
        peft_model = attach_adalora(model, chosen, cfg.lora, cfg.adalora, cfg.finetune.max_steps)  # type: ignore[arg-type]
    else:
        peft_model = attach_lora(model, chosen, cfg.lora, ranks)  # type: ignore[arg-type]
    adapted = set(adapted_module_names(peft_model))
    wanted = {layer.name for layer in chosen}
    if adapted != wanted:  # PEFT's suffix matching must not reach beyond the selection
        raise IlaError(
            f"PEFT adapted {len(adapted)} modules but {len(wanted)} were selected "
            f"(extra: {sorted(adapted - wanted)[:3]}, missing: {sorted(wanted - adapted)[:3]})"
        )
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    trainable = TrainableSetup(peft_model, [p for p in peft_model.parameters() if p.requires_grad], names)
    if method == "adalora":
        trainable.extra_loss = lambda: adalora_orthogonal_penalty(peft_model)
        trainable.before_zero_grad = lambda step: adalora_update(peft_model, step)
    return trainable


def expected_params(chosen: Sequence[Layer], cfg: FinetuneConfig, ranks: dict[str, int] | None = None) -> int:
    method = cfg.finetune.method
    if method == "full":
        return sum(layer.n_params for layer in chosen)
    if method == "adalora":  # A (r x in), B (out x r) and the r singular values E
        return sum(cfg.adalora.init_r * (layer.in_features + layer.out_features + 1) for layer in chosen)
    r = ranks or {}
    return sum(r.get(layer.name, cfg.lora.r) * (layer.in_features + layer.out_features) for layer in chosen)


def save_trained(
    model: nn.Module, chosen: Sequence[Layer], cfg: FinetuneConfig, loaded: LoadedModel, run_dir: Path
) -> dict[str, str]:
    """The adapter (LoRA family) or the changed tensors (full), and optionally the whole model."""
    if cfg.finetune.method != "full":
        state = fsdp.lora_state_dict(model)  # gathered on every process under FSDP
        with atomic_dir(run_dir / "adapter") as staging:
            model.save_pretrained(str(staging), state_dict=state)  # type: ignore[operator]
        return {"adapter": "adapter"}
    tensors = {
        f"{layer.name}.weight": distributed.full(_weight(model, layer)).detach().to("cpu").contiguous()
        for layer in chosen
    }
    metadata = {"format": "pt", "base_model": cfg.model.name, "base_fingerprint": loaded.fingerprint}
    atomic_write_bytes(run_dir / CHANGED_WEIGHTS, safetensors_bytes(tensors, metadata=metadata))
    atomic_write_text(run_dir / "APPLY.md", _apply_note(cfg.model.name, len(tensors)))
    out = {"changed_weights": CHANGED_WEIGHTS, "apply_note": "APPLY.md"}
    if cfg.finetune.save_model:
        with atomic_dir(run_dir / "model") as staging:
            model.save_pretrained(str(staging))  # type: ignore[operator]
            loaded.tokenizer.save_pretrained(str(staging))
        out["model"] = "model"
    return out


def _weight(model: nn.Module, layer: Layer) -> torch.Tensor:
    weight = getattr(model.get_submodule(layer.name), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise IlaError(f"layer {layer.name} has no weight tensor")
    return weight


def _apply_note(model_name: str, n_tensors: int) -> str:
    return f"""# Applying the fine-tuned weights

`{CHANGED_WEIGHTS}` holds only the {n_tensors} weight matrices that were trained; every other tensor of the
model is unchanged from the base model `{model_name}` (check `base_fingerprint` in the file's metadata).

```python
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{model_name}")
missing, unexpected = model.load_state_dict(load_file("{CHANGED_WEIGHTS}"), strict=False)
assert not unexpected  # every saved tensor found its place
model.save_pretrained("merged-model")  # optional: a complete checkpoint
```
"""
