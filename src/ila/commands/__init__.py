"""The `ila` command line, one module per word: each holds its parser (`add_parser`), its `main(args)` and the
work behind it; `ila.cli` only dispatches. The library (`ila.*` outside this package) never imports a command,
and no command imports another (`experiment` aside: it runs the others as units); tests/test_layout.py checks both.
Modules whose names start with `_` are helpers shared by commands.
"""

from __future__ import annotations

# the order of `ila --help`
COMMANDS = (
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
    "experiment",
)
