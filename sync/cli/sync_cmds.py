"""The commands that talk to the sync server or concern replication: migrate, sync, status,
restore, leases, conflicts, detach.

The server comes from the environment (``WALSYNC_PG_DSN``, or ``SUPABASE_URL`` and
``SUPABASE_SERVICE_ROLE_KEY``) or a ``WALSYNC_CONFIG`` file, never from an argument,
so no credential shows in a process listing or a shell history.
(Over 500 lines: seven commands of one topic, each a library call with its help text.)
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime

import click
from rich.text import Text

from walsync.engine import Store, VersionedValue
from walsync.engine.errors import (
    RemoteAuthError,
    RemoteUnavailableError,
    SyncConfigError,
)
from walsync.engine.worker import open_sync_worker

from ..config import (
    compact_every_seconds,
    describe_target,
    load_settings,
    scope_from_settings,
    transport_from_env,
)
from ..logretention import DEFAULT_COMPACT_EVERY_SECONDS, Compactor
from ..replicator import Replicator, ReplicatorOptions, ReplicatorStatus
from ..scope import Scope
from ..status import Health, SyncStatus, sync_status
from ..status import detach as detach_store
from ..transport import LeaseInfo
from .exits import Exit, fail
from .options import KEY, open_read, open_write, store_option
from .output import (
    Output,
    ago,
    duration,
    json_option,
    moment,
    progress,
    size,
    table,
    watch,
)
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
    """Apply the server schema (idempotent). Needs a direct PostgreSQL DSN.

    The DSN comes from the environment variable --dsn-env names, or from the
    WALSYNC_CONFIG file as for the other commands.
    """
    from ..migrate import is_claim_name
    from ..migrate import migrate as apply

    if tenant_claim is not None and not tenant_mode:
        raise click.UsageError("--tenant-claim needs --tenant-mode (a tenant claim names the "
                               "JWT claim of tenant mode)")
    if tenant_claim is not None and not is_claim_name(tenant_claim):
        raise click.UsageError(f"--tenant-claim {tenant_claim!r} is not a JWT claim name "
                               "(letters, digits and _ . : / -)")
    where = f"{dsn_env} (in the environment or a WALSYNC_CONFIG file)"
    dsn = os.environ.get(dsn_env) or load_settings().get(dsn_env)
    if not dsn:
        raise SyncConfigError(f"{dsn_env} is not set: migrate needs a PostgreSQL DSN",
                              hint=f"set {where} to the database's connection string (on "
                                   "Supabase: the direct connection string, not the API URL)")
    try:
        report = apply(dsn, tenant_mode=tenant_mode, tenant_claim=tenant_claim)
    except (RemoteUnavailableError, SyncConfigError) as exc:
        exc.hint = (f"check the DSN in {where}, and that the database is up and accepts "
                    "connections from this host") if isinstance(exc, RemoteUnavailableError) \
            else exc.hint
        raise
    except RemoteAuthError as exc:
        exc.hint = ("migrate needs a role that may create schemas and functions (the "
                    f"database owner; on Supabase the postgres role): check {where}")
        raise

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
@click.option("--scope-prefix", "scope_prefixes", multiple=True, type=KEY,
              help="Pull only keys under this prefix (repeatable; holds a '/'); declared on "
                   "the store (`walsync scope`). Config: WALSYNC_SCOPE_PREFIXES.")
@click.option("--scope-group", default=None,
              help="Pull the prefixes this server-side group lists (`walsync scope group`). "
                   "Config: WALSYNC_SCOPE_GROUP.")
@click.option("--compact-every", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Compact the server's entry log this often, one worker at a time (0: "
                   "never; default 3600, or WALSYNC_COMPACT_EVERY).")
@json_option
def sync_command(store_path: str, once: bool, no_pull: bool, status_every: float,
                 timeout_seconds: float, metrics_port: int | None, metrics_host: str,
                 scope_prefixes: tuple[str, ...], scope_group: str | None,
                 compact_every: float | None, out: Output) -> None:
    """Replicate the store to the server continuously (the sync worker).

    Server from WALSYNC_PG_DSN, or SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY. With
    --json, --once prints its result as one object and the worker its status
    lines as one object a line. Ctrl-C stops the worker (exit 130), SIGTERM too
    (exit 0), each after the call in flight.
    """
    if once and metrics_port is not None:
        raise click.UsageError("--metrics-port serves the continuous worker, not --once")
    try:
        scope = (Scope(prefixes=scope_prefixes or None, group=scope_group)
                 if scope_prefixes or scope_group else scope_from_settings())
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    every = compact_every if compact_every is not None else (
        compact_every_seconds() or DEFAULT_COMPACT_EVERY_SECONDS)
    with open_sync_worker(store_path) as store:  # beside the writer: engine/worker.py
        rep = Replicator(store, transport_from_env(), ReplicatorOptions(pull=not no_pull),
                         scope=scope)
        if once:
            _once(store, rep, timeout_seconds, out)
            return
        compactor = Compactor(transport_from_env, every).start() if every else None
        try:
            _work(store, rep, status_every, metrics_host, metrics_port, out)
        finally:
            if compactor is not None:
                compactor.stop()


def _once(store: Store, rep: Replicator, timeout_seconds: float, out: Output) -> None:
    """``sync --once``: ship and pull what there is, a progress bar over the backlog."""
    first = rep.acked_lsn
    target = store.applied_lsn
    try:
        with watch("shipping records", lambda: (rep.acked_lsn - first, max(target - first, 1))):
            pushed, pulled = rep.sync_once(timeout_seconds)
    finally:
        rep.close()
    done = rep.status()
    result = {"pushed": pushed, "pulled": pulled, "acked_lsn": rep.acked_lsn,
              "node_id": store.node_id,
              "node_renewed": (store.identities[-1].reason if done.node_renewals else None),
              "shipped_again": done.last_reship if done.reships else None}

    def human() -> Iterator[str]:
        yield f"pushed {pushed} entries, pulled {pulled}; acked LSN {rep.acked_lsn}"
        if done.node_renewals:
            yield f"node id now {store.node_id}: {store.identities[-1].reason}"
        if done.reships:
            yield f"shipped again: {done.last_reship}"

    out.result(result, human)


def _status_line(s: ReplicatorStatus) -> str:
    return (f"acked LSN {s.acked_lsn}, lag {s.lag_entries} entries {duration(s.lag_seconds)}, "
            f"pulled {s.pulled_entries}, retries {s.retries}")


def _work(store: Store, rep: Replicator, status_every: float, metrics_host: str,
          metrics_port: int | None, out: Output) -> None:
    """The continuous worker: ship and pull until a signal or a permanent error."""
    from ..metrics import serve

    out.result({"event": "started", "path": store.path, "node_id": store.node_id,
                "server": describe_target()},
               lambda: f"syncing {store.path} (node {store.node_id}) with {describe_target()}")
    metrics = None
    stopped_by: str | None = None
    stop_on_signals()
    try:
        if metrics_port is not None:
            try:
                metrics = serve(store, rep, metrics_port, metrics_host)
            except OSError as exc:
                raise click.ClickException(f"cannot serve metrics on {metrics_host}:"
                                           f"{metrics_port}: {exc}") from exc
            out.result({"event": "metrics", "url": metrics.url},
                       lambda: f"metrics on {metrics.url}" if metrics else "")
        rep.start()
        while rep.error is None:
            time.sleep(status_every or 3600)
            if status_every:
                s = rep.status()
                out.result({"event": "status", "acked_lsn": s.acked_lsn,
                            "lag_entries": s.lag_entries, "lag_seconds": s.lag_seconds,
                            "pulled_entries": s.pulled_entries, "retries": s.retries},
                           functools.partial(_status_line, s))
    except KeyboardInterrupt as stop:
        stopped_by = str(stop) or "SIGINT"
        out.result({"event": "stopping", "signal": stopped_by},
                   lambda: f"stopping ({stopped_by})")
    finally:
        rep.close()
        if metrics is not None:
            metrics.close()
    if rep.error is not None:
        raise rep.error
    if stopped_by == "SIGINT":
        sys.exit(int(Exit.INTERRUPTED))


@click.command()
@store_option
@click.option("--max-lag", "max_lag_seconds", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Exit 8 when the oldest write the server lacks is older than this.")
@json_option
def status(store_path: str, max_lag_seconds: float | None, out: Output) -> None:
    """Replication status: recovery point, lag, cursors (asks the server).

    A health check: exit 0 when the server holds the store, 6 when it cannot be
    reached (or no server is configured), 7 when it is behind (it holds less
    than it acknowledged, or is another server), 8 when the oldest write it
    lacks is older than --max-lag. The local facts are printed in every case.
    """
    with open_read(store_path) as store:
        report = sync_status(store)
    health = report.health(max_lag_seconds)
    fields = {**report.fields(), "health": health.value, "max_lag_seconds": max_lag_seconds}
    out.result(fields, lambda: table(_status_rows(report, health, max_lag_seconds)))
    code = _HEALTH_EXIT[health]
    if code is not Exit.OK:
        sys.exit(int(code))


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


_HEALTH_EXIT = {Health.OK: Exit.OK, Health.UNREACHABLE: Exit.SERVER,
                Health.BEHIND: Exit.BEHIND, Health.LAGGING: Exit.LAGGING}


def _status_rows(report: SyncStatus, health: Health,
                 max_lag_seconds: float | None) -> list[tuple[str, str | Text]]:
    """The status as a person reads it: one fact a row, in human units."""
    view, rec = report.server_view, report.recorded
    verdict = {
        Health.OK: Text("ok", style="green"),
        Health.UNREACHABLE: Text("UNREACHABLE", style="bold red"),
        Health.BEHIND: Text("BEHIND: " + ("another server than the one that acknowledged "
                                           "the store" if view and view.server_changed else
                                           "the server holds less than it acknowledged"),
                            style="bold red"),
        Health.LAGGING: Text(f"LAGGING: writes older than {duration(max_lag_seconds or 0)} "
                             "are not on the server", style="bold yellow"),
    }[health]
    rows: list[tuple[str, str | Text]] = [
        ("health", verdict),
        ("store", f"{report.node_id} at LSN {report.applied_lsn}"),
        ("server", report.server if view is None or view.server_id is None
         else f"{report.server} (server id {view.server_id})"),
    ]
    if report.server_error is not None:
        rows.append(("server error", Text(report.server_error, style="red")))
        if report.server_error_hint:
            rows.append(("hint", report.server_error_hint))
    if view is not None:
        rows.append(("recovery point", "nothing of this store on the server yet"
                     if view.recovery_point_unix_ms is None
                     else moment(view.recovery_point_unix_ms / 1000)))
    if report.unreplicated_entries:
        age = report.oldest_unreplicated_age_seconds
        rows.append(("not on the server", _count(report.unreplicated_entries, "entry",
                                                 "entries") + (
            f", the oldest written {ago(age)}" if age is not None else "")))
    else:
        rows.append(("not on the server", "nothing" if view is not None
                     else "unknown (the server was not asked)"))
    rows.append(("acknowledged", f"up to LSN {report.acked_lsn}"
                 + ("" if view is None else f" (server head {view.server_head})")))
    rows.append(("pull cursor", str(rec.pull_cursor)))
    rows.append(("WAL held for sync", "none" if report.retain_floor is None else
                 f"{size(report.wal_bytes_held_for_sync)} (from LSN {report.retain_floor})"))
    if view is not None:
        rows.append(("leases held", ", ".join(view.leases_held) or "none"))
    if rec.last_error is not None:
        err = rec.last_error
        when = ago(time.time() - err.at_unix) if err.at_unix else "at an unknown time"
        rows.append(("last sync error", Text(f"{err.message} ({when}"
                                             + ("; the worker stopped on it)" if err.stopped
                                                else "; the worker retried)"), style="red")))
    for entry in rec.unshipped:
        rows.append(("never shipped", f"LSN {entry.lsn} key {entry.key!r}: {entry.reason}"))
    return rows


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
@click.option("--prefix", default="", type=KEY, help="Only keys under this prefix.")
@click.option("--lost-node", metavar="NODE",
              help="Only the runs whose index entry this (lost) node wrote last: its id or "
                   "label (`walsync nodes`).")
@click.option("--all-keys", is_flag=True,
              help="With --lost-node: the node's other keys too (those outside the runs "
                   "whose current version it wrote).")
@click.option("--at", "at_time", metavar="TIME",
              help="As of this commit time: ISO-8601 with an offset or Z "
                   "(2026-12-07T10:00:00Z), or unix milliseconds; inclusive.")
@click.option("--lsn", "at_lsn", metavar="NODE:LSN",
              help="As of that record of that node (id or label): every entry with an HLC "
                   "at most its own.")
@click.option("--force", is_flag=True, help="Restore into a non-empty directory.")
@json_option
def restore_command(dest: str, prefix: str, lost_node: str | None, all_keys: bool,
                    at_time: str | None, at_lsn: str | None, force: bool, out: Output) -> None:
    """Build a new store from the server (after host loss): its merged state, or with
    --at / --lsn the state as it was then, rebuilt from its entry log within the window
    it keeps (a point before it is refused, naming the window)."""
    from ..restore import restore

    if at_time is not None and at_lsn is not None:
        raise click.UsageError("--at and --lsn name one point: give one")
    if lost_node is not None and prefix:
        raise click.UsageError("--prefix and --lost-node choose what to restore: give one")
    if all_keys and lost_node is None:
        raise click.UsageError("--all-keys takes a lost node's other keys: give --lost-node")
    transport = transport_from_env()
    try:
        label = "restoring keys" if at_time is None and at_lsn is None else "reading the log"
        with progress(label, show_pos=True) as advance:
            report = restore(transport, dest, prefix=prefix, lost_node=lost_node,
                             all_keys=all_keys, at=at_time, lsn=at_lsn, force=force,
                             progress=advance)
    finally:
        transport.close()

    def human() -> Iterator[str]:
        yield (f"restored {report.keys} keys ({report.bytes} bytes, every checksum verified) "
               f"into {report.path}, new node {report.node_id}, in {report.seconds:.1f} s")
        yield f"covers {report.covers}"
        if report.lost_node and not all_keys:
            yield "add --all-keys to take the node's other keys too"
        point = report.point
        if point is not None:
            last = ("no entry" if point.last_node is None else
                    f"the last entry included is {point.last_node}:{point.last_lsn} "
                    f"committed at {point.last_time}")
            yield (f"as of {point.cut_time} ({point.asked}): {point.entries} entries of the "
                   f"log, {last}")
            if point.after_newest:
                yield "the point is after the newest entry: this is the current state"
        if report.lost_node:
            yield (f"recovery point of {report.lost_node}: LSN {report.lost_node_acked_lsn} "
                   f"committed at {report.recovery_point}")
        yield (f"runs that can resume (take their leases first): "
               f"{', '.join(report.resumable_runs) or 'none'}")

    out.result(report, human)


@click.command("leases")
@click.option("--holder", help="Only leases of this holder (a node id, or its label).")
@json_option
def leases_command(holder: str | None, out: Output) -> None:
    """Leases on runs held on the server."""
    from ..nodes import node_id_of

    transport = transport_from_env()
    try:
        if holder is not None:
            holder = node_id_of(transport.nodes(), holder)
        rows = transport.leases(holder)
    finally:
        transport.close()

    if out.json:
        out.rows(rows, lambda row: "")
        return
    if not rows:
        click.echo("no leases on the server" + (f" held by {holder}" if holder else ""))
        return
    out.result(rows, lambda: table([(row.run_id, row.holder, str(row.token), _lease_state(row))
                                    for row in rows],
                                   header=("run", "holder", "token", "state")))


def _lease_state(row: LeaseInfo) -> str:
    """"live, expires …" or "expired …", by the server's clock."""
    try:
        at = datetime.fromisoformat(row.expires_at).timestamp()
    except ValueError:
        when = row.expires_at
    else:
        when = moment(at)
    return f"live, expires {when}" if row.live else f"expired {when}"


@click.group()
def conflicts() -> None:
    """Keys with concurrent versions: list, resolve."""


@conflicts.command("list")
@store_option
@click.argument("prefix", default="", type=KEY)
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
             key=lambda item: item[0],
             empty=f"no conflicts in {store_path}" + (f" under {prefix!r}" if prefix else ""))


@conflicts.command("resolve")
@store_option
@click.argument("key", type=KEY)
@click.argument("value")
@json_option
def conflicts_resolve(store_path: str, key: str, value: str, out: Output) -> None:
    """Resolve KEY's conflict with VALUE (JSON): a write that dominates every sibling.

    Exit 5 if KEY does not exist; a key without a conflict is refused (exit 1):
    `walsync put` writes it.
    """
    parsed = parse_value(value)
    with open_write(store_path) as store:
        versions = store.get_versions(key)
        if not versions:
            fail(f"no key {key!r} in store {store_path}",
                 "list the keys in conflict with `walsync conflicts list`", Exit.NOT_FOUND)
        if not _disagree(versions):
            fail(f"key {key!r} in store {store_path} has no conflict: nothing to resolve",
                 f"to change its value, `walsync put {key} VALUE`", Exit.ERROR)
        result = store.put(key, parsed)
    out.result({"key": key, "lsn": result.lsn, "siblings_replaced": len(versions),
                "result": result},
               lambda: f"resolved {key!r} ({len(versions)} versions) at LSN {result.lsn}")


def _disagree(versions: list[VersionedValue]) -> bool:
    """Whether siblings hold different values (a delete counts as one)."""
    first = versions[0]
    return any((v.version.deleted, v.value) != (first.version.deleted, first.value)
               for v in versions[1:])


COMMANDS = [migrate, sync_command, status, restore_command, leases_command, conflicts, detach]
