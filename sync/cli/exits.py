"""The exit codes of `walsync`, each with its meaning: the one table every command follows.

Scripts branch on these codes, so a code keeps its meaning within a major version.
README's table is this one (a test compares them), and the error a command ends
on is mapped to its code here alone (``code_of``), so no command picks a number
of its own.
"""

from __future__ import annotations

import sys
from enum import IntEnum
from typing import NoReturn

import click

from walsync.engine.errors import (
    CorruptionError,
    InvalidKeyError,
    InvalidValueError,
    StoreLockedError,
    StoreNotFoundError,
    ValueTooLargeError,
    WalsyncError,
)

__all__ = ["MEANING", "Exit", "code_of", "fail", "markdown_table", "report"]


class Exit(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    DAMAGE = 3
    LOCKED = 4
    NOT_FOUND = 5


#: what each code tells a script (README's table, word for word)
MEANING: dict[Exit, str] = {
    Exit.OK: "success",
    Exit.ERROR: "an error (the message and a hint are on stderr)",
    Exit.USAGE: "usage error, or input the store refuses (a value that is not strict JSON, "
                "a key or value outside what the store takes)",
    Exit.DAMAGE: "damage found (`verify`), open refused for damage, or a damaged export file",
    Exit.LOCKED: "the store is locked by another process",
    Exit.NOT_FOUND: "not found: no store at the path, no such key, run or export file",
}


def code_of(exc: WalsyncError) -> Exit:
    """The code a command ends with when the library raises ``exc``."""
    if isinstance(exc, CorruptionError):
        return Exit.DAMAGE
    if isinstance(exc, StoreLockedError):
        return Exit.LOCKED
    if isinstance(exc, StoreNotFoundError):
        return Exit.NOT_FOUND
    if isinstance(exc, InvalidKeyError | InvalidValueError | ValueTooLargeError):
        return Exit.USAGE  # the input, not the store
    return Exit.ERROR


def fail(message: str, hint: str, code: Exit) -> NoReturn:
    """End the command: ``error:`` and ``hint:`` lines on stderr, then ``code``."""
    click.echo(f"error: {message}", err=True)
    click.echo(f"hint: {hint}", err=True)
    sys.exit(int(code))


def report(exc: WalsyncError) -> NoReturn:
    """End the command on a library error: its message, its hint, its code."""
    click.echo(f"error: {exc}", err=True)
    if exc.hint:
        click.echo(f"hint: {exc.hint}", err=True)
    sys.exit(int(code_of(exc)))


def markdown_table() -> str:
    """The table as README shows it."""
    rows = ["| Code | Meaning |", "|------|---------|"]
    rows += [f"| {code.value} | {MEANING[code]} |" for code in Exit]
    return "\n".join(rows)
