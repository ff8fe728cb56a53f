"""The commands that talk to the sync server or concern replication: migrate, sync, status,
restore, leases, conflicts, detach.

The server comes from the environment (``WALSYNC_PG_DSN``, or ``SUPABASE_URL`` and
``SUPABASE_SERVICE_ROLE_KEY``) or a ``WALSYNC_CONFIG`` file, never from an argument,
so no credential shows in a process listing or a shell history.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import click

from walsync.engine import Store, VersionedValue
from walsync.engine.errors import SyncConfigError

from ..config import describe_target, transport_from_env
from ..replicator import Replicator, ReplicatorOptions
from ..status import detach as detach_store
from ..status import sync_status
from ..transport import LeaseInfo
from .options import open_read, store_option
from .output import Output, json_option, progress
from .signals import stop_on_signals
from .values import parse_value, text_of

__all__ = ["COMMANDS"]


@click.command()
@click.option("--dsn-env", default="WALSYNC_PG_DSN", show_default=True,
              help="Environment variable holding a PostgreSQL DSN with rights to create schemas.")
@click.option("--tenant-mode", is_flag=True,
              help="Also apply tenant mode: rows scoped by a JWT claim (stays on once applied).")
@click.option("--tenant-claim", default=None, metavar="NAME",
              help="With --tenant-mode: the JWT claim naming the tenant (first run: tenant_id; "
                   "later runs keep the one set).")
@json_option
def migrate(dsn_env: str, tenant_mode: bool, tenant_claim: str | None, out: Output) -> None:
    """Apply the server schema (idempotent). Needs a direct PostgreSQL DSN."""
    from ..migrate import migrate as apply

    dsn = os.environ.get(dsn_env)
    if not dsn:
        raise SyncConfigError(f"{dsn_env} is not set: migrate needs a PostgreSQL DSN "
                              "(Supabase: the database connection string)")
    report = apply(dsn, tenant_mode=tenant_mode, tenant_claim=tenant_claim)

    def human() -> Iterator[str]:
        for name in report.applied:
            yield f"applied {name}"
        yield (f"schema up to date ({len(report.applied)} applied, "
               f"{len(report.already)} already there)")
        if report.tenant_claim is not None:
            yield f"tenant mode on (JWT claim {report.tenant_claim!r})"

    out.result(report, human)


@click.command("sync")
@store_option
@click.option("--once", is_flag=True, help="Ship and pull what there is, then exit.")
@click.option("--no-pull", is_flag=True, help="Only ship this store's writes.")
@click.option("--status-every", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds between status lines (0: none).")
@click.option("--timeout", "timeout_seconds", type=click.FloatRange(min=0), default=60.0,
              show_default=True,
              help="With --once: give up retrying an unreachable server after this long.")
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics on this port at /metrics (0: any free port).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics endpoint listens on.")
def sync_command(store_path: str, once: bool, no_pull: bool, status_every: float,
                 timeout_seconds: float, metrics_port: int | None, metrics_host: str) -> None:
    """Replicate the store to the server continuously (the sync worker).

    Server from WALSYNC_PG_DSN, or SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY.
    """
    if once and metrics_port is not None:
        raise click.UsageError("--metrics-port serves the continuous worker, not --once")
    with Store.open(store_path, create=False) as store:
        rep = Replicator(store, transport_from_env(), ReplicatorOptions(pull=not no_pull))
        if once:
            try:
                pushed, pulled = rep.sync_once(timeout_seconds)
            finally:
                rep.close()
            click.echo(f"pushed {pushed} entries, pulled {pulled}; acked LSN {rep.acked_lsn}")
            done = rep.status()
            if done.node_renewals:
                click.echo(f"node id now {store.node_id}: {store.identities[-1].reason}")
            if done.reships:
                click.echo(f"shipped again: {done.last_reship}")
            return
        _work(store, rep, status_every, metrics_host, metrics_port)


def _work(store: Store, rep: Replicator, status_every: float, metrics_host: str,
          metrics_port: int | None) -> None:
    """The continuous worker: ship and pull until a signal or a permanent error."""
    from ..metrics import serve

    click.echo(f"syncing {store.path} (node {store.node_id}) with {describe_target()}")
    metrics = None
    stop_on_signals()
    try:
        if metrics_port is not None:
            try:
                metrics = serve(store, rep, metrics_port, metrics_host)
            except OSError as exc:
                raise click.ClickException(f"cannot serve metrics on {metrics_host}:"
                                           f"{metrics_port}: {exc}") from exc
            click.echo(f"metrics on {metrics.url}")
        rep.start()
        while rep.error is None:
            time.sleep(status_every or 3600)
            if status_every:
                s = rep.status()
                click.echo(f"acked LSN {s.acked_lsn}, lag {s.lag_entries} entries "
                           f"{s.lag_seconds:.1f} s, pulled {s.pulled_entries}, "
                           f"retries {s.retries}")
    except KeyboardInterrupt as stop:
        click.echo(f"stopping ({stop or 'SIGINT'})")
    finally:
        rep.close()
        if metrics is not None:
            metrics.close()
    if rep.error is not None:
        raise rep.error


@click.command()
@store_option
@json_option
def status(store_path: str, out: Output) -> None:
    """Replication status: recovery point, lag, cursors (asks the server)."""
    with open_read(store_path) as store:
        fields = sync_status(store).fields()
    out.result(fields, lambda: [f"{k:<24} {v}" for k, v in fields.items()])


@click.command()
@store_option
@click.option("--force", is_flag=True,
              help="Detach although the server has not acknowledged every entry.")
@json_option
def detach(store_path: str, force: bool, out: Output) -> None:
    """Stop holding WAL for the sync server, for a store that stops syncing for good.

    From its first replicator on, a store keeps every WAL record the server has not
    acknowledged, through checkpoints, compactions and closes: with no sync running
    any more the WAL would grow forever. This drops that retention floor. Stop the
    sync worker first; syncing again later ships the snapshot's versions of what
    the WAL no longer holds (their history is lost).
    """
    with Store.open(store_path, create=False) as store:
        report = detach_store(store, force=force)

    def human() -> str:
        if report.retain_floor is None:
            return f"{store_path} holds no WAL for sync"
        return (f"dropped the retention floor (LSN {report.retain_floor}); "
                f"{report.unreplicated_entries} entries the server had not acknowledged may "
                "now be removed")

    out.result(report, human)


@click.command("restore")
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False),
              help="Directory of the new store (must be empty).")
@click.option("--prefix", default="", help="Only keys under this prefix.")
@click.option("--lost-node", help="Only the runs last written by this (lost) node.")
@click.option("--force", is_flag=True, help="Restore into a non-empty directory.")
@json_option
def restore_command(dest: str, prefix: str, lost_node: str | None, force: bool,
                    out: Output) -> None:
    """Build a new store from the server's merged state (after host loss)."""
    from ..restore import restore

    transport = transport_from_env()
    try:
        with progress("restoring keys", show_pos=True) as advance:
            report = restore(transport, dest, prefix=prefix, lost_node=lost_node, force=force,
                             progress=advance)
    finally:
        transport.close()

    def human() -> Iterator[str]:
        yield (f"restored {report.keys} keys ({report.bytes} bytes, every checksum verified) "
               f"into {report.path}, new node {report.node_id}, in {report.seconds:.1f} s")
        if report.lost_node:
            yield (f"recovery point of {report.lost_node}: LSN {report.lost_node_acked_lsn} "
                   f"committed at {report.recovery_point}")
        yield (f"runs that can resume (take their leases first): "
               f"{', '.join(report.resumable_runs) or 'none'}")

    out.result(report, human)


@click.command("leases")
@click.option("--holder", help="Only leases of this holder (a node id).")
@json_option
def leases_command(holder: str | None, out: Output) -> None:
    """Leases on runs held on the server."""
    transport = transport_from_env()
    try:
        rows = transport.leases(holder)
    finally:
        transport.close()

    def line(row: LeaseInfo) -> str:
        state = "live" if row.live else "expired"
        return (f"{row.run_id:<32} {row.holder:<20} token {row.token:<4} {state} until "
                f"{row.expires_at}")

    out.rows(rows, line)


@click.group()
def conflicts() -> None:
    """Keys with concurrent versions: list, resolve."""


@conflicts.command("list")
@store_option
@click.argument("prefix", default="")
@json_option
def conflicts_list(store_path: str, prefix: str, out: Output) -> None:
    """Keys under PREFIX whose siblings disagree, with every sibling (winner last).

    A delete counts as a version: a write that lost to a concurrent delete is listed,
    though the key reads as absent.
    """
    with open_read(store_path) as store:
        found = list(store.conflicts(prefix))

    def human(item: tuple[str, list[VersionedValue]]) -> Iterator[str]:
        key, versions = item
        yield key
        for v in versions:
            shown = "(deleted)" if v.version.deleted else text_of(v.value, key=key)
            yield f"  {v.version.origin}:{v.version.lsn}  {shown}"

    out.rows(found, human, data=lambda item: {"key": item[0], "siblings": item[1]},
             key=lambda item: item[0])


@conflicts.command("resolve")
@store_option
@click.argument("key")
@click.argument("value")
def conflicts_resolve(store_path: str, key: str, value: str) -> None:
    """Resolve KEY's conflict with VALUE (JSON): a write that dominates every sibling."""
    parsed = parse_value(value)
    with Store.open(store_path, create=False) as store:
        result = store.put(key, parsed)
    click.echo(f"resolved {key!r} at LSN {result.lsn}")


COMMANDS = [migrate, sync_command, status, restore_command, leases_command, conflicts, detach]
