"""FSDP under `accelerate launch --config_file configs/fsdp.yaml`: shard the model across processes.

Accelerate's launcher sets up the processes and passes the FSDP settings of its config in the environment
(ACCELERATE_USE_FSDP, FSDP_*). ila then shards with PyTorch's FSDP2 (`fully_shard`, one group per transformer
block plus the root) rather than through `Accelerator.prepare`: FSDP2 shards each parameter on its own, so frozen
base weights and trainable LoRA factors share a block without `use_orig_params`, and it also runs on CPU (gloo),
where the multi-process test checks it. FSDP averages gradients over processes; the training loop already
weights each process's loss by its share of the global batch's target tokens, so it multiplies the averaged
sharded gradients by the number of processes (`sum_sharded_gradients`) to get the global batch's gradient.

Everything that reads a sharded tensor (the stability check, checkpoints, adapter saving) goes through `full`,
a collective: every process calls it in the same order, which holds because all processes run the same steps.
DeepSpeed is refused with a clear message; FSDP is the supported sharding.

With the config's `fsdp_cpu_ram_efficient_loading: true` no process ever holds the whole model: every process
builds it on the meta device (`defer`), adapters are attached there, and `shard` allocates only this process's
shards and fills each from its own rows of the safetensors files (memory-mapped: only those rows are read). No
collective is needed and a process's peak is its shards plus one tensor's rows in flight.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ila import distributed
from ila.distributed import env_flag, fsdp_enabled, full, is_sharded
from ila.errors import IlaError
from ila.layers import find_block_list
from ila.lora_adapters import unwrap

log = logging.getLogger(__name__)


# models built on the meta device whose weights `shard` fills, with the folder of their safetensors files
_DEFERRED: weakref.WeakKeyDictionary[nn.Module, Path] = weakref.WeakKeyDictionary()


def defer(model: nn.Module, weights: Path) -> None:
    """Mark a meta-device model: `shard` fills its shards from the safetensors files in `weights`."""
    if not any(weights.glob("*.safetensors")):
        raise IlaError(
            f"fsdp_cpu_ram_efficient_loading needs the weights as safetensors files; {weights} has none "
            "(convert the checkpoint, or set fsdp_cpu_ram_efficient_loading: false)"
        )
    _DEFERRED[model] = weights


def is_deferred(model: nn.Module) -> bool:
    """True while a model built by `defer` has no weights yet (until `shard`)."""
    return unwrap(model) in _DEFERRED


def _mixed_precision() -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mode = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mode == "no":
        return MixedPrecisionPolicy()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if mode not in dtypes:
        raise IlaError(f"mixed_precision={mode} is not supported with FSDP; use no, bf16 or fp16")
    # fp32 master weights, low-precision compute, fp32 gradient reduction: the standard FSDP2 recipe
    return MixedPrecisionPolicy(param_dtype=dtypes[mode], reduce_dtype=torch.float32)


def check_dtype(model: nn.Module) -> None:
    """FSDP2 needs one dtype per group; LoRA factors are fp32, so the base weights must be fp32 too."""
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise IlaError(
            f"under FSDP the model must be loaded in float32 (found {names}); set model.dtype=float32 and "
            "mixed_precision: bf16 in the accelerate config for bf16 compute"
        )


def shard(model: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
    """Apply FSDP2 to every block, then to the root (embeddings, final norm, head); returns `model` itself."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    check_dtype(model)
    weights = _DEFERRED.pop(unwrap(model), None)
    present: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if weights is not None:  # keep what exists before sharding (adapter factors, identical on every process from
        # the same seed, and the buffers such as rotary tables): to_empty in _fill allocates every shard afresh
        present = {name: p.detach().clone() for name, p in model.named_parameters() if not p.is_meta}
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    options: dict[str, Any] = {
        "mp_policy": _mixed_precision(),
        "reshard_after_forward": env_flag("FSDP_RESHARD_AFTER_FORWARD", default=True),
        "offload_policy": CPUOffloadPolicy() if env_flag("FSDP_OFFLOAD_PARAMS") else OffloadPolicy(),
    }
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    log.info("FSDP: %d blocks sharded across %d processes", len(blocks), distributed.world_size())
    if weights is not None:
        _fill(model, weights, present, buffers)
    return model


def _fill(model: nn.Module, weights: Path, present: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> None:
    """Allocate this process's shards and fill them: checkpoint tensors from `weights`, the rest from `present`."""
    device = distributed.local_device() or torch.device("cpu")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    where = _checkpoint_index(weights)
    reader = _OneFileAtATime()
    with torch.no_grad():
        for name, param in _progress(list(model.named_parameters()), "load shards"):
            if name in present:
                copy_full_into(param, present[name])
                continue
            key = _checkpoint_key(name, where)
            local = param.to_local() if is_sharded(param) else param  # type: ignore[attr-defined]
            rows = _own_rows(param)
            local.copy_(reader.rows(where[key], key, rows))
    reader.close()
    log.info("FSDP: filled this process's shards from %s", weights)


def _own_rows(param: torch.Tensor) -> slice:
    """The rows of a parameter this process holds: FSDP2 shards dim 0 as torch.chunk does (ceil(n / N) rows per
    process, the last ones shorter or empty)."""
    n = param.shape[0]
    if not is_sharded(param):
        return slice(0, n)
    from torch.distributed.tensor import Shard

    placements = param.placements  # type: ignore[attr-defined]
    if len(placements) != 1 or placements[0] != Shard(0):
        raise IlaError(f"sharded loading expects FSDP's dim-0 sharding, found {placements}")
    world = param.device_mesh.size()  # type: ignore[attr-defined]
    per = -(-n // world)
    start = min(n, param.device_mesh.get_local_rank() * per)  # type: ignore[attr-defined]
    rows = slice(start, min(n, start + per))
    held = param.to_local().shape[0]  # type: ignore[attr-defined]
    if held != rows.stop - rows.start:
        raise IlaError(f"sharded loading: this process holds {held} rows of a {n}-row tensor, expected {rows}")
    return rows


class _OneFileAtATime:
    """Reads rows of tensors with one safetensors file mapped at a time; only the pages of those rows are read."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.handle: Any = None

    def rows(self, path: Path, key: str, rows: slice) -> torch.Tensor:
        from safetensors import safe_open

        if path != self.path:
            self.close()
            self.handle, self.path = safe_open(str(path), framework="pt", device="cpu"), path
        return self.handle.get_slice(key)[rows]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.handle, self.path = None, None  # dropping the handle unmaps the file


def _checkpoint_index(weights: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (headers only)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in sorted(weights.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            where.update(dict.fromkeys(handle.keys(), path))
    return where


def _checkpoint_key(name: str, where: dict[str, Path]) -> str:
    """The checkpoint's name for a model parameter (PEFT's wrapper prefixes removed)."""
    plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    for key in (plain, plain.split(".", 1)[-1]):  # also a checkpoint saved from the bare backbone
        if key in where:
            return key
    raise IlaError(
        f"fsdp_cpu_ram_efficient_loading: the checkpoint has no tensor for {plain}; ila fills shards only from "
        "checkpoints whose tensor names match the model's parameters (set fsdp_cpu_ram_efficient_loading: false)"
    )


def _progress(items: list[Any], what: str) -> Iterator[Any]:
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=what, unit="tensor", leave=False, disable=None if distributed.is_main() else True)


def shard_if_enabled(model: nn.Module) -> nn.Module:
    """Shard `model` (a PEFT model or a plain transformers model) by its transformer blocks under FSDP."""
    if not fsdp_enabled():
        return model
    _, blocks = find_block_list(unwrap(model))
    return shard(model, list(blocks))


def sum_sharded_gradients(params: Sequence[torch.Tensor]) -> None:
    """FSDP's reduce-scatter averaged these gradients; make them sums like the replicated ones.

    (FSDP2's own divide factor of 1 would do this inside the reduction, but gloo has no PREMUL_SUM.)
    """
    world = distributed.world_size()
    for param in params:
        if param.grad is not None:
            param.grad.mul_(world)


def copy_full_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Load a whole saved tensor into a (possibly sharded) parameter."""
    with torch.no_grad():
        if is_sharded(param):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(
                value.to(device=param.device, dtype=param.dtype),
                param.device_mesh,  # type: ignore[attr-defined]
                param.placements,  # type: ignore[attr-defined]
            )
        param.copy_(value)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with whole tensors (gathered under FSDP), ready to save from the main process."""
    if not fsdp_enabled():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not fsdp_enabled():
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Whole LoRA tensors for `save_pretrained(state_dict=...)` under FSDP; None otherwise (PEFT reads them)."""
    if not fsdp_enabled():
        return None
    return {name: full(value).detach().cpu() for name, value in model.state_dict().items() if "lora_" in name}
