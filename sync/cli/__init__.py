"""The `walsync` command: a thin consumer of the library.

Each command opens what it needs, makes one library call and hands the result
to the one output formatter (``output.py``): for people by default, as JSON
with ``--json`` (a stable contract: fields are added, never renamed or removed
within a major version). A library error ends any command the same way: its
message and hint on stderr and the exit code ``exits.py`` gives it, the one
table of exit codes.

Commands by topic: ``store_cmds`` (the local store), ``runs_cmds`` (workflow
runs and checkpoints), ``sync_cmds`` (the server and replication), ``nodes_cmds``
(the nodes the server knows), ``ui_cmd``
(the dashboard) and ``demo`` (the README's main job).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from walsync.engine import WalsyncError

from . import demo, nodes_cmds, runs_cmds, scope_cmds, store_cmds, sync_cmds, ui_cmd
from .exits import Exit, interrupted, report

__all__ = ["main"]


class _Walsync(click.Group):
    """The command group: a walsync error from any command becomes a message, a hint
    and its exit code; Ctrl-C exits 130; a reader that went away (``| head``) ends the
    output quietly. Never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WalsyncError as exc:
            report(exc)
        except KeyboardInterrupt:
            interrupted()
        except BrokenPipeError:
            # nothing more can be printed; flushing at exit would fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(int(Exit.ERROR))


@click.group(cls=_Walsync, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="walsync-store")
def main() -> None:
    """walsync: a durable state store for long-running workflows."""


for _topic in (store_cmds, runs_cmds, sync_cmds, nodes_cmds, scope_cmds, ui_cmd, demo):
    for _command in _topic.COMMANDS:
        main.add_command(_command)
