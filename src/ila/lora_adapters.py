"""The one module that knows PEFT's LoRA internals: attaching adapters, reading the A/B factors and scaling,
measuring each layer's update without materialising it, and scaling each layer's LoRA branch by a mask value.

Everything else in ila goes through these functions, so a PEFT upgrade is a review of this file only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from ila.config import AdaLoraScheduleConfig, LoraShapeConfig
from ila.distributed import full
from ila.errors import reading
from ila.layers import Layer

log = logging.getLogger(__name__)

ADAPTER = "default"
_PEFT_PREFIX = "base_model.model."


def lora_config_for(
    layers: Sequence[Layer],
    settings: LoraShapeConfig,
    fan_in_fan_out: bool = False,
    ranks: dict[str, int] | None = None,
) -> LoraConfig:
    """A LoraConfig that targets exactly these layers by full module name; `ranks` gives layers their own rank."""
    patterns: dict[str, Any] = rank_patterns(ranks, settings)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=[layer.name for layer in layers],
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        rank_pattern=patterns.get("rank_pattern", {}),
        alpha_pattern=patterns.get("alpha_pattern", {}),
    )


def rank_patterns(ranks: dict[str, int] | None, settings: LoraShapeConfig) -> dict[str, dict[str, int | float]]:
    """PEFT's rank_pattern and alpha_pattern for per-layer ranks, keyed by full module name (PEFT matches a key
    as `(.*\\.)?KEY$`, so a full name reaches only that module). Each alpha keeps the scale alpha/r of the uniform
    setting, so a layer's update is scaled alike whatever its rank."""
    if not ranks:
        return {}
    scale = settings.alpha / settings.r
    alphas = {name: (int(r * scale) if float(r * scale).is_integer() else r * scale) for name, r in ranks.items()}
    return {"rank_pattern": dict(ranks), "alpha_pattern": alphas}


def uses_conv1d(model: nn.Module, layers: Sequence[Layer]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(model.get_submodule(layer.name), Conv1D) for layer in layers)


def attach_lora(
    model: PreTrainedModel, layers: Sequence[Layer], settings: LoraShapeConfig, ranks: dict[str, int] | None = None
) -> PeftModel:
    """Wrap `model` with LoRA on exactly `layers` (PEFT's own init: A random, B zero, so the start is θ0), at
    `ranks` where given."""
    config = lora_config_for(layers, settings, fan_in_fan_out=uses_conv1d(model, layers), ranks=ranks)
    with warnings.catch_warnings(), _adapters_off_meta(model):  # PEFT warns about fan_in_fan_out for Conv1D
        warnings.simplefilter("ignore", UserWarning)
        return _no_input_grads(get_peft_model(model, config))  # type: ignore[arg-type]


def _no_input_grads(peft_model: PeftModel) -> PeftModel:
    """Undo PEFT's input-gradient hook. PEFT makes the embeddings' output require grad when the model checkpoints,
    which reentrant checkpointing needs; ila checkpoints non-reentrant, where the hook would only make backward
    recompute and run through every block instead of stopping at the lowest adapted one."""
    unwrap(peft_model).disable_input_require_grads()  # type: ignore[operator]
    return peft_model


@contextmanager
def _adapters_off_meta(model: nn.Module) -> Iterator[None]:
    """Attach adapters with their initial values while the base weights are on the meta device (FSDP's
    RAM-efficient loading). PEFT puts a new adapter on its base layer's device, which on meta would discard the
    values a fully loaded model gets from the same seed; so each meta weight is stood in for by a CPU tensor of
    its shape backed by one element, and put back (with the frozen state PEFT gave its stand-in) afterwards."""
    swapped = [
        (module, name, param, nn.Parameter(torch.empty((), dtype=param.dtype).expand(param.shape)))
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
        if param.is_meta
    ]
    for module, name, _, stand_in in swapped:
        setattr(module, name, stand_in)
    try:
        yield
    finally:
        for module, name, param, stand_in in swapped:
            setattr(module, name, param.requires_grad_(stand_in.requires_grad))


def load_lora(model: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    """Load a saved PEFT adapter onto the base model."""
    with (
        warnings.catch_warnings(),
        reading(adapter_dir, "a PEFT adapter trained on this model"),
        _adapters_off_meta(model),
    ):
        warnings.simplefilter("ignore", UserWarning)
        return _no_input_grads(PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable))


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PeftModel (or the model itself)."""
    if isinstance(model, PeftModel):
        return model.get_base_model()  # type: ignore[no-any-return]
    return model


@dataclass(frozen=True)
class LoraFactors:
    """Views of one layer's LoRA factors: the update is scaling * B @ A."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float


def lora_module(peft_model: nn.Module, layer: Layer) -> Any:
    return unwrap(peft_model).get_submodule(layer.name)


def lora_factors(peft_model: nn.Module, layers: Sequence[Layer]) -> list[LoraFactors]:
    out = []
    for layer in layers:
        module = lora_module(peft_model, layer)
        out.append(
            LoraFactors(module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight, float(module.scaling[ADAPTER]))
        )
    return out


def lora_parameters(peft_model: nn.Module, layers: Sequence[Layer]) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for layer in layers:
        module = lora_module(peft_model, layer)
        params += [module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight]
    return params


def has_lora(peft_model: nn.Module, layer: Layer) -> bool:
    """Whether this layer carries a LoRA adapter (an adapter saved for a selection covers only some layers)."""
    try:
        module = lora_module(peft_model, layer)
    except AttributeError:
        return False
    return ADAPTER in getattr(module, "lora_A", {})


def remove_lora(peft_model: nn.Module) -> nn.Module:
    """Take the LoRA layers out again (without merging) and return the base model, as it was before."""
    if isinstance(peft_model, PeftModel):
        return peft_model.unload()  # type: ignore[no-any-return, operator]
    return peft_model


def snapshot(factors: Sequence[LoraFactors]) -> list[LoraFactors]:
    """Detached float copies, to compare the update at two times."""
    return [
        LoraFactors(full(f.a).detach().float().clone(), full(f.b).detach().float().clone(), f.scaling) for f in factors
    ]


def _lowrank_sq_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """|U V|_F^2 = trace((U^T U)(V V^T)) for U (out, k) and V (k, in): no out x in matrix is formed.

    In float64 and clamped at 0: for a tiny change the trace cancels, and float32 rounding made it negative.
    """
    u, v = u.double(), v.double()
    return max(0.0, float(torch.sum((u.T @ u) * (v @ v.T).T)))


def update_sq_norms(factors: Sequence[LoraFactors]) -> list[float]:
    """|Δθ_i|_F^2 = |s B A|_F^2 for every layer."""
    return [_lowrank_sq_norm(full(f.b).detach().float() * f.scaling, full(f.a).detach().float()) for f in factors]


def change_sq_norms(now: Sequence[LoraFactors], before: Sequence[LoraFactors]) -> list[float]:
    """|Δθ_now − Δθ_before|_F^2 per layer, computed in the rank-2r factor space."""
    out = []
    for f, g in zip(now, before, strict=True):
        u = torch.cat([full(f.b).detach().float() * f.scaling, -full(g.b).float() * g.scaling], dim=1)
        v = torch.cat([full(f.a).detach().float(), full(g.a).float()], dim=0)
        out.append(_lowrank_sq_norm(u, v))
    return out


class LayerMask:
    """Multiplies each layer's LoRA branch by a mask value: the Stage-2 model is θ0 + γ ⊙ Δθ.

    A forward hook on each LoRA-B module scales its output, so PEFT is used unmodified. With `values` None the
    hooks are identity; γ_i = 0 reproduces the base model exactly and γ_i = 1 the Stage-1 model exactly.
    """

    def __init__(self, peft_model: nn.Module, layers: Sequence[Layer]) -> None:
        self.values: torch.Tensor | None = None
        self._handles = []
        for index, layer in enumerate(layers):
            b_module = lora_module(peft_model, layer).lora_B[ADAPTER]
            self._handles.append(b_module.register_forward_hook(self._make_hook(index)))

    def _make_hook(self, index: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if self.values is None:
                return output
            return output * self.values[index].to(output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerMask:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


# ------------------------------------------------------- selective fine-tuning (`ila finetune`) and export checks


def attach_adalora(
    model: PreTrainedModel,
    layers: Sequence[Layer],
    lora: LoraShapeConfig,
    adalora: AdaLoraScheduleConfig,
    total_step: int,
) -> PeftModel:
    """Wrap `model` with AdaLoRA on exactly `layers`; `total_step` is the planned number of optimizer steps."""
    from peft import AdaLoraConfig

    tinit, tfinal = adalora.schedule(total_step)
    config = AdaLoraConfig(
        init_r=adalora.init_r,
        target_r=adalora.target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=adalora.delta_t,
        beta1=adalora.beta1,
        beta2=adalora.beta2,
        orth_reg_weight=adalora.orth_reg_weight,
        total_step=total_step,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=[layer.name for layer in layers],
        fan_in_fan_out=uses_conv1d(model, layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _no_input_grads(get_peft_model(model, config))  # type: ignore[arg-type]


def adalora_update(peft_model: nn.Module, step: int) -> None:
    """AdaLoRA's rank allocation; must run after the optimizer step and before the gradients are cleared."""
    peft_model.base_model.update_and_allocate(step)  # type: ignore[union-attr, operator]


def adalora_orthogonal_penalty(peft_model: nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser, weighted: orth_reg_weight * mean ‖PᵀP − I‖_F over the A and B factors.

    PEFT adds it only when the model computes its own loss from `labels`; ila's `sft_loss` computes the loss
    itself, so the fine-tuning stage adds this term explicitly.
    """
    weight = float(peft_model.peft_config[ADAPTER].orth_reg_weight)  # type: ignore[index, union-attr]
    terms = []
    for name, param in unwrap(peft_model).named_parameters():
        if f".{ADAPTER}" not in name or not ("lora_A" in name or "lora_B" in name):
            continue
        cov = param @ param.T if "lora_A" in name else param.T @ param
        eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
        terms.append(torch.linalg.matrix_norm(cov - eye))
    if not terms or weight == 0:
        return torch.zeros((), device=next(peft_model.parameters()).device)
    return weight * torch.stack(terms).mean()


def prepare_quantized_for_training(model: PreTrainedModel) -> PreTrainedModel:
    """PEFT's preparation of a 4-bit model for QLoRA (everything frozen, norms in fp32). Checkpointing is left to
    `training_loop.enable_gradient_checkpointing`, the one way ila checkpoints."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-any-return]


def adapted_module_names(peft_model: nn.Module) -> list[str]:
    """Full names (without PEFT's prefix) of the modules that carry an adapter."""
    names = getattr(getattr(peft_model, "base_model", None), "targeted_module_names", None)
    if names is None:
        raise TypeError(f"{type(peft_model).__name__} is not a PEFT model")
    return list(names)


def lora_targets(model: nn.Module, target_modules: list[str] | str, fan_in_fan_out: bool = False) -> list[str]:
    """Module names on which PEFT would put LoRA for this `target_modules` value (a list or one regex).

    Injects adapters into `model`, so pass a throwaway copy (e.g. built on the meta device). Returns [] when PEFT
    finds no module to adapt.
    """
    config = LoraConfig(
        r=1, target_modules=target_modules, fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, config)  # type: ignore[arg-type]
    except ValueError as err:
        if "not found in the base model" in str(err) or "No modules were targeted" in str(err):
            return []
        raise
    return adapted_module_names(peft_model)


def applied_ranks(model: nn.Module, lora_kwargs: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """(rank, scaling) of every module PEFT adapts under LoraConfig(**lora_kwargs), rank_pattern and alpha_pattern
    included. Injects adapters into `model`, so pass a throwaway copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))  # type: ignore[arg-type]
    out = {}
    for name, module in peft_model.get_base_model().named_modules():
        ranks = getattr(module, "r", None)
        if isinstance(ranks, dict) and "default" in ranks:
            out[name] = (int(ranks["default"]), float(module.scaling["default"]))
    return out
