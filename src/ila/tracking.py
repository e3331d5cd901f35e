"""`--report-to tensorboard|wandb|trackio`: training curves in the tools users already watch.

Through accelerate's trackers (the libraries' own APIs), off by default. A run opens one session; the training
loop logs each step's loss and learning rate under the stage's name, so Stage 1, Stage 2 and fine-tuning land in
one run of the tracker. Offline-safe: TensorBoard writes event files into the run folder, trackio keeps a local
database, and wandb runs in offline mode (files in the run folder) unless the user configured it otherwise.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ila import distributed
from ila.errors import IlaError

log = logging.getLogger(__name__)

TRACKERS = ("none", "tensorboard", "wandb", "trackio")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}

_active: list[Any] = []  # the open tracker, if any: the training loop logs into it without being handed it


def check_available(kind: str) -> None:
    """Refuse, before a run starts, a tracker whose package is not installed."""
    if kind == "none":
        return
    if kind not in _PACKAGE:
        raise IlaError(f"--report-to {kind} is not supported; choose one of {', '.join(TRACKERS)}")
    package = _PACKAGE[kind]
    if importlib.util.find_spec(package) is None:
        raise IlaError(f"--report-to {kind} needs the {package} package: pip install {package}")


@contextmanager
def session(kind: str, run_dir: Path, config: dict[str, Any]) -> Iterator[None]:
    """Open the tracker for one run (main process only) and close it at the end, whatever happens."""
    if kind == "none" or not distributed.is_main():
        yield
        return
    check_available(kind)
    tracker = _open(kind, run_dir)
    tracker.start()
    tracker.store_init_configuration(_flat(config))
    _active.append(tracker)
    try:
        yield
    finally:
        _active.remove(tracker)
        tracker.finish()


def log_step(stage: str, step: int, values: dict[str, float]) -> None:
    """Log one step's values under the stage's name (e.g. stage_1_lora/loss); a no-op without a session."""
    if not _active:
        return
    prefix = re.sub(r"[^0-9A-Za-z]+", "_", stage).strip("_").lower()
    _active[-1].log({f"{prefix}/{key}": value for key, value in values.items()}, step=step)


def _open(kind: str, run_dir: Path) -> Any:
    from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker

    name = run_dir.name
    if kind == "tensorboard":
        return TensorBoardTracker(name, run_dir / "tensorboard")
    if kind == "wandb":
        if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"  # no account configured: never reach for the network
            log.info("wandb: offline mode (files in %s); `wandb sync` uploads them later", run_dir / "wandb")
        return WandBTracker("ila", name=name, dir=str(run_dir))
    return TrackioTracker("ila", name=name)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys with scalar values: what every tracker accepts as hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = ",".join(map(str, value))
        elif value is None:
            out[f"{prefix}{key}"] = "none"
        else:
            out[f"{prefix}{key}"] = value
    return out
