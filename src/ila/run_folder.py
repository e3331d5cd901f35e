"""Run folders: atomic writes (a half-written artifact never exists), timings, peak memory and hardware facts
(the manifest beside every artifact is ila.manifest).

Every file is written to a temporary name in the same folder and renamed into place; folders (adapters) are
written to a staging folder and renamed. A run folder is never reused unless the caller allows it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ila import distributed
from ila.errors import IlaError


@dataclass
class Timings:
    """Wall-clock seconds per phase of a run, for its manifest ("where the time went")."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def atomic_write_bytes(path: Path, data: bytes) -> None:
    if not distributed.is_main():  # under a multi-process launch only the main process writes
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise IlaError(f"could not write {path}: {err.strerror or err}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `target` in one rename."""
    if not distributed.is_main():  # other processes write into a scratch folder that is thrown away
        with tempfile.TemporaryDirectory(prefix="ila-scratch-") as scratch:
            yield Path(scratch)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    try:
        yield staging
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise IlaError(f"could not write {target}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def prepare_run_dir(output: str | None, kind: str, overwrite: bool) -> Path:
    """The run folder: new, or emptied only with `overwrite`; made by the main process, named for all."""
    outcome: tuple[str | None, str | None] = (None, None)
    if distributed.is_main():
        try:
            outcome = (str(_make_run_dir(output, kind, overwrite)), None)
        except IlaError as err:
            outcome = (None, str(err))
    path, error = distributed.broadcast_object(outcome)
    if error:
        raise IlaError(error)
    return Path(path)


def _make_run_dir(output: str | None, kind: str, overwrite: bool) -> Path:
    path = Path(output) if output else Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise IlaError(f"--output {path} is a file, not a folder; choose another --output (ila never deletes it)")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise IlaError(
                f"run folder {path} already exists and is not empty; choose another --output or pass --overwrite"
            )
        if not (path / "manifest.json").is_file() and not (path / "config.yaml").is_file():
            raise IlaError(
                f"--overwrite: {path} holds no ila run (no manifest.json or config.yaml); ila only replaces "
                "folders it wrote, so choose another --output"
            )
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".ila-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise IlaError(f"cannot write the run folder {path}: {err.strerror or err}") from None
    return path


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA memory when a GPU was used), in GB.

    Linux's VmHWM is this process's own high-water mark; ru_maxrss, the fallback elsewhere, is inherited across
    fork, so a small child of a large parent would report the parent's peak.
    """
    out = {"peak_rss_gb": _high_water_kib() / 1024**2}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def reset_peak_memory() -> None:
    """Start a new high-water mark, so one process running many units (ila experiment) reports each unit's peak.

    Writing 5 to clear_refs resets VmHWM to the current resident size (Linux >= 4.0); elsewhere the process-wide
    peak is what is reported.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def resident_gb() -> float | None:
    """This process's resident memory now (Linux's VmRSS), in GB; None where /proc is not available."""
    kib = _status_kib("VmRSS:")
    return None if kib is None else kib / 1024**2


def _high_water_kib() -> float:
    kib = _status_kib("VmHWM:")
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) if kib is None else kib  # KiB on Linux


def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processes": distributed.world_size(),
        "parallelism": "fsdp" if distributed.fsdp_enabled() else "data parallel" if distributed.launched() else "none",
    }
    if distributed.fsdp_enabled():  # each process filled its own shards from disk, or loaded the whole model first
        info["fsdp_loading"] = "shards from disk" if distributed.ram_efficient_loading() else "whole model per process"
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info
