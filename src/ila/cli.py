"""The `ila` command line: parse the word, dispatch to `ila.commands.<word>.main`, turn errors into one line.

Every user error ends as one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Collection, Sequence

from ila.commands import COMMANDS
from ila.commands._shared import Parser
from ila.errors import EXIT_NO_INFORMATION, EXIT_USER_ERROR, IlaError
from ila.versions import package_version

__all__ = ["EXIT_NO_INFORMATION", "EXIT_USER_ERROR", "build_parser", "main"]

# Dependency warnings known to be noise for ila's users, matched by message (each seen in ila's own runs):
# they describe a library's internal calls that an ila user can do nothing about.
KNOWN_NOISE = (
    r"`is_gradient_checkpointing` is deprecated",  # PEFT asks transformers by the old name
)


def build_parser(load: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `load`, only those words' command modules are imported (the others keep their help
    line only), so that `ila --help` and one command do not import every command's dependencies."""
    parser = Parser(
        prog="ila", description="Find the layers of an LLM that matter for alignment (ILA), then fine-tune only those."
    )
    parser.add_argument("--version", action="version", version=f"ila {package_version('ila')}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for word, line in COMMANDS.items():
        if load is None or word in load:
            importlib.import_module(f"ila.commands.{word}").add_parser(sub)
        else:
            sub.add_parser(word, help=line)
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    """The command word of an ila command line: its first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _configure_logging(quiet: bool) -> None:
    from ila import distributed

    # under `accelerate launch` only the main process logs progress; the others report warnings and errors
    main_process = distributed.is_main()
    level = logging.WARNING if quiet or not main_process else logging.INFO
    prefix = "" if main_process else f"[rank {distributed.rank()}] "
    logging.basicConfig(level=level, format=f"{prefix}%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # its weight-loading bars, which also turns off the hub's ...
    if not quiet:  # ... download bars: a multi-GB model must not download in silence
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    word = _command_word(argv)
    parser = build_parser(load={word} if word in COMMANDS else set())
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    _configure_logging(args.quiet)
    from ila import distributed

    error_prefix = "" if distributed.is_main() else f"[rank {distributed.rank()}] "
    try:
        distributed.check_launch()
        return int(args.handler(args))
    except IlaError as err:
        sys.stderr.write(f"{error_prefix}ila: error: {err}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("ila: interrupted\n")
        return 130
    except BrokenPipeError:  # `ila ... | head` closed the pipe: not an error worth a traceback
        sys.stderr.close()
        return 0
    except OSError as err:  # a file ila writes or reads: full or read-only disk, permissions
        if err.filename is None:
            raise
        sys.stderr.write(f"{error_prefix}ila: error: {err.filename}: {err.strerror or err}\n")
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _is_out_of_memory(err):
            raise
        where = "GPU" if "CUDA" in str(err) else "CPU"
        sys.stderr.write(
            f"{error_prefix}ila: error: out of {where} memory; lower the batch size (stage1.batch_size, "
            "stage2.batch_size, finetune.batch_size) or data.max_length, or set run.gradient_checkpointing=true"
            + (" (bf16 weights, the default on CUDA, also halve the memory)" if where == "GPU" else "")
            + "; checkpoints saved so far are intact (ila identify --resume RUN continues)\n"
        )
        return EXIT_USER_ERROR


def _is_out_of_memory(err: RuntimeError) -> bool:
    text = str(err)
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
