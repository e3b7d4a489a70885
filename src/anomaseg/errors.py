"""The one exception type users see: a problem with their input, named with the file it concerns."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input (file, folder, configuration). The CLI prints it as one line and exits non-zero.

    `path` is the file or folder at fault; the message says what is wrong with it.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class InputWarning(UserWarning):
    """Input that works but may not mean what the user thinks (e.g. a brain mask derived from the
    images). The CLI prints it as one line, once per message."""


class Stopped(Exception):
    """A command stopped on a signal (a scheduler's SIGTERM or time-limit SIGUSR1) after saving what
    it needs to continue. The CLI prints the message and exits with 128 + the signal's number, the
    status of a process ended by that signal (143 for SIGTERM, 138 for SIGUSR1)."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def one_line(message: str | BaseException) -> str:
    """A message (or an exception's) on one line: what the CLI prints; an empty exception message
    gives the exception's type name."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        return message.__class__.__name__
    return text
