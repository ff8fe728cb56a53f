"""What a store pulls, and how long the server keeps its entry log: ``scope`` (show, set,
group) and ``retention``. Thin: each command opens the store or the server, calls one
library function (sync/scope.py, the transport) and prints its answer."""

from __future__ import annotations

from collections.abc import Iterator

import click

from ..config import transport_from_env
from ..scope import Scope, load_scope, pending_fills, set_scope
from .options import KEY, open_read, open_write, store_option
from .output import Output, duration, json_option

__all__ = ["COMMANDS"]


def _scope_doc(scope: Scope) -> dict[str, object]:
    return {"prefixes": None if scope.prefixes is None else list(scope.prefixes),
            "group": scope.group, "every_key": scope.everything,
            "describe": scope.describe()}


@click.group("scope")
def scope() -> None:
    """What a store pulls from the server: key prefixes and/or a named group.

    A store pushes every write whatever its scope; the scope narrows what it pulls.
    A prefix holds a '/' (it names at least a key's first segment: app/, tenants/acme/).
    Widening fills the new prefixes in from the server's state; narrowing stops
    pulling them. The replicator reads the scope before every pull.
    """


@scope.command("show")
@store_option
@json_option
def scope_show(store_path: str, out: Output) -> None:
    """The store's scope, and the fills a widening left to do."""
    with open_read(store_path) as store:
        current = load_scope(store)
        fills = pending_fills(store)
    doc = {**_scope_doc(current), "fills": [f.to_doc() for f in fills]}

    def human() -> Iterator[str]:
        yield f"pulls {current.describe()}"
        for f in fills:
            yield f"to fill in: {f.prefix!r}, positions {f.after + 1}..{f.upto}"

    out.result(doc, human)


@scope.command("set")
@store_option
@click.option("--prefix", "prefixes", multiple=True, type=KEY,
              help="Pull keys under this prefix (repeatable; holds a '/').")
@click.option("--group", default=None, help="Pull the prefixes this server-side group lists.")
@click.option("--every-key", is_flag=True, help="Pull every key (the default scope).")
@click.option("--no-key", is_flag=True, help="Pull nothing: the store only pushes.")
@json_option
def scope_set(store_path: str, prefixes: tuple[str, ...], group: str | None, every_key: bool,
              no_key: bool, out: Output) -> None:
    """Declare what the store pulls (durable; the store must not be open elsewhere)."""
    chosen = sum([bool(prefixes or group), every_key, no_key])
    if chosen != 1:
        raise click.UsageError("give --prefix and/or --group, or --every-key, or --no-key")
    try:
        new = (Scope() if every_key else Scope(prefixes=()) if no_key
               else Scope(prefixes=prefixes if prefixes else None, group=group))
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    with open_write(store_path) as store:
        set_scope(store, new)
    out.result(_scope_doc(new), lambda: f"{store_path} now pulls {new.describe()}")


@scope.command("group")
@click.argument("name", required=False)
@click.argument("prefixes", nargs=-1, type=KEY)
@click.option("--remove", is_flag=True, help="Remove the group NAME.")
@json_option
def scope_group(name: str | None, prefixes: tuple[str, ...], remove: bool, out: Output) -> None:
    """List the server's scope groups, or set group NAME to PREFIXES (--remove: drop it).

    Stores that pull a group pull what it lists at each pull; adding a prefix makes
    each of them fill it in.
    """
    if (prefixes or remove) and name is None:
        raise click.UsageError("name the group")
    if prefixes and remove:
        raise click.UsageError("give PREFIXES or --remove, not both")
    for p in prefixes:
        if "/" not in p:
            raise click.UsageError(f"scope prefix {p!r} must hold a '/' (such as 'app/')")
    t = transport_from_env()
    try:
        change = [] if remove else (list(prefixes) if prefixes else None)
        groups = t.scope_group(name, change)
    finally:
        t.close()
    doc = [{"name": g.name, "prefixes": list(g.prefixes)} for g in groups]

    def human() -> Iterator[str]:
        if not groups:
            yield "no scope group" + (f" {name!r}" if name else "")
        for g in groups:
            yield f"{g.name}: {', '.join(g.prefixes)}"

    out.result(doc, human)


@click.command("retention")
@click.option("--set", "seconds", type=click.FloatRange(min=0, min_open=True),
              metavar="SECONDS",
              help="Keep the entry log this long (the point-in-time window; default 7 days).")
@click.option("--compact", is_flag=True,
              help="Compact the log beyond the window now (one caller at a time).")
@json_option
def retention(seconds: float | None, compact: bool, out: Output) -> None:
    """The server's entry log retention window, and compaction beyond it.

    Older than the window the log keeps only what the state at the window's start
    needs; tombstones every live node pulled past are collected. `walsync sync
    --compact-every` runs the compaction, or pg_cron: select walsync_api.compact_log().
    """
    t = transport_from_env()
    try:
        ran = t.compact_log() if compact else None
        info = t.log_retention(seconds)
    finally:
        t.close()
    doc: dict[str, object] = {
        "retention_seconds": info.retention_seconds, "gc_through": info.gc_through,
        "window_start_hlc": info.window_start_hlc, "compacted_at": info.compacted_at,
        "compacted_entries": info.compacted_entries}
    if ran is not None:
        doc["compaction"] = {"ran": ran.ran, "removed_entries": ran.removed_entries,
                             "collected_tombstones": ran.collected_tombstones}

    def human() -> Iterator[str]:
        yield f"entry log kept for {duration(info.retention_seconds)}"
        if ran is not None:
            yield (f"compacted: removed {ran.removed_entries} entries, collected "
                   f"{ran.collected_tombstones} tombstones" if ran.ran
                   else "another compaction is running")
        if info.compacted_at:
            yield (f"last compaction {info.compacted_at}; {info.compacted_entries} entries "
                   "removed in all")

    out.result(doc, human)


COMMANDS = [scope, retention]
