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
    AmbiguousNodeError,
    CheckpointNotFoundError,
    CorruptionError,
    InvalidKeyError,
    InvalidValueError,
    NodeNotFoundError,
    RemoteAuthError,
    RemoteUnavailableError,
    RunNotFoundError,
    StoreLockedError,
    StoreNotFoundError,
    SyncConfigError,
    ValueTooLargeError,
    WalsyncError,
)

__all__ = ["MEANING", "Exit", "code_of", "fail", "interrupted", "markdown_table", "report"]


class Exit(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    DAMAGE = 3
    LOCKED = 4
    NOT_FOUND = 5
    SERVER = 6
    BEHIND = 7
    LAGGING = 8
    #: 128 + SIGINT, what a shell reports for a command Ctrl-C ended
    INTERRUPTED = 130


#: what each code tells a script (README's table, word for word)
MEANING: dict[Exit, str] = {
    Exit.OK: "success",
    Exit.ERROR: "an error (the message and a hint are on stderr)",
    Exit.USAGE: "usage error, or input the store refuses (a value that is not strict JSON, "
                "a key or value outside what the store takes)",
    Exit.DAMAGE: "damage found (`verify`), open refused for damage, or a damaged export file",
    Exit.LOCKED: "the store is locked by another process",
    Exit.NOT_FOUND: "not found: no store at the path, no such key, run, checkpoint, node or "
                    "export file",
    Exit.SERVER: "the sync server is not configured, cannot be reached, refuses the login, or "
                 "its database does not exist",
    Exit.BEHIND: "`status`: the server holds less of the store than it acknowledged, or is "
                 "another server than the one that acknowledged it",
    Exit.LAGGING: "`status --max-lag`: the oldest write the server lacks is older than the "
                  "limit",
    Exit.INTERRUPTED: "interrupted (Ctrl-C, SIGINT); what was committed stays committed",
}


def code_of(exc: WalsyncError) -> Exit:
    """The code a command ends with when the library raises ``exc``."""
    if isinstance(exc, CorruptionError):
        return Exit.DAMAGE
    if isinstance(exc, StoreLockedError):
        return Exit.LOCKED
    if isinstance(exc, StoreNotFoundError | RunNotFoundError | CheckpointNotFoundError
                  | NodeNotFoundError):
        return Exit.NOT_FOUND
    if isinstance(exc, RemoteUnavailableError | RemoteAuthError | SyncConfigError):
        return Exit.SERVER
    if isinstance(exc, InvalidKeyError | InvalidValueError | ValueTooLargeError
                  | AmbiguousNodeError):
        return Exit.USAGE  # the input, not the store
    return Exit.ERROR


def fail(message: str, hint: str, code: Exit) -> NoReturn:
    """End the command: ``error:`` and ``hint:`` lines on stderr, then ``code``."""
    click.echo(f"error: {message}", err=True)
    click.echo(f"hint: {hint}", err=True)
    sys.exit(int(code))


def report(exc: WalsyncError) -> NoReturn:
    """End the command on a library error: its message, its hint (in the command
    line's terms where the library's names a setting), its code."""
    click.echo(f"error: {exc}", err=True)
    hint = _CLI_HINTS.get(type(exc), exc.hint)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    sys.exit(int(code_of(exc)))


#: hints that name the command line's options rather than the library's settings
_CLI_HINTS: dict[type[WalsyncError], str] = {
    StoreLockedError: "one writer process per store: stop the other writer, or pass "
                      "--lock-timeout SECONDS to wait for it (reads never wait: get, scan, "
                      "verify open the store read-only beside a writer)",
}


def interrupted() -> NoReturn:
    """End the command on Ctrl-C (SIGINT): one line, no traceback, exit 130."""
    click.echo("interrupted", err=True)
    sys.exit(int(Exit.INTERRUPTED))


def markdown_table() -> str:
    """The table as README shows it."""
    rows = ["| Code | Meaning |", "|------|---------|"]
    rows += [f"| {code.value} | {MEANING[code]} |" for code in Exit]
    return "\n".join(rows)
