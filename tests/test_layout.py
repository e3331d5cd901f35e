"""The package layout holds: the library never imports a command, and no command imports another (experiment
aside: it runs identify, rank and finetune as its units). Read from the source, so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import ila
from ila.commands import COMMANDS

PACKAGE = Path(ila.__file__).parent
RUNS_OTHER_COMMANDS = {"experiment"}


def imported_modules(path: Path) -> set[str]:
    """Every ila module `path` imports, at the top or inside a function (`from ila import x` counts as ila.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "ila" or name.startswith("ila.")}


def module_name(path: Path) -> str:
    return ".".join(("ila", *path.relative_to(PACKAGE).with_suffix("").parts))


def test_every_cli_word_has_its_command_module() -> None:
    assert sorted(COMMANDS) == sorted(p.stem for p in (PACKAGE / "commands").glob("[!_]*.py"))


def test_the_library_never_imports_a_command() -> None:
    library = [p for p in PACKAGE.glob("*.py") if p.name not in ("cli.py", "__main__.py")]
    assert len(library) > 10
    offenders = {
        module_name(p): sorted(m for m in imported_modules(p) if m.startswith("ila.commands")) for p in library
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_command_imports_another() -> None:
    commands = {f"ila.commands.{word}" for word in COMMANDS}
    offenders = {}
    for word in COMMANDS:
        if word in RUNS_OTHER_COMMANDS:
            continue
        path = PACKAGE / "commands" / f"{word}.py"
        others = sorted(imported_modules(path) & (commands - {f"ila.commands.{word}"}))
        if others:
            offenders[word] = others
    assert offenders == {}


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    # the rule must fail on an import hidden in a function, the way the layout was broken before
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ila.commands.identify import main\n    from ila import fsdp\n")
    assert imported_modules(source) >= {"ila.commands.identify", "ila.commands.identify.main", "ila.fsdp"}
