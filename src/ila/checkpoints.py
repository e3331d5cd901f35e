"""Training checkpoints for resumable stages: one file per stage, written atomically, read with weights_only.

A checkpoint holds what a stage needs to continue bit-for-bit: its trainable tensors, optimizer and scheduler
state, the torch RNG state, the step reached (the data stream is fast-forwarded to it), and its bookkeeping.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ila import distributed
from ila.errors import IlaError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, fsync, rename: a crash or a full disk never leaves a corrupt checkpoint."""
    if not distributed.is_main():  # every process holds the same state; the main process saves it
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise IlaError(f"could not write checkpoint {path} ({reason}); the previous checkpoint is intact") from None


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none; only tensors and plain containers are unpickled."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise IlaError(
            f"checkpoint {path} cannot be read ({type(err).__name__}); delete it to restart the stage"
        ) from None
    if not isinstance(state, dict):
        raise IlaError(f"checkpoint {path} is not an ila checkpoint")
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
