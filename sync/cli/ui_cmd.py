"""`walsync ui`: the local web dashboard (sync/ui/)."""

from __future__ import annotations

import sys

import click

from .exits import Exit
from .options import store_option
from .signals import stop_on_signals

__all__ = ["COMMANDS"]


@click.command("ui")
@store_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (beyond loopback, anyone who reaches it reads the store).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--allow-actions", is_flag=True,
              help="Offer resolve, rollback and conflict resolution (each needs the writer lock).")
def ui_command(store_path: str, host: str, port: int, allow_actions: bool) -> None:
    """A local web dashboard: runs, steps, cost, replication, store health.

    Read-only unless --allow-actions; opens the store as a reader beside a
    live writer. Sync settings come from the environment, as for `status`.
    """
    from ..ui import serve

    try:
        server = serve(store_path, host=host, port=port, allow_actions=allow_actions)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc
    mode = "actions enabled" if allow_actions else "read-only"
    click.echo(f"walsync ui on {server.url} ({mode}, store {store_path}); Ctrl-C stops it")
    stop_on_signals()
    stopped_by = None
    try:
        server.serve_forever()
    except KeyboardInterrupt as stop:
        stopped_by = str(stop) or "SIGINT"
        click.echo(f"stopping ({stopped_by})")
    finally:
        server.close()
    if stopped_by == "SIGINT":  # Ctrl-C: 130 as for every command; SIGTERM: a clean 0
        sys.exit(int(Exit.INTERRUPTED))


COMMANDS = [ui_command]
