"""ila's error type: every problem a user can fix is raised as an `IlaError`.

The CLI prints its message as one line and exits with status 2; library callers can catch it.
"""

from __future__ import annotations


class IlaError(Exception):
    """A user-facing error: the message says what was wrong, where, and what is allowed."""


class NonFiniteLossError(IlaError):
    """Training produced a NaN or infinite loss; the message names the stage and step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
