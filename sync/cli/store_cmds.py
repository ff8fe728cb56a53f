"""The local store's commands: init, get, scan, put, delete, inspect, verify, repair,
checkpoint, compact, export, import. None of them needs a server."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from walsync import engine
from walsync.engine.errors import RunNotFoundError
from walsync.engine.replay import describe_torn_tail
from walsync.engine.workflow import export_run

from .exits import Exit, fail
from .options import KEY, lock_timeout_seconds, open_read, open_write, store_option
from .output import Output, busy, json_option, progress, size
from .values import parse_value, text_of

__all__ = ["COMMANDS"]


@click.command()
@click.argument("path", type=click.Path(file_okay=False), envvar="WALSYNC_STORE")
@click.option("--node-id", help="Name this store's node (default: random).")
@json_option
def init(path: str, node_id: str | None, out: Output) -> None:
    """Create a store at PATH (an existing store is left as it is)."""
    existed = (Path(path) / "STORE").is_file()
    try:
        with open_write(path, create=True, node_id=node_id) as store:
            result = {"path": store.path, "node_id": store.node_id, "created": not existed}
    except ValueError as exc:  # a node id the store refuses, or not the one it has
        fail(str(exc), "a store's node id is set when it is created: choose another PATH, or "
             "leave --node-id out" if existed else "choose another --node-id", Exit.USAGE)
    out.result(result, lambda: (f"created store {result['path']} (node {result['node_id']})"
                                if not existed else
                                f"store {result['path']} already exists (node "
                                f"{result['node_id']}); left as it is"))


@click.command()
@store_option
@json_option
def inspect(store_path: str, out: Output) -> None:
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

    def human() -> Iterator[str]:
        yield f"store      {report.path}"
        yield f"node       {report.node_id}"
        yield f"applied    LSN {report.applied_lsn}"
        yield (f"WAL        {len(report.segments)} segments, {report.records} records, "
               f"{report.wal_bytes} bytes, LSN {report.first_lsn}..{report.last_lsn}")
        for seg in report.segments:
            yield (f"  {seg.name}  LSN {seg.first_lsn}..{seg.last_lsn}  "
                   f"{seg.records} records  {seg.size_bytes} bytes")
        for dmg in report.damage:
            yield f"damage: {dmg.message}"

    out.result(info, human)


@click.command()
@store_option
@json_option
def verify(store_path: str, out: Output) -> None:
    """Check every checksum and LSN; exit 3 if damage is found."""
    with progress("verifying", show_pos=False) as advance:
        report = engine.verify(store_path, progress=advance)

    def human() -> Iterator[str]:
        for dmg in report.damage:
            yield f"damage: {dmg.message}"
        if report.torn_tail is not None:
            yield describe_torn_tail(report.torn_tail)
        for note in report.notes:
            yield f"note: {note}"
        status = "ok" if report.ok else "DAMAGED"
        yield (f"{status}: {report.records} records in {len(report.segments)} segments, "
               f"{report.snapshot_entries} snapshot entries, "
               f"{report.base_entries} base entries")

    out.result({"ok": report.ok, "records": report.records, "segments": len(report.segments),
                "damage": report.damage, "torn_tail": report.torn_tail,
                "applied_lsn": report.applied_lsn, "last_lsn": report.last_lsn,
                "base_lsn": report.base_lsn, "snapshot_entries": report.snapshot_entries,
                "base_entries": report.base_entries, "notes": report.notes}, human)
    if not report.ok:
        raise SystemExit(Exit.DAMAGE.value)


@click.command()
@store_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def repair(store_path: str, yes: bool, out: Output) -> None:
    """Keep what precedes the first damage; move the rest to quarantine/.

    Checks first: a store without damage is left alone, without a question.
    """
    if not yes and not out.json:
        with progress("checking", show_pos=False) as advance:
            found = engine.verify(store_path, progress=advance)
        if found.ok:
            click.echo(f"no damage found in {store_path}: nothing to repair")
            return
        for dmg in found.damage:
            click.echo(f"damage: {dmg.message}")
        click.confirm(f"repair {store_path}? Damaged data is moved aside, never deleted",
                      abort=True)
    with busy(f"repairing {store_path}"):
        report = engine.repair(store_path, lock_timeout_seconds=lock_timeout_seconds())

    def human() -> Iterator[str]:
        if not report.damaged:
            yield report.message
            return
        yield f"damage: {report.message}"
        if report.moved:
            yield (f"kept the log up to LSN {(report.first_lost_lsn or 1) - 1}; "
                   f"moved {len(report.moved)} segment(s) to {report.quarantine}")
            yield (f"lost from the log: LSN {report.first_lost_lsn}..{report.last_lost_lsn}; "
                   f"records whose effects are gone from the store: "
                   f"{report.records_lost_from_state}")
        for found in report.snapshot_damage[1:]:
            yield f"damage: {found}"
        if report.snapshot_rebuilt:
            yield (f"rebuilt the snapshot from {report.rebuilt_from}; moved the old one to "
                   f"{report.snapshot_quarantine}")
        if report.base_rewritten:
            yield "replaced the snapshot's base copy with a copy of the repaired snapshot"
        if report.lost_keys or report.lost_keys_not_named or report.lost_unnamed_at_most:
            for key in report.lost_keys:
                yield f"LOST key {key}"
            if report.lost_keys_not_named:
                yield f"LOST {report.lost_keys_not_named} more keys (not named here)"
            if report.lost_unnamed_at_most:
                yield (f"LOST up to {report.lost_unnamed_at_most} values whose keys cannot be "
                       "read")
            yield f"hint: {report.restore_hint}"

    out.result(report, human)


@click.command()
@store_option
@json_option
def checkpoint(store_path: str, out: Output) -> None:
    """Sync the snapshot and remove WAL segments no longer needed."""
    with open_write(store_path) as store, busy("checkpointing"):
        result = store.checkpoint()
    out.result(result, lambda: f"checkpointed at LSN {result.lsn}; removed "
                               f"{result.segments_removed} segment(s), "
                               f"{result.bytes_removed} bytes")


@click.command()
@store_option
@click.option("--purge-tombstones", is_flag=True,
              help="Also drop deleted keys' tombstones (stores that never synced only).")
@json_option
def compact(store_path: str, purge_tombstones: bool, out: Output) -> None:
    """Checkpoint, then shrink the snapshot file to its live data.

    Frees the space retention and deletes left; blocks writes while it copies.
    """
    with open_write(store_path) as store, busy("compacting"):
        result = store.compact(purge_tombstones=purge_tombstones)
    out.result(result, lambda: f"snapshot {result.snapshot_bytes_before} -> "
                               f"{result.snapshot_bytes_after} bytes (checkpointed at LSN "
                               f"{result.checkpoint_lsn})")


@click.command()
@store_option
@click.argument("key", type=KEY)
@json_option
def get(store_path: str, key: str, out: Output) -> None:
    """Print KEY's value (JSON); exit 5 if it is absent."""
    with open_read(store_path) as store:
        version = store.get_version(key)
        value = store.get(key)
    if version is None:
        fail(f"no key {key!r} in store {store_path}", "list the keys with `walsync scan`",
             Exit.NOT_FOUND)
    out.result({"key": key, "value": value, "version": version},
               lambda: text_of(value, key=key, indent=2), key=key)


@click.command()
@store_option
@click.argument("key", type=KEY)
@click.argument("value", required=False)
@click.option("--file", "-f", "value_file", type=click.File("rb"),
              help="Read the value from this file ('-': standard input).")
@click.option("--string", "as_string", is_flag=True, help="Store VALUE as a string, not JSON.")
@json_option
def put(store_path: str, key: str, value: str | None, value_file: Any, as_string: bool,
        out: Output) -> None:
    """Store VALUE (parsed as JSON unless --string) under KEY.

    VALUE '-' (or --file PATH) reads the value from standard input (or PATH), for
    values too large for a command line: `walsync put report - < report.json`.
    """
    if value is not None and value_file is not None:
        raise click.UsageError("pass VALUE or --file, not both")
    if value == "-":
        value_file = sys.stdin.buffer
    if value_file is not None:
        value = _read_text(value_file)
    elif value is None:
        raise click.UsageError("pass VALUE, '-' for standard input, or --file PATH")
    parsed: Any = value
    if not as_string:
        parsed = parse_value(value, plain_hint="; pass --string for a plain string")
    with open_write(store_path) as store:
        result = store.put(key, parsed)
    out.result(result, lambda: f"committed at LSN {result.lsn}")


def _read_text(stream: Any) -> str:
    """A value from a file or standard input, as UTF-8 text."""
    name = getattr(stream, "name", "standard input")
    if name == "<stdin>":
        name = "standard input"
    try:
        return bytes(stream.read()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{name} is not UTF-8 text (byte {exc.start})",
                                 param_hint="VALUE") from None


@click.command()
@store_option
@click.argument("key", type=KEY)
@json_option
def delete(store_path: str, key: str, out: Output) -> None:
    """Delete KEY (a tombstone, so the delete syncs); exit 5 if it is absent."""
    with open_write(store_path) as store:
        if store.get_version(key) is None:
            fail(f"no key {key!r} in store {store_path}", "list the keys with `walsync scan`",
                 Exit.NOT_FOUND)
        result = store.delete(key)
    out.result(result, lambda: f"deleted {key!r} at LSN {result.lsn}")


@click.command()
@store_option
@click.argument("prefix", default="", type=KEY)
@click.option("--start", type=KEY, help="First key (inclusive).")
@click.option("--end", type=KEY, help="Last key (exclusive).")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many keys.")
@click.option("--keys-only", is_flag=True,
              help="Print only the keys, one a line (values are not read).")
@json_option
def scan(store_path: str, prefix: str, start: str | None, end: str | None, limit: int | None,
         keys_only: bool, out: Output) -> None:
    """List keys under PREFIX in key order (one JSON object per line with --json)."""
    with open_read(store_path) as store:
        rows = list(store.scan(prefix, start=start, end=end, limit=limit))
    out.rows(rows,
             lambda row: row[0] if keys_only else f"{row[0]}\t{text_of(row[1], key=row[0])}",
             data=lambda row: {"key": row[0]} if keys_only else {"key": row[0],
                                                                  "value": row[1]},
             key=lambda row: row[0])


@click.command("export")
@store_option
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--run", "run_id", type=KEY,
              help="Only this run: its record, its keys, its index entry.")
@click.option("--prefix", type=KEY, help="Only the keys under this prefix.")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@json_option
def export_command(store_path: str, file: str, run_id: str | None, prefix: str | None,
                   force: bool, out: Output) -> None:
    """Write a run, a prefix or the whole store to FILE, portable and checksummed.

    Every version goes along (concurrent siblings, tombstones), so `walsync
    import` merges them into another store like a sync pull; exit 5 if the
    run does not exist.
    """
    if run_id is not None and prefix is not None:
        raise click.UsageError("pass --run or --prefix, not both")
    try:
        with open_read(store_path) as store, \
                progress("exporting keys", show_pos=True) as advance:
            report = (export_run(store, file, run_id, overwrite=force, progress=advance)
                      if run_id is not None else
                      engine.export_file(store, file, prefix=prefix, overwrite=force,
                                         progress=advance))
    except RunNotFoundError as exc:
        fail(str(exc), "list runs with `walsync runs list`", Exit.NOT_FOUND)
    except FileExistsError:
        fail(f"{file} exists", "pass --force to replace it, or choose another name", Exit.ERROR)
    except OSError as exc:
        fail(f"cannot write {file}: {exc.strerror or exc}",
             "check the directory and its permissions", Exit.ERROR)
    out.result(report, lambda: f"exported {report.keys} keys ({report.records} versions, "
                               f"{size(report.value_bytes)} of values) of "
                               f"{_scope(report.header.scope, report.header.scope_value)} "
                               f"to {report.path} ({size(report.file_bytes)})")


def _scope(scope: str, value: str) -> str:
    """What an export holds, in words: "run 'r-1'", "prefix 'a/'", "the whole store"."""
    return "the whole store" if scope == "store" else f"{scope} {value!r}"


@click.command("import")
@store_option
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--create", is_flag=True, help="Create the store if it does not exist.")
@json_option
def import_command(store_path: str, file: str, create: bool, out: Output) -> None:
    """Load an export FILE into the store: all of it, or nothing.

    The whole file is verified before anything is written (exit 3 if it is
    damaged or truncated); versions merge like a sync pull, so importing
    twice changes nothing. Exit 5 if FILE or the store does not exist.
    """
    if not os.path.isfile(file):
        fail(f"no export file {file}", "check the path (`walsync export` writes one)",
             Exit.NOT_FOUND)
    try:
        if create and not (Path(store_path) / "STORE").is_file():
            # a damaged file must not leave an empty store behind: check it first
            with progress("verifying", show_pos=False) as advance:
                engine.verify_export_file(file, progress=advance)
        with open_write(store_path, create=create) as store, \
                progress("verifying, then importing", show_pos=False) as advance:
            report = engine.import_file(store, file, progress=advance)
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}", "check the file's permissions",
             Exit.ERROR)
    done = (f"written as one record, LSN {report.lsn}" if report.lsn is not None
            else "nothing new: the store already held every version")
    out.result(report, lambda: f"imported {report.keys} keys ({report.records} versions) of "
                               f"{_scope(report.scope, report.scope_value)} from node "
                               f"{report.source_node}: {done}")


COMMANDS = [init, get, scan, put, delete, inspect, verify, repair, checkpoint, compact,
            export_command, import_command]
