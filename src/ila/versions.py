"""Installed package versions, for run manifests and `ila --version` (imports nothing heavy)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def package_version(name: str) -> str:
    """An installed distribution's version, or "not installed"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def package_versions() -> dict[str, str]:
    names = ["ila", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors"]
    return {"python": sys.version.split()[0], "platform": platform.platform()} | {n: package_version(n) for n in names}
