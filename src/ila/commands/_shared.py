"""What several commands' parsers share: the run flags, the flag-to-config tables and `--print-config`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ila.errors import EXIT_USER_ERROR


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit status 2 like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"ila: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USER_ERROR)


Subparsers = argparse._SubParsersAction  # what `add_parser(sub)` of each command receives


def add_run_flags(parser: argparse.ArgumentParser, report_to: bool = False) -> None:
    """Flags of every command that loads a model from a config: remote code (only from this command line) and,
    for those that train, where the training curves go."""
    if report_to:
        parser.add_argument(
            "--report-to",
            choices=["none", "tensorboard", "wandb", "trackio"],
            help="training curves to TensorBoard (event files in the run folder), wandb (offline unless configured) "
            "or trackio (run.report_to; default none)",
        )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own code (never taken from a config file or run folder)",
    )


def add_config_flags(parser: argparse.ArgumentParser, sections: str) -> None:
    """--config, --print-config and the trailing section.key=value overrides of a config-driven command."""
    parser.add_argument("--config", help=f"YAML file with sections {sections}")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


# flag -> (config section, key) of the flags every config-driven command shares
COMMON_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "name"),
    ("data", "data", "path"),
    ("output", "run", "output"),
    ("seed", "run", "seed"),
)


def config_values(args: argparse.Namespace, table: Sequence[tuple[str, str, str]]) -> dict[str, dict[str, object]]:
    """The config values the given flags set: {section: {key: value}} for every flag in `table` that was given,
    plus what `add_run_flags`' flags set."""
    extra: dict[str, dict[str, object]] = {}
    for flag, section, key in table:
        if getattr(args, flag, None) is not None:
            extra.setdefault(section, {})[key] = getattr(args, flag)
    if getattr(args, "trust_remote_code", False):
        extra.setdefault("model", {})["trust_remote_code"] = True
    if getattr(args, "report_to", None):
        extra.setdefault("run", {})["report_to"] = args.report_to
    return extra


def print_config(cfg: object) -> int:
    """`--print-config`: the resolved config as YAML on stdout."""
    import yaml

    from ila.config import config_to_dict

    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def plus_minus(value: float | None, stderr: float | None, digits: int) -> str:
    """`value ± stderr` at `digits` decimals; "-" when there is no value."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + ("" if stderr is None else f" ± {stderr:.{digits}f}")
