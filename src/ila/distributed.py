"""Data parallelism under `accelerate launch`: ranks, batch sharding, gradient averaging, main-only writes.

Each process takes its rows of the same global batch; after backward the trainable gradients are all-reduced
and weighted by each rank's share of the batch's target tokens, so N processes take exactly the step one process
would take on the global batch (up to float summation order). Only the main process writes artifacts.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.distributed as dist

from ila.errors import IlaError


@functools.cache
def _state() -> Any:
    from accelerate import PartialState  # deferred: single-process runs never start a process group

    return PartialState(cpu=not torch.cuda.is_available())


def launched() -> bool:
    """True under a multi-process launcher (accelerate launch / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return int(_state().num_processes) if launched() else 1


def rank() -> int:
    return int(_state().process_index) if launched() else 0


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device | None:
    """The device of this process under a launcher (its own GPU), or None to let the caller choose."""
    return torch.device(_state().device) if launched() else None


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """The main process's value on every process (e.g. a run-folder name made from the clock)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(value: float) -> float:
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def _reduce_device() -> torch.device:
    return torch.device(_state().device) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard_rows(n_rows: int) -> slice:
    """This process's rows of a global batch of `n_rows` rows."""
    world = world_size()
    if n_rows % world:
        raise IlaError(f"the batch size ({n_rows}) must be divisible by the number of processes ({world})")
    per = n_rows // world
    return slice(rank() * per, (rank() + 1) * per)


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of `params` in one flat buffer; missing gradients count as zeros."""
    if world_size() == 1 or not params:  # no replicated parameters (all sharded by FSDP): nothing to reduce
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        n = grad.numel()
        param.grad = flat[offset : offset + n].view_as(grad).clone()
        offset += n


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (an all-gather for a sharded one)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined, no-any-return]


# ------------------------------------------------------------------ the launcher's FSDP settings

_TRUE = {"1", "true", "yes"}


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in _TRUE


def check_launch() -> None:
    """Refuse launcher settings ila cannot honour, before anything is loaded or written."""
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise IlaError(
            "DeepSpeed launches are not supported by ila; shard with FSDP instead "
            "(accelerate launch --config_file configs/fsdp.yaml -m ila ...) or use configs/ddp.yaml"
        )


def fsdp_enabled() -> bool:
    """True under an FSDP launch with more than one process."""
    return env_flag("ACCELERATE_USE_FSDP") and world_size() > 1


def ram_efficient_loading() -> bool:
    """The FSDP config's fsdp_cpu_ram_efficient_loading: build on the meta device, fill the shards from disk."""
    return fsdp_enabled() and env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING")


def activation_checkpointing() -> bool:
    """The FSDP config's fsdp_activation_checkpointing (ila applies it as run.gradient_checkpointing)."""
    return fsdp_enabled() and env_flag("FSDP_ACTIVATION_CHECKPOINTING")
