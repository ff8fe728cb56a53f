"""A point in time of the server's entry log, as `walsync restore --at / --lsn` names it.

The meaning every host and test agree on (sync/PROTOCOL.md "Point-in-time restore"):
a point is a *cut* in HLC order. ``--at T`` (commit time, millisecond precision,
inclusive) takes every entry whose HLC's physical milliseconds are at most T: the cut
is the largest HLC of that millisecond. ``--lsn NODE:LSN`` takes the HLC of that
record: every entry with an HLC at most it, which holds everything NODE had seen
when it committed LSN (HLCs move forward on every receive). The state at a cut is
those entries merged by the usual rules (any order gives the same siblings), so a
restore at a point is a merge of a filtered log, not a replay of anyone's WAL.

A point is checked against the window the server says it restores exactly
(``log_window``): before it is refused with the window in the message; after the
newest entry it is the current state, and the report says so.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass

from walsync.engine.errors import RestorePointError

from .nodes import find_node
from .transport import LogRow, LogWindow, NodeList, Transport

__all__ = ["Point", "PointReached", "at_lsn", "at_time", "check_window", "hlc_iso",
           "iter_log", "parse_lsn", "parse_time"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: the way out of a time that does not read
_TIME_HINT = ("give ISO-8601 with Z or an offset (2026-12-07T10:00:00Z, "
              "2026-12-07T12:00:00+02:00) or unix milliseconds")
_MS = dt.timedelta(milliseconds=1)
#: a cut's HLC fits the server's bigint: physical milliseconds below 2**47
_MAX_MS = (1 << 47) - 1


def hlc_iso(hlc: int) -> str:
    """An HLC's physical time as ISO-8601 UTC, milliseconds."""
    return dt.datetime.fromtimestamp((hlc >> 16) / 1000, dt.UTC).isoformat(
        timespec="milliseconds")


@dataclass(frozen=True)
class Point:
    """A point asked for: the cut's HLC and how it was named (for messages)."""

    cut_hlc: int
    asked: str


@dataclass
class PointReached:
    """What a restore at a point reached (`walsync restore --json`'s ``point``)."""

    asked: str
    #: every entry with an HLC at most this one is included
    cut_hlc: int
    cut_time: str
    cut_unix_ms: int
    #: the entries of the log merged to rebuild the state (those under the prefix; for
    #: a lost node's runs, every entry up to the cut)
    entries: int = 0
    #: the last entry included, in HLC order (None: none)
    last_node: str | None = None
    last_lsn: int | None = None
    last_hlc: int | None = None
    last_time: str | None = None
    #: the point is past the newest entry: the restored state is the current one
    after_newest: bool = False
    #: the window the server restores exactly, as HLC times
    window_from: str | None = None
    window_to: str | None = None

    def include(self, row: LogRow) -> None:
        self.entries += 1
        v = row.sibling.version
        if self.last_hlc is None or (v.hlc, v.origin, v.lsn) > (
                self.last_hlc, self.last_node or "", self.last_lsn or 0):
            self.last_node, self.last_lsn, self.last_hlc = v.origin, v.lsn, v.hlc
            self.last_time = hlc_iso(v.hlc)


def parse_time(value: str | int | dt.datetime) -> int:
    """A commit time as unix milliseconds: integer milliseconds, or ISO-8601 with an
    offset or ``Z`` (a time without one is refused: whose local time would it be?)."""
    if isinstance(value, int):
        ms = value
    elif isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise RestorePointError(f"time {value.isoformat()} has no offset: give it one "
                                    "(Z or +HH:MM), or unix milliseconds", hint=_TIME_HINT)
        ms = (value - _EPOCH) // _MS
    else:
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            ms = int(text)
        else:
            try:
                when = dt.datetime.fromisoformat(text)
            except ValueError:
                raise RestorePointError(
                    f"time {text!r} is neither ISO-8601 (2026-12-07T10:00:00Z) nor unix "
                    "milliseconds", hint=_TIME_HINT) from None
            if when.tzinfo is None:
                raise RestorePointError(f"time {text!r} has no offset: add Z or +HH:MM "
                                        "(or give unix milliseconds)", hint=_TIME_HINT)
            ms = (when - _EPOCH) // _MS
    if not 0 <= ms <= _MAX_MS:
        raise RestorePointError(f"time {value!r} is outside what an HLC holds (unix ms 0 to "
                                f"{_MAX_MS})", hint=_TIME_HINT)
    return ms


def at_time(value: str | int | dt.datetime) -> Point:
    """``--at T``: every entry committed at or before T's millisecond."""
    ms = parse_time(value)
    shown = value if isinstance(value, str) else str(ms)
    return Point(((ms + 1) << 16) - 1, f"--at {shown}")


def parse_lsn(text: str) -> tuple[str, int]:
    """``NODE:LSN`` (the node by id or label; the last colon splits)."""
    node, sep, lsn = text.rpartition(":")
    if not sep or not node or not lsn.isdigit():
        raise RestorePointError(f"{text!r} is not NODE:LSN (a node id or label, a colon, an "
                                "LSN)", hint="for example --lsn host-a:42 (`walsync nodes` "
                                             "lists the nodes)")
    return node, int(lsn)


def at_lsn(transport: Transport, listing: NodeList, node: str, lsn: int) -> Point:
    """``--lsn NODE:LSN``: the cut at that record's HLC. A record the server holds no
    entry of (a merge record, one not shipped yet) is refused, naming the node's
    nearest LSNs the server holds."""
    node_id = find_node(listing, node).node_id
    found = transport.entry_point(node_id, lsn)
    if found.hlc is None:
        near = [f"{found.before} before" if found.before is not None else None,
                f"{found.after} after" if found.after is not None else None]
        nearest = ", ".join(n for n in near if n) or "none: the server holds no entry of it"
        raise RestorePointError(
            f"the server holds no entry of {node_id}:{lsn} (a merge record, or one not "
            f"shipped yet); the node's nearest LSNs there: {nearest}",
            hint="name an LSN the server holds (the nearest are above), or a time with --at")
    return Point(found.hlc, f"--lsn {node_id}:{lsn}")


def check_window(window: LogWindow, point: Point) -> PointReached:
    """The point, checked against the window the server restores exactly."""
    if window.from_hlc is None or window.to_hlc is None:
        raise RestorePointError(f"the server's entry log is empty: no point to restore "
                                f"({point.asked})",
                                hint="restore the current state (no --at / --lsn)")
    reached = PointReached(point.asked, point.cut_hlc, hlc_iso(point.cut_hlc),
                           point.cut_hlc >> 16, window_from=hlc_iso(window.from_hlc),
                           window_to=hlc_iso(window.to_hlc))
    if point.cut_hlc < window.from_hlc:
        raise RestorePointError(
            f"{point.asked} (commit time {reached.cut_time}) is before the server's window: "
            f"it restores points from {reached.window_from} (its oldest retained entry) to "
            f"{reached.window_to} (its newest) and after")
    reached.after_newest = point.cut_hlc >= window.to_hlc
    return reached


def iter_log(transport: Transport, prefix: str, cut_hlc: int, head: int,
             page_positions: int) -> Iterator[tuple[list[LogRow], int]]:
    """The log's entries under ``prefix`` at or below the cut, up to position ``head``,
    a page at a time, each with the position it reached."""
    after = 0
    while after < head:
        page = transport.log_page(prefix, cut_hlc, after, min(page_positions, head - after))
        if page.next <= after:
            break
        yield page.rows, page.next
        after = page.next
