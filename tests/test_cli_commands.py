"""Every subcommand answers --help, `ila env` reports versions, and an empty command line shows the usage."""

from __future__ import annotations

import pytest

from ila.cli import build_parser, main

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def test_every_expected_command_exists() -> None:
    assert {
        "identify",
        "layers",
        "select",
        "finetune",
        "export",
        "rank",
        "compare",
        "evaluate",
        "report",
        "env",
    } <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: ila {command}" in capsys.readouterr().out


def test_env_reports_versions(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch: {torch.__version__}" in out and "ila_cache:" in out


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: ila" in capsys.readouterr().out
