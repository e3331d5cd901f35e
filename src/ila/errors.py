"""ila's error type: every problem a user can fix is raised as an `IlaError`.

The CLI prints its message as one line and exits with status 2; library callers can catch it.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_USER_ERROR = 2  # every IlaError, usage error and refused input
EXIT_NO_INFORMATION = 3  # the run finished, but its ranking carries no information (every score equal)


class IlaError(Exception):
    """A user-facing error: the message says what was wrong, where, and what is allowed."""


class NonFiniteLossError(IlaError):
    """Training produced a NaN or infinite loss; the message names the stage and step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Whatever library fails to read or parse `path`, the user gets one line naming the file and what it should
    have been. Out-of-memory errors pass through: they are no fault of the file."""
    try:
        yield
    except IlaError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, pickle.UnpicklingError) as err:
        raise IlaError(f"{path}: cannot read it as {what} ({_reason(err)})") from None
    except Exception as err:  # safetensors' SafetensorError, torch's reader errors, gguf's parser
        if "out of memory" in str(err) or type(err).__name__ not in _READER_ERRORS:
            raise
        raise IlaError(f"{path}: cannot read it as {what} ({_reason(err)})") from None


_READER_ERRORS = {"SafetensorError", "RuntimeError", "HeaderTooLarge", "UnpicklingError", "HFValidationError"}


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def first_line(err: BaseException) -> str:
    """The first line of an error's message (a library's multi-line error shortened to one line)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
