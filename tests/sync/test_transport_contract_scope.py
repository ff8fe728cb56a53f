"""The contract of scoped pull and of the entry log's retention, over every transport
(``postgres``, ``supabase`` through the gateway, ``memory``): the same calls answer the
same documents (sync/PROTOCOL.md, "Scoped pull" and "Retention of the entry log").

The server fixture is test_transport_contract.py's.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.sync._helpers import entry
from tests.sync.test_transport_contract import Server, server
from walsync.engine.errors import PullCompactedError, RemoteRejectedError
from walsync.sync.transport import ScopeGroup, Transport

__all__ = ["server"]

#: an HLC of now: younger than any retention window
NOW_HLC = int(time.time() * 1000) << 16


def _keys(page_entries: list[dict[str, Any]]) -> list[str]:
    return [e["key"] for e in page_entries]


def _pull_all(t: Transport, node: str, after: int, limit: int,
              **scope: Any) -> tuple[list[dict[str, Any]], int, int]:
    """Every page from ``after``: the entries, the final cursor and how many pages."""
    got: list[dict[str, Any]] = []
    pages = 0
    while True:
        page = t.pull(node, after, limit, **scope)
        pages += 1
        got += page.entries
        if page.next <= after:
            return got, after, pages
        after = page.next
        if after >= page.head:
            return got, after, pages


def _push_mixed(t: Transport) -> None:
    """A's records over several first segments; B's own entry under app/."""
    t.push("A", 6, [
        entry("A", 1, "app/x", 1), entry("A", 1, "other/x", 1, idx=1),
        entry("A", 2, "apple/y", 2), entry("A", 3, "app", 3),
        entry("A", 4, "app/y", 4), entry("A", 4, "app/z", 4, idx=1),
        entry("A", 5, "other/y", 5), entry("A", 6, "app/deep/q", 6)])
    t.push("B", 1, [entry("B", 1, "app/mine", 1)])


def test_scope_pull_returns_only_keys_under_the_prefixes_in_position_order(
        server: Server) -> None:
    t = server.migrate()
    _push_mixed(t)
    head = t.head()
    page = t.pull("B", 0, 1000, prefixes=["app/"])
    assert _keys(page.entries) == ["app/x", "app/y", "app/z", "app/deep/q"]
    assert page.scope == ("app/",)
    assert (page.next, page.head) == (head, head)
    positions = [e["pos"] for e in page.entries]
    assert positions == sorted(positions)
    # a page ends on a whole record (LSN 4 holds two keys in scope), and the cursor
    # moves over rows out of scope and the node's own
    got, cursor, pages = _pull_all(t, "B", 0, 2, prefixes=["app/"])
    assert _keys(got) == ["app/x", "app/y", "app/z", "app/deep/q"]
    assert cursor == head
    assert pages >= 2
    # several prefixes, one covering another; a deeper prefix alone
    assert _keys(t.pull("B", 0, 1000, prefixes=["other/", "app/deep/", "app/"]).entries) == [
        "app/x", "other/x", "app/y", "app/z", "other/y", "app/deep/q"]
    assert t.pull("B", 0, 1000, prefixes=["app/", "app/deep/"]).scope == ("app/",)
    assert _keys(t.pull("B", 0, 1000, prefixes=["app/deep/"]).entries) == ["app/deep/q"]
    # '' is every key; no prefix and no group is nothing at all (the cursor still moves)
    every = t.pull("B", 0, 1000, prefixes=[""])
    assert (every.scope, len(every.entries)) == (None, 8)
    nothing = t.pull("B", 0, 1000, prefixes=[])
    assert (nothing.entries, nothing.next, nothing.scope) == ([], head, ())
    # the plain pull is every key, as before
    plain = t.pull("B", 0, 1000)
    assert (plain.scope, len(plain.entries)) == (None, 8)


def test_scope_prefix_without_a_slash_is_refused(server: Server) -> None:
    t = server.migrate()
    with pytest.raises(RemoteRejectedError, match="must hold a '/'"):
        t.pull("B", 0, 10, prefixes=["app"])
    with pytest.raises(RemoteRejectedError, match="must hold a '/'"):
        t.scope_group("g", ["app"])
    with pytest.raises(RemoteRejectedError, match="does not exist"):
        t.pull("B", 0, 10, group="nobody")


def test_scope_groups_are_set_listed_resolved_and_removed(server: Server) -> None:
    t = server.migrate()
    _push_mixed(t)
    assert t.scope_group(None) == []
    assert t.scope_group("g", ["other/", "app/deep/", "other/"]) == [
        ScopeGroup("g", ("app/deep/", "other/"))]
    t.scope_group("h", ["x/"])
    assert [g.name for g in t.scope_group(None)] == ["g", "h"]
    page = t.pull("B", 0, 1000, group="g")
    assert page.scope == ("app/deep/", "other/")
    assert _keys(page.entries) == ["other/x", "other/y", "app/deep/q"]
    # a group and prefixes: their union
    both = t.pull("B", 0, 1000, prefixes=["apple/"], group="g")
    assert _keys(both.entries) == ["other/x", "apple/y", "other/y", "app/deep/q"]
    assert t.scope_group("g", []) == []
    assert [g.name for g in t.scope_group(None)] == ["h"]


def test_scope_backfill_pages_siblings_of_others_up_to_a_position(server: Server) -> None:
    t = server.migrate()
    _push_mixed(t)
    upto = t.head()
    t.push("A", 7, [entry("A", 7, "app/later", 7)])
    t.push("A", 8, [entry("A", 8, "app/x", 8, {"A": 8})])  # replaces app/x's sibling
    rows, after = [], None
    while True:
        page = t.scope_backfill("B", "app/", 0, upto, [], after, 2)
        rows += [(r.key, r.sibling.version.origin, r.sibling.version.lsn) for r in page.rows]
        after = page.last_key
        if page.done:
            break
    # app/x's only sibling now is at a later position; B's own and later keys are left out
    assert rows == [("app/deep/q", "A", 6), ("app/y", "A", 4), ("app/z", "A", 4)]
    # a lower bound (what the store pulled while the prefix was in its scope) and parts
    # excluded (still in its scope, or with a history of their own)
    part = t.scope_backfill("B", "app/", 5, upto, ["app/deep/"], None, 100)
    assert [(r.key, r.sibling.version.lsn) for r in part.rows] == [("app/z", 4)]
    full = t.scope_backfill("B", "", 0, t.head(), [], None, 100)
    assert {r.key for r in full.rows} == {"app/x", "other/x", "apple/y", "app", "app/y",
                                         "app/z", "other/y", "app/deep/q", "app/later"}


def test_log_retention_is_read_and_set(server: Server) -> None:
    t = server.migrate()
    first = t.log_retention()
    assert (first.retention_seconds, first.gc_through, first.window_start_hlc,
            first.compacted_at, first.compacted_entries) == (604800.0, 0, 0, None, 0)
    assert t.log_retention(3600).retention_seconds == 3600.0
    assert t.log_retention().retention_seconds == 3600.0
    for bad in (0, -1.0):
        with pytest.raises(RemoteRejectedError, match="positive number of seconds"):
            t.log_retention(bad)
    with pytest.raises(ValueError, match="finite"):
        t.log_retention(float("inf"))
    assert t.log_retention().retention_seconds == 3600.0


def test_compaction_keeps_the_windows_state_and_collects_tombstones(server: Server) -> None:
    t = server.migrate()
    old = 1_700_000_000_000 << 16  # far older than any window
    t.push("A", 5, [
        entry("A", 1, "k/1", "v1", hlc=old), entry("A", 2, "k/1", "v2", {"A": 2}, hlc=old + 1),
        entry("A", 3, "k/gone", "x", hlc=old + 2),
        entry("A", 4, "k/gone", None, {"A": 4}, hlc=old + 3),
        entry("A", 5, "k/new", "n", hlc=NOW_HLC)])
    t.push("C", 2, [entry("C", 1, "k/c", "c1", hlc=old + 4),
                    entry("C", 2, "k/c", "c2", {"C": 2}, hlc=NOW_HLC)])
    # B pulled (it is live) to before the tombstone: nothing of it is collected yet
    t.pull("B", 2, 10)
    assert t.log_window().from_hlc == old  # the whole log: its oldest entry
    run = t.compact_log()
    # the point-in-time window now starts at the boundary: older cuts may miss entries
    assert t.log_window().from_hlc == run.window_start_hlc
    assert (run.ran, run.collected_tombstones, run.gc_through) == (True, 0, 0)
    assert run.removed_entries == 2  # k/1's v1 and k/gone's x: each dominated by one as old
    assert run.window_start_hlc > old
    # (a pull records the largest position the node confirmed: B's stays 2)
    keys = sorted((e["key"], e["lsn"]) for e in t.pull("B", 0, 1000).entries)
    assert keys == [("k/1", 2), ("k/c", 1), ("k/c", 2), ("k/gone", 4), ("k/new", 5)]
    # B pulls past the tombstone: collected now, and a cursor behind it is refused
    t.pull("B", t.head(), 10)
    again = t.compact_log()
    assert (again.collected_tombstones, again.removed_entries, again.gc_through) == (1, 1, 4)
    assert [(w[0], w[1]) for w in server.winners()] == [
        ("k/1", "A"), ("k/c", "C"), ("k/new", "A")]
    with pytest.raises(PullCompactedError) as info:
        t.pull("Z", 3, 10)
    assert info.value.gc_through == 4
    with pytest.raises(PullCompactedError):
        t.pull("Z", 3, 10, prefixes=["k/"])
    assert t.pull("Z", 4, 10).next == t.head()  # at or past it: pulls on
    assert len(t.pull("Z", 0, 10).entries) == 4  # from the start: what the log holds
    done = t.log_retention()
    assert (done.gc_through, done.compacted_entries) == (4, 3)
    assert done.compacted_at is not None


def test_collected_tombstones_reach_fills_until_every_node_pulled_past(
        server: Server) -> None:
    t = server.migrate()
    t.push("A", 2, [entry("A", 1, "k/x", "v"), entry("A", 2, "k/x", None, {"A": 2})])
    t.pull("Y", 0, 10)  # Y pulled once, before the deletion
    t.log_retention(0.001)  # no one pulled within the window: Y is not live
    time.sleep(0.05)
    assert t.compact_log().collected_tombstones == 1
    assert server.winners() == []
    # a store that held the key learns of the deletion from a fill: a deleted sibling
    # without a value
    rows = t.scope_backfill("Y", "k/", 0, t.head(), [], None, 100).rows
    assert [(r.key, r.sibling.version.lsn, r.sibling.deleted, r.sibling.data)
            for r in rows] == [("k/x", 2, True, None)]
    assert t.scope_backfill("Y", "k/", 2, t.head(), [], None, 100).rows == []
    with pytest.raises(PullCompactedError):
        t.pull("Y", 1, 10)
    t.pull("Y", 2, 10)  # every node that pulled is past it now: gone at the next run
    t.compact_log()
    assert t.scope_backfill("Y", "k/", 0, t.head(), [], None, 100).rows == []
