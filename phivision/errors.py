"""Mistakes a user can fix (a flag, a path, the data): one line on stderr naming what is wrong, no traceback."""

from __future__ import annotations

import sys

from .distributed import is_main_process


def first_line(error: BaseException) -> str:
    """An exception's first line (its type's name when it says nothing): libraries' messages run long."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class SetupError(Exception):
    """A mistake in what the user gave; `exit_status` 2 for flags, 1 for data, models and files."""

    exit_status = 1


def report_setup_errors() -> None:
    """Makes an uncaught SetupError end the program with its one-line message (printed once under torchrun).

    Every process meets the same setup mistake (the same flags and data), so the main one speaks for all.
    """
    default = sys.excepthook

    def hook(kind, error, traceback):
        if not issubclass(kind, SetupError):
            return default(kind, error, traceback)
        if is_main_process():
            print(f"error: {error}", file=sys.stderr, flush=True)

    sys.excepthook = hook
