"""The `walsync` command: a thin consumer of the library.

Each command opens what it needs, makes one library call and prints the
result, for people by default and as JSON with ``--json`` (a stable contract:
fields are added, never renamed or removed within a major version).

Exit codes:

====  =====================================================
0     success
1     an error (the message and a hint are on stderr)
2     usage error, or input the store refuses (a value that is not strict JSON,
      a key or value outside what the store takes)
3     damage found (``verify``), open refused for damage, or a damaged export file
4     the store is locked by another process
5     not found: no store at the path, no such key, run or export file
====  =====================================================
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from functools import wraps
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from walsync import engine
from walsync.engine import Store, WalsyncError
from walsync.engine.demo import DEMO_STEPS, run_demo
from walsync.engine.errors import SyncConfigError
from walsync.engine.record import MAX_VALUE_DEPTH
from walsync.engine.replay import describe_torn_tail
from walsync.engine.runs import Cost
from walsync.engine.workflow import Workflows

from .replicator import LAST_ERROR, UNSHIPPED, Replicator, ReplicatorOptions

if TYPE_CHECKING:
    from .metrics import MetricsServer

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DAMAGE = 3
EXIT_LOCKED = 4
EXIT_NOT_FOUND = 5

F = TypeVar("F", bound=Callable[..., Any])

store_option = click.option(
    "--store",
    "-s",
    "store_path",
    envvar="WALSYNC_STORE",
    default=".walsync",
    show_default=True,
    show_envvar=True,
    type=click.Path(file_okay=False),
    help="Store directory.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return {"$bytes": obj.hex()}
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def _emit(obj: Any, *, key: str | None = None) -> None:
    click.echo(_json_text(obj, key=key))


def _json_text(obj: Any, *, key: str | None = None, indent: int | None = None) -> str:
    """Strict JSON: json.dumps would write NaN and Infinity, which no JSON parser
    reads. A stored value JSON cannot hold (a non-finite float, an integer too long
    to print) is an error naming the key and where in the value it is (``obj`` is
    the value, or an object holding it under "value")."""
    try:
        return json.dumps(_jsonable(obj), sort_keys=True, indent=indent, allow_nan=False)
    except ValueError:
        inner = obj.get("value") if key is not None and isinstance(obj, dict) else None
        where = (inner is not None and _not_json(inner, "value")) or _not_json(obj, "value") \
            or "a part of it"
        of = f"the value of key {key!r}" if key is not None else "the output"
        _refuse(f"{of} cannot be printed as JSON: {where}",
                "read it through the library (Store.get); the CLI prints strict JSON only",
                EXIT_ERROR)


def _not_json(obj: Any, path: str) -> str | None:
    """Where in ``obj`` strict JSON fails: a non-finite float or an integer past the
    digits Python prints (sys.get_int_max_str_digits)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{path} is {obj!r}, which JSON does not have"
    if isinstance(obj, int) and not isinstance(obj, bool):
        try:
            str(obj)  # refused at once when too long (the check goes by the bit length)
        except ValueError:
            return (f"{path} is an integer of about {int(obj.bit_length() * 0.30103) + 1} "
                    f"digits, more than the {sys.get_int_max_str_digits()} Python prints")
        return None
    if is_dataclass(obj) and not isinstance(obj, type):
        return _not_json(asdict(obj), path)
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _not_json(k, f"{path} (a key)") or _not_json(v, f"{path}[{k!r:.40}]")
            if found:
                return found
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            found = _not_json(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _json_value(text: str, what: str = "VALUE", *, plain_hint: str = "") -> Any:
    """Parse strict JSON (RFC 8259): json.loads alone takes NaN, Infinity and numbers
    that overflow to infinity, and raises raw errors on deep nesting or long integers."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                          parse_int=_printable_int)
    except json.JSONDecodeError as exc:
        message = f"not JSON ({exc}){plain_hint}"
    except RecursionError:
        message = "JSON nested too deeply to read (the store takes at most " \
                  f"{MAX_VALUE_DEPTH} levels)"
    except ValueError as exc:
        message = f"not strict JSON: {exc}"
    raise click.BadParameter(message, param_hint=what)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (JSON numbers are finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond a double's range (it would be read as "
                         f"{value})")
    return value


def _printable_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits: at most "
                         f"{sys.get_int_max_str_digits()} are read (and printed)") from None


@contextmanager
def _progress(label: str, *, show_pos: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr, driven by a library's ``progress(done, total)`` callback."""
    with click.progressbar(length=1, label=label, file=sys.stderr, show_pos=show_pos) as bar:

        def advance(done: int, total: int) -> None:
            bar.length = max(total, 1)
            bar.update(done - bar.pos)

        yield advance


def _handles_errors(fn: F) -> F:
    """Turn walsync errors into a message, a hint and a meaningful exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WalsyncError as exc:
            click.echo(f"error: {exc}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            if isinstance(exc, engine.CorruptionError):
                code = EXIT_DAMAGE
            elif isinstance(exc, engine.StoreLockedError):
                code = EXIT_LOCKED
            elif isinstance(exc, engine.StoreNotFoundError):
                code = EXIT_NOT_FOUND
            elif isinstance(exc, engine.InvalidKeyError | engine.InvalidValueError
                            | engine.ValueTooLargeError):
                code = EXIT_USAGE  # the input, not the store
            else:
                code = EXIT_ERROR
            sys.exit(code)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="walsync-store")
def main() -> None:
    """walsync: a durable state store for long-running workflows."""


@main.command()
@click.argument("path", type=click.Path(file_okay=False), envvar="WALSYNC_STORE")
@click.option("--node-id", help="Name this store's node (default: random).")
@json_option
@_handles_errors
def init(path: str, node_id: str | None, as_json: bool) -> None:
    """Create a store at PATH."""
    with Store.open(path, create=True, node_id=node_id) as store:
        result = {"path": store.path, "node_id": store.node_id}
    if as_json:
        _emit(result)
    else:
        click.echo(f"created store {result['path']} (node {result['node_id']})")


@main.command()
@store_option
@json_option
@_handles_errors
def inspect(store_path: str, as_json: bool) -> None:
    """Show the store's segments, LSNs and sizes (read-only)."""
    report = engine.verify(store_path, decode_payloads=False)
    info = {
        "path": report.path,
        "node_id": report.node_id,
        "applied_lsn": report.applied_lsn,
        "first_lsn": report.first_lsn,
        "last_lsn": report.last_lsn,
        "records": report.records,
        "wal_bytes": report.wal_bytes,
        "segments": report.segments,
        "lsn_gaps": report.lsn_gaps,
        "torn_tail": report.torn_tail,
        "damage": report.damage,
    }
    if as_json:
        _emit(info)
        return
    click.echo(f"store      {report.path}")
    click.echo(f"node       {report.node_id}")
    click.echo(f"applied    LSN {report.applied_lsn}")
    click.echo(f"WAL        {len(report.segments)} segments, {report.records} records, "
               f"{report.wal_bytes} bytes, LSN {report.first_lsn}..{report.last_lsn}")
    for seg in report.segments:
        click.echo(f"  {seg.name}  LSN {seg.first_lsn}..{seg.last_lsn}  "
                   f"{seg.records} records  {seg.size_bytes} bytes")
    for dmg in report.damage:
        click.echo(f"damage: {dmg.message}")


@main.command()
@store_option
@json_option
@_handles_errors
def verify(store_path: str, as_json: bool) -> None:
    """Check every checksum and LSN; exit 3 if damage is found."""
    with _progress("verifying", show_pos=False) as advance:
        report = engine.verify(store_path, progress=advance)
    if as_json:
        _emit({"ok": report.ok, "records": report.records, "segments": len(report.segments),
               "damage": report.damage, "torn_tail": report.torn_tail,
               "applied_lsn": report.applied_lsn, "last_lsn": report.last_lsn,
               "base_lsn": report.base_lsn, "snapshot_entries": report.snapshot_entries,
               "base_entries": report.base_entries, "notes": report.notes})
    else:
        for dmg in report.damage:
            click.echo(f"damage: {dmg.message}")
        if report.torn_tail is not None:
            click.echo(describe_torn_tail(report.torn_tail))
        for note in report.notes:
            click.echo(f"note: {note}")
        status = "ok" if report.ok else "DAMAGED"
        click.echo(f"{status}: {report.records} records in {len(report.segments)} segments, "
                   f"{report.snapshot_entries} snapshot entries, "
                   f"{report.base_entries} base entries")
    if not report.ok:
        sys.exit(EXIT_DAMAGE)


@main.command()
@store_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@_handles_errors
def repair(store_path: str, yes: bool, as_json: bool) -> None:
    """Keep what precedes the first damage; move the rest to quarantine/."""
    if not yes and not as_json:
        click.confirm(f"repair {store_path}? Damaged data is moved aside, never deleted",
                      abort=True)
    report = engine.repair(store_path)
    if as_json:
        _emit(report)
        return
    if not report.damaged:
        click.echo(report.message)
        return
    click.echo(f"damage: {report.message}")
    if report.moved:
        click.echo(f"kept the log up to LSN {(report.first_lost_lsn or 1) - 1}; "
                   f"moved {len(report.moved)} segment(s) to {report.quarantine}")
        click.echo(f"lost from the log: LSN {report.first_lost_lsn}..{report.last_lost_lsn}; "
                   f"records whose effects are gone from the store: "
                   f"{report.records_lost_from_state}")
    for found in report.snapshot_damage[1:]:
        click.echo(f"damage: {found}")
    if report.snapshot_rebuilt:
        click.echo(f"rebuilt the snapshot from {report.rebuilt_from}; moved the old one to "
                   f"{report.snapshot_quarantine}")
    if report.base_rewritten:
        click.echo("replaced the snapshot's base copy with a copy of the repaired snapshot")
    if report.lost_keys or report.lost_keys_not_named or report.lost_unnamed_at_most:
        for key in report.lost_keys:
            click.echo(f"LOST key {key}")
        if report.lost_keys_not_named:
            click.echo(f"LOST {report.lost_keys_not_named} more keys (not named here)")
        if report.lost_unnamed_at_most:
            click.echo(f"LOST up to {report.lost_unnamed_at_most} values whose keys cannot be "
                       "read")
        click.echo(f"hint: {report.restore_hint}")


@main.command()
@store_option
@json_option
@_handles_errors
def checkpoint(store_path: str, as_json: bool) -> None:
    """Sync the snapshot and remove WAL segments no longer needed."""
    with Store.open(store_path, create=False) as store:
        result = store.checkpoint()
    if as_json:
        _emit(result)
    else:
        click.echo(f"checkpointed at LSN {result.lsn}; removed {result.segments_removed} "
                   f"segment(s), {result.bytes_removed} bytes")


def _open_read(store_path: str) -> Store:
    """Read-only when a writer holds the store, so debugging never blocks it."""
    try:
        return Store.open(store_path, create=False)
    except engine.StoreLockedError:
        return Store.open(store_path, readonly=True)


@main.command()
@store_option
@click.argument("key")
@json_option
@_handles_errors
def get(store_path: str, key: str, as_json: bool) -> None:
    """Print KEY's value (JSON); exit 5 if it is absent."""
    with _open_read(store_path) as store:
        version = store.get_version(key)
        value = store.get(key)
    if version is None:
        click.echo(f"error: no key {key!r} in store {store_path}", err=True)
        click.echo("hint: list the keys with `walsync scan`", err=True)
        sys.exit(EXIT_NOT_FOUND)
    if as_json:
        _emit({"key": key, "value": value, "version": version}, key=key)
    else:
        click.echo(_json_text(value, key=key, indent=2))


@main.command()
@store_option
@click.argument("key")
@click.argument("value")
@click.option("--string", "as_string", is_flag=True, help="Store VALUE as a string, not JSON.")
@json_option
@_handles_errors
def put(store_path: str, key: str, value: str, as_string: bool, as_json: bool) -> None:
    """Store VALUE (parsed as JSON unless --string) under KEY."""
    parsed: Any = value
    if not as_string:
        parsed = _json_value(value, plain_hint="; pass --string for a plain string")
    with Store.open(store_path, create=False) as store:
        result = store.put(key, parsed)
    if as_json:
        _emit(result)
    else:
        click.echo(f"committed at LSN {result.lsn}")


@main.command()
@store_option
@click.argument("prefix", default="")
@click.option("--start", help="First key (inclusive).")
@click.option("--end", help="Last key (exclusive).")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many keys.")
@click.option("--keys-only", is_flag=True)
@json_option
@_handles_errors
def scan(store_path: str, prefix: str, start: str | None, end: str | None, limit: int | None,
         keys_only: bool, as_json: bool) -> None:
    """List keys under PREFIX in key order (one JSON object per line with --json)."""
    with _open_read(store_path) as store:
        rows = list(store.scan(prefix, start=start, end=end, limit=limit))
    # every line is made before one is printed: a value JSON cannot hold stops
    # the command before its output, not in the middle of it
    if as_json:
        lines = [_json_text({"key": key} if keys_only else {"key": key, "value": value},
                            key=key) for key, value in rows]
    elif keys_only:
        lines = [key for key, _ in rows]
    else:
        lines = [f"{key}\t{_json_text(value, key=key)}" for key, value in rows]
    for line in lines:
        click.echo(line)


@main.command()
@click.option("--dsn-env", default="WALSYNC_PG_DSN", show_default=True,
              help="Environment variable holding a PostgreSQL DSN with rights to create schemas.")
@click.option("--tenant-mode", is_flag=True,
              help="Also apply tenant mode: rows scoped by a JWT claim (stays on once applied).")
@click.option("--tenant-claim", default=None, metavar="NAME",
              help="With --tenant-mode: the JWT claim naming the tenant (first run: tenant_id; "
                   "later runs keep the one set).")
@json_option
@_handles_errors
def migrate(dsn_env: str, tenant_mode: bool, tenant_claim: str | None, as_json: bool) -> None:
    """Apply the server schema (idempotent). Needs a direct PostgreSQL DSN."""
    from .migrate import migrate as apply

    dsn = os.environ.get(dsn_env)
    if not dsn:
        raise SyncConfigError(f"{dsn_env} is not set: migrate needs a PostgreSQL DSN "
                              "(Supabase: the database connection string)")
    report = apply(dsn, tenant_mode=tenant_mode, tenant_claim=tenant_claim)
    if as_json:
        _emit(report)
    else:
        for name in report.applied:
            click.echo(f"applied {name}")
        click.echo(f"schema up to date ({len(report.applied)} applied, "
                   f"{len(report.already)} already there)")
        if report.tenant_claim is not None:
            click.echo(f"tenant mode on (JWT claim {report.tenant_claim!r})")


def _replicator(store: Store, pull: bool = True) -> Replicator:
    from .config import transport_from_env

    return Replicator(store, transport_from_env(), ReplicatorOptions(pull=pull))


@main.command("sync")
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
@_handles_errors
def sync_command(store_path: str, once: bool, no_pull: bool, status_every: float,
                 timeout_seconds: float, metrics_port: int | None, metrics_host: str) -> None:
    """Replicate the store to the server continuously (the sync worker).

    Server from WALSYNC_PG_DSN, or SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY.
    """
    from .config import describe_target

    if once and metrics_port is not None:
        raise click.UsageError("--metrics-port serves the continuous worker, not --once")
    with Store.open(store_path, create=False) as store:
        rep = _replicator(store, pull=not no_pull)
        if once:
            # Transient faults are retried, but not forever: stop() ends the retry loop,
            # which then raises the last error (exit 1).
            deadline = threading.Timer(timeout_seconds, rep.stop)
            deadline.daemon = True
            deadline.start()
            try:
                pushed, pulled = rep._with_retries(rep.run_once)
            finally:
                deadline.cancel()
                rep.close()
            click.echo(f"pushed {pushed} entries, pulled {pulled}; acked LSN {rep.acked_lsn}")
            done = rep.status()
            if done.node_renewals:
                click.echo(f"node id now {store.node_id}: {store.identities[-1].reason}")
            if done.reships:
                click.echo(f"shipped again: {done.last_reship}")
            return
        click.echo(f"syncing {store.path} (node {store.node_id}) with {describe_target()}")
        metrics = None
        _stop_on_signals()
        try:
            if metrics_port is not None:
                metrics = _serve_metrics(store, rep, metrics_host, metrics_port)
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


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (what service managers and container runtimes send) stop the
    worker cleanly: the replicator finishes its call and the store closes. Installed
    explicitly, since a process started in the background inherits SIGINT ignored."""

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def _serve_metrics(store: Store, rep: Replicator, host: str, port: int) -> MetricsServer:
    from .metrics import serve

    try:
        return serve(store, rep, port, host)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {exc}") from exc


@main.command()
@store_option
@json_option
@_handles_errors
def status(store_path: str, as_json: bool) -> None:
    """Replication status: recovery point, lag, cursors (asks the server)."""
    from .config import describe_target, transport_from_env
    from .incarnation import SERVER_ID, confirmed_position, count_unreplicated, position
    from .restore import recovery_point_iso

    with _open_read(store_path) as store:
        info = store.info()
        raw = store.sync_state("acked_lsn")
        local_acked = int.from_bytes(raw, "little") if raw else 0
        cursor = int(store.record_meta("pull_cursor") or 0)
        node = store.node_id
        raw_error = store.sync_state(LAST_ERROR)
        raw_server = store.sync_state(SERVER_ID)
        local_server = raw_server.decode() if raw_server else None
        result: dict[str, Any] = {
            "node_id": node, "applied_lsn": info.applied_lsn, "acked_lsn_local": local_acked,
            "pull_cursor": cursor, "retain_floor": info.retain_floor,
            "wal_bytes_held_for_sync": info.wal_bytes_held_for_sync,
            "server": describe_target(), "server_id_local": local_server,
            "last_error": json.loads(raw_error) if raw_error else None,
            # entries set aside, never shipped (sync/PROTOCOL.md)
            "unshipped": json.loads(store.sync_state(UNSHIPPED) or b"[]")}
        # what the server holds of this store, over every node id it wrote under; the
        # local acknowledgement counts only if it came from this very server
        confirmed = local_acked
        try:
            transport = transport_from_env()
            try:
                held = position(transport, store.identities)
                leases = transport.call("leases", {"p_holder": node})
                confirmed = confirmed_position(store, transport, held)
            finally:
                transport.close()
            unix_ms = (held.acked_hlc >> 16) or None
            same = local_server is None or local_server == held.server_id
            result.update(acked_lsn=held.acked_lsn, server_id=held.server_id,
                          server_head=held.head, server_behind=held.acked_lsn < local_acked,
                          server_changed=not same, recovery_point_unix_ms=unix_ms,
                          recovery_point=recovery_point_iso(unix_ms),
                          leases_held=[lease["run_id"] for lease in leases if lease["live"]],
                          server_error=None)
        except WalsyncError as exc:
            result.update(acked_lsn=local_acked, server_error=str(exc))
        # Local records after what the server confirmed (merge records, pulled from
        # others, are not counted: they hold nothing the server lacks)
        result["unreplicated_entries"] = count_unreplicated(store, confirmed, info.applied_lsn)
        result["oldest_unreplicated_age_seconds"] = _oldest_unshipped(store, confirmed,
                                                                      info.applied_lsn)
    if as_json:
        _emit(result)
        return
    for k, v in result.items():
        click.echo(f"{k:<24} {v}")


def _oldest_unshipped(store: Store, acked: int, applied: int) -> float | None:
    """Seconds since the oldest local commit the server has not acknowledged."""
    if applied <= acked:
        return None
    try:
        for rec in store.wal_reader().read(acked, applied, 1000):
            if rec.local:
                return max(0.0, time.time() - (rec.hlc >> 16) / 1000)
    except WalsyncError:
        return None
    return None


@main.command()
@store_option
@click.option("--purge-tombstones", is_flag=True,
              help="Also drop deleted keys' tombstones (stores that never synced only).")
@json_option
@_handles_errors
def compact(store_path: str, purge_tombstones: bool, as_json: bool) -> None:
    """Checkpoint, then shrink the snapshot file to its live data.

    Frees the space retention and deletes left; blocks writes while it copies.
    """
    with Store.open(store_path, create=False) as store:
        result = store.compact(purge_tombstones=purge_tombstones)
    if as_json:
        _emit(result)
    else:
        click.echo(f"snapshot {result.snapshot_bytes_before} -> {result.snapshot_bytes_after} "
                   f"bytes (checkpointed at LSN {result.checkpoint_lsn})")


@main.command()
@store_option
@click.option("--force", is_flag=True,
              help="Detach although the server has not acknowledged every entry.")
@json_option
@_handles_errors
def detach(store_path: str, force: bool, as_json: bool) -> None:
    """Stop holding WAL for the sync server, for a store that stops syncing for good.

    From its first replicator on, a store keeps every WAL record the server has not
    acknowledged, through checkpoints, compactions and closes: with no sync running
    any more the WAL would grow forever. This drops that retention floor. Stop the
    sync worker first; syncing again later ships the snapshot's versions of what
    the WAL no longer holds (their history is lost).
    """
    with Store.open(store_path, create=False) as store:
        floor = store.retain_floor
        raw = store.sync_state("acked_lsn")
        acked = int.from_bytes(raw, "little") if raw else 0
        unreplicated = max(0, store.applied_lsn - acked) if floor is not None else 0
        if unreplicated and not force:
            _refuse(f"the server has not acknowledged {unreplicated} entries of "
                    f"{store.path} (LSN {acked + 1}..{store.applied_lsn}); once detached, "
                    "checkpoints remove them from the WAL",
                    "ship them first (`walsync sync --once`), or pass --force to give "
                    "their history up", EXIT_ERROR)
        store.set_retain_floor(None)
    if as_json:
        _emit({"retain_floor": floor, "unreplicated_entries": unreplicated})
    elif floor is None:
        click.echo(f"{store_path} holds no WAL for sync")
    else:
        click.echo(f"dropped the retention floor (LSN {floor}); {unreplicated} entries "
                   "the server had not acknowledged may now be removed")


def _refuse(message: str, hint: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    click.echo(f"hint: {hint}", err=True)
    sys.exit(code)


@main.command("export")
@store_option
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--run", "run_id", help="Only this run: its record, its keys, its index entry.")
@click.option("--prefix", help="Only the keys under this prefix.")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@json_option
@_handles_errors
def export_command(store_path: str, file: str, run_id: str | None, prefix: str | None,
                   force: bool, as_json: bool) -> None:
    """Write a run, a prefix or the whole store to FILE, portable and checksummed.

    Every version goes along (concurrent siblings, tombstones), so `walsync
    import` merges them into another store like a sync pull; exit 5 if the
    run does not exist.
    """
    if run_id is not None and prefix is not None:
        raise click.UsageError("pass --run or --prefix, not both")
    try:
        with _open_read(store_path) as store, \
                _progress("exporting keys", show_pos=True) as advance:
            report = engine.export_file(store, file, prefix=prefix, run_id=run_id,
                                        overwrite=force, progress=advance)
    except engine.errors.RunNotFoundError as exc:
        _refuse(str(exc), "list runs with `walsync runs list`", EXIT_NOT_FOUND)
        return
    except FileExistsError:
        _refuse(f"{file} exists", "pass --force to replace it, or choose another name",
                EXIT_ERROR)
        return
    except OSError as exc:
        _refuse(f"cannot write {file}: {exc.strerror or exc}", "check the directory and its "
                "permissions", EXIT_ERROR)
        return
    if as_json:
        _emit(report)
    else:
        click.echo(f"exported {report.keys} keys ({report.records} versions, "
                   f"{report.value_bytes} value bytes) of {report.header.scope} "
                   f"{report.header.scope_value!r} to {report.path} ({report.file_bytes} bytes)")


@main.command("import")
@store_option
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--create", is_flag=True, help="Create the store if it does not exist.")
@json_option
@_handles_errors
def import_command(store_path: str, file: str, create: bool, as_json: bool) -> None:
    """Load an export FILE into the store: all of it, or nothing.

    The whole file is verified before anything is written (exit 3 if it is
    damaged or truncated); versions merge like a sync pull, so importing
    twice changes nothing. Exit 5 if FILE or the store does not exist.
    """
    if not os.path.isfile(file):
        _refuse(f"no export file {file}", "check the path (`walsync export` writes one)",
                EXIT_NOT_FOUND)
        return
    try:
        with Store.open(store_path, create=create) as store, \
                _progress("verifying, then importing", show_pos=False) as advance:
            report = engine.import_file(store, file, progress=advance)
    except OSError as exc:
        _refuse(f"cannot read {file}: {exc.strerror or exc}", "check the file's permissions",
                EXIT_ERROR)
        return
    if as_json:
        _emit(report)
        return
    done = (f"written as one record, LSN {report.lsn}" if report.lsn is not None
            else "nothing new: the store already held every version")
    click.echo(f"imported {report.keys} keys ({report.records} versions) of "
               f"{report.scope} {report.scope_value!r} from node {report.source_node}: {done}")


@main.command("restore")
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False),
              help="Directory of the new store (must be empty).")
@click.option("--prefix", default="", help="Only keys under this prefix.")
@click.option("--lost-node", help="Only the runs last written by this (lost) node.")
@click.option("--force", is_flag=True, help="Restore into a non-empty directory.")
@json_option
@_handles_errors
def restore_command(dest: str, prefix: str, lost_node: str | None, force: bool,
                    as_json: bool) -> None:
    """Build a new store from the server's merged state (after host loss)."""
    from .config import transport_from_env
    from .restore import restore

    transport = transport_from_env()
    try:
        with _progress("restoring keys", show_pos=True) as advance:
            report = restore(transport, dest, prefix=prefix, lost_node=lost_node, force=force,
                             progress=advance)
    finally:
        transport.close()
    if as_json:
        _emit(report)
        return
    click.echo(f"restored {report.keys} keys ({report.bytes} bytes, every checksum verified) "
               f"into {report.path}, new node {report.node_id}, in {report.seconds:.1f} s")
    if report.lost_node:
        click.echo(f"recovery point of {report.lost_node}: LSN {report.lost_node_acked_lsn} "
                   f"committed at {report.recovery_point}")
    click.echo(f"runs that can resume (take their leases first): "
               f"{', '.join(report.resumable_runs) or 'none'}")


@main.command("leases")
@click.option("--holder", help="Only leases of this holder (a node id).")
@json_option
@_handles_errors
def leases_command(holder: str | None, as_json: bool) -> None:
    """Leases on runs held on the server."""
    from .config import transport_from_env

    transport = transport_from_env()
    try:
        rows = transport.call("leases", {"p_holder": holder})
    finally:
        transport.close()
    for row in rows:
        if as_json:
            _emit(row)
        else:
            state = "live" if row["live"] else "expired"
            click.echo(f"{row['run_id']:<32} {row['holder']:<20} token {row['token']:<4} "
                       f"{state} until {row['expires_at']}")


@main.group()
def conflicts() -> None:
    """Keys with concurrent versions: list, resolve."""


@conflicts.command("list")
@store_option
@click.argument("prefix", default="")
@json_option
@_handles_errors
def conflicts_list(store_path: str, prefix: str, as_json: bool) -> None:
    """Keys under PREFIX whose siblings disagree, with every sibling (winner last).

    A delete counts as a version: a write that lost to a concurrent delete is listed,
    though the key reads as absent.
    """
    with _open_read(store_path) as store:
        found = list(store.conflicts(prefix))
    for key, versions in found:
        if as_json:
            _emit({"key": key, "siblings": versions}, key=key)
        else:
            click.echo(key)
            for v in versions:
                shown = "(deleted)" if v.version.deleted else _json_text(v.value, key=key)
                click.echo(f"  {v.version.origin}:{v.version.lsn}  {shown}")


@conflicts.command("resolve")
@store_option
@click.argument("key")
@click.argument("value")
@_handles_errors
def conflicts_resolve(store_path: str, key: str, value: str) -> None:
    """Resolve KEY's conflict with VALUE (JSON): a write that dominates every sibling."""
    parsed = _json_value(value)
    with Store.open(store_path, create=False) as store:
        result = store.put(key, parsed)
    click.echo(f"resolved {key!r} at LSN {result.lsn}")


@main.group()
def runs() -> None:
    """Workflow runs: list, show, resumable."""


def _print_runs(records: list[Any], as_json: bool) -> None:
    if as_json:
        for rec in records:
            _emit(rec)
        return
    for rec in records:
        cost = Cost.from_dict(rec.cost)
        click.echo(f"{rec.run_id:<28} {rec.workflow:<16} {rec.status:<10} "
                   f"{rec.progress:5.1f}%  steps {rec.steps_done:<4} ${cost.usd:.4f}  "
                   f"updated {rec.updated_at:%Y-%m-%d %H:%M:%S}")


@runs.command("list")
@store_option
@click.option("--status", multiple=True, help="Only runs with this status (repeatable).")
@click.option("--workflow", help="Only runs of this workflow.")
@json_option
@_handles_errors
def runs_list(store_path: str, status: tuple[str, ...], workflow: str | None,
              as_json: bool) -> None:
    """List runs (one JSON object per line with --json)."""
    with _open_read(store_path) as store:
        records = Workflows(store).list_runs(status=status or None, workflow=workflow)
    _print_runs(records, as_json)


@runs.command("resumable")
@store_option
@json_option
@_handles_errors
def runs_resumable(store_path: str, as_json: bool) -> None:
    """Runs worth resuming: running, paused, or failed with retries left."""
    with _open_read(store_path) as store:
        records = Workflows(store).resumable()
    _print_runs(records, as_json)


@runs.command("show")
@store_option
@click.argument("run_id")
@json_option
@_handles_errors
def runs_show(store_path: str, run_id: str, as_json: bool) -> None:
    """Show a run and its steps in execution order."""
    with _open_read(store_path) as store:
        run = Workflows(store).get_run(run_id)
        steps = run.ordered_steps()
    if as_json:
        _emit({"run": run.record, "steps": steps})
        return
    rec = run.record
    click.echo(f"run {rec.run_id}  workflow {rec.workflow} v{rec.workflow_version}  "
               f"{rec.status}  {rec.progress:.0f}%  cost ${Cost.from_dict(rec.cost).usd:.4f}")
    if rec.error:
        click.echo(f"error: {rec.error.get('type')}: {rec.error.get('message')}")
    for s in steps:
        extra = f"  cursor={s.cursor!r}" if s.status != "success" and s.cursor is not None else ""
        click.echo(f"  {s.seq:>4}  {s.step_id:<28} {s.status:<16} attempts {s.attempts}{extra}")


@main.group()
def checkpoints() -> None:
    """Named checkpoints of a run: list, restore (roll back)."""


@checkpoints.command("list")
@store_option
@click.argument("run_id")
@json_option
@_handles_errors
def checkpoints_list(store_path: str, run_id: str, as_json: bool) -> None:
    """List RUN_ID's checkpoints, oldest first."""
    with _open_read(store_path) as store:
        infos = Workflows(store).get_run(run_id).checkpoints()
    for info in infos:
        if as_json:
            _emit(info)
        else:
            click.echo(f"{info.name:<24} {info.created_at:%Y-%m-%d %H:%M:%S}  "
                       f"{info.steps} steps  {info.status:<10} {','.join(info.tags)}  "
                       f"{info.description}")


@checkpoints.command("restore")
@store_option
@click.argument("run_id")
@click.argument("name")
@json_option
@_handles_errors
def checkpoints_restore(store_path: str, run_id: str, name: str, as_json: bool) -> None:
    """Roll RUN_ID back to checkpoint NAME (what it replaces stays retrievable)."""
    with Store.open(store_path, create=False) as store:
        report = Workflows(store).get_run(run_id).rollback(name)
    if as_json:
        _emit(report)
    else:
        click.echo(f"run {run_id} rolled back to {name!r} (rollback #{report.rollback}); "
                   f"replaced steps kept: {', '.join(report.discarded_steps) or 'none'}")


@main.command()
@click.option("--store", "-s", "store_path", envvar="WALSYNC_DEMO_STORE", default=".walsync-demo",
              show_default=True, type=click.Path(file_okay=False), help="Demo store directory.")
@click.option("--crash-after", type=click.IntRange(0, len(DEMO_STEPS) - 1),
              help="SIGKILL this process part-way through step N+1 (0-based N).")
@click.option("--delay", type=click.FloatRange(min=0), default=0.15, show_default=True,
              help="Seconds each unit of pretend work takes.")
@click.option("--fresh", is_flag=True, help="Delete the demo store first.")
@_handles_errors
def demo(store_path: str, crash_after: int | None, delay: float, fresh: bool) -> None:
    """Run an invoicing pipeline that survives SIGKILL; run again to resume it.

    Try: walsync demo --crash-after 3; walsync demo
    """
    if fresh and os.path.isdir(store_path):
        shutil.rmtree(store_path)
    run_demo(store_path, crash_after=crash_after, delay_seconds=delay, out=click.echo)


@main.command("ui")
@store_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (beyond loopback, anyone who reaches it reads the store).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--allow-actions", is_flag=True,
              help="Offer resolve, rollback and conflict resolution (each needs the writer lock).")
@_handles_errors
def ui_command(store_path: str, host: str, port: int, allow_actions: bool) -> None:
    """A local web dashboard: runs, steps, cost, replication, store health.

    Read-only unless --allow-actions; opens the store as a reader beside a
    live writer. Sync settings come from the environment, as for `status`.
    """
    from .ui import serve

    try:
        server = serve(store_path, host=host, port=port, allow_actions=allow_actions)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc
    mode = "actions enabled" if allow_actions else "read-only"
    click.echo(f"walsync ui on {server.url} ({mode}, store {store_path}); Ctrl-C stops it")
    _stop_on_signals()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        server.close()


if __name__ == "__main__":
    main()
