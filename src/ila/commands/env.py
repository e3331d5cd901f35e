"""`ila env`: versions, threads, accelerator and cache folder, for bug reports."""

from __future__ import annotations

import argparse

from ila.commands import COMMANDS
from ila.commands._shared import Subparsers


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser("env", help=COMMANDS["env"])
    parser.set_defaults(handler=main)


def main(_args: argparse.Namespace) -> int:
    import torch

    from ila.model_loading import cache_root
    from ila.run_folder import hardware
    from ila.versions import package_versions

    for key, value in {
        **package_versions(),
        **hardware(),
        "cuda_available": torch.cuda.is_available(),
        "ila_cache": str(cache_root()),
    }.items():
        print(f"{key}: {value}")
    return 0
