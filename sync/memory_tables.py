"""The tables of the in-memory sync server (memory.py) and push's decision over them.

Apart from the server's calls because push is most of the SQL's rules: which
entries are new (duplicates skipped by origin, LSN and key), which fencing refuses
(a leased run's entries from anyone but the holder with its current token), which
version of each key is merged and which stored siblings it replaces. ``plan_push``
decides all of it without changing anything, so a push that fails changes
nothing, as a transaction rolled back. A key's run is the workflow grammar's
``run_of``, the twin of the SQL ``walsync.run_of`` (engine/workflow/keys.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from walsync.engine.errors import RemoteRejectedError
from walsync.engine.versions import dominates_or_equal
from walsync.engine.workflow.keys import run_of

__all__ = ["Backup", "Entry", "Lease", "Node", "Plan", "Refused", "Row", "Tables", "check_text",
           "plan_push", "rejected", "rows_of"]

_BIGINT = 2**63
_INT4 = 2**31
_INT2 = 2**15


# -- the tables -------------------------------------------------------------------------


@dataclass
class Node:
    acked_lsn: int = 0
    acked_hlc: int = 0
    pull_cursor: int = 0
    last_push_at: int | None = None
    last_pull_at: int | None = None
    incarnation: str | None = None
    claimed_at: int | None = None
    label: str | None = None
    first_push_at: int | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # the twin of the trigger nodes_first_push: the first push's time, kept
        if (name == "last_push_at" and value is not None
                and getattr(self, "first_push_at", None) is None):
            object.__setattr__(self, "first_push_at", value)
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Entry:
    """A row of ``walsync.entries``, and (with ``value_json``) of ``walsync.siblings``."""

    pos: int
    origin: str
    lsn: int
    idx: int
    key: str
    deleted: bool
    data: bytes | None
    codec: int
    vv: dict[str, int]
    hlc: int
    fence: int
    value_hash: str | None
    value_json: Any = None


@dataclass
class Lease:
    holder: str
    token: int
    expires_at: int
    acquired_at: int


@dataclass(frozen=True)
class Refused:
    """A row of ``walsync.fenced``."""

    origin: str
    lsn: int
    key: str
    run_id: str
    fence: int
    current: int
    holder: str
    data: bytes | None


@dataclass
class Tables:
    server_id: str
    nodes: dict[str, Node] = field(default_factory=dict)
    #: the entry log by position: ``log[pos - 1]`` (positions are handed out without gaps)
    log: list[Entry] = field(default_factory=list)
    entries: dict[tuple[str, int, str], Entry] = field(default_factory=dict)
    #: the last position of each record (origin, LSN)
    record_end: dict[tuple[str, int], int] = field(default_factory=dict)
    siblings: dict[str, list[Entry]] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    fenced: dict[tuple[str, int, str], Refused] = field(default_factory=dict)
    #: positions the log's compaction removed (sync/memory_scope.py): their slots in
    #: ``log`` stay, so ``log[pos - 1]`` still finds a position, and readers skip them
    compacted: set[int] = field(default_factory=set)
    #: walsync.collected: the tombstones compaction collected, by (key, origin, lsn)
    collected: dict[tuple[str, str, int], Entry] = field(default_factory=dict)
    #: walsync.scope_groups: name -> prefixes
    scope_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: walsync.log_settings (``retention_seconds`` None: no row yet)
    retention_seconds: float | None = None
    gc_through: int = 0
    window_start_hlc: int = 0
    compacted_at: int | None = None
    compacted_entries: int = 0

    @property
    def head(self) -> int:
        return len(self.log)


@dataclass(frozen=True)
class Backup:
    """What a MemoryServer held at one moment (``MemoryServer.backup``)."""

    tables: Tables


# -- a push, decided before anything changes --------------------------------------------


@dataclass
class Row:
    n: int
    lsn: int
    idx: int | None
    key: str
    deleted: bool | None
    data: bytes | None
    codec: int | None
    vv: dict[str, int] | None
    hlc: int | None
    fence: int
    value_hash: str | None
    value_json: str | None


@dataclass
class Plan:
    node: str
    new: list[Row]
    merged: list[Row]
    dropped: list[Entry]
    refused: list[tuple[Row, str, Lease]]
    max_hlc: int | None


def rejected(message: str) -> RemoteRejectedError:
    return RemoteRejectedError(f"push: {message}")


def check_text(value: Any, what: str, *, null: bool = True) -> None:
    if value is None:
        if not null:
            raise rejected(f"{what} is null")
        return
    if type(value) is not str:
        raise rejected(f"{what} is {type(value).__name__}, not text")
    if "\x00" in value:
        raise rejected(f"{what} holds a NUL character (SQLSTATE 22021)")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise rejected(f"{what} is not valid UTF-8 (SQLSTATE 22021)") from None


def _check_int(value: Any, what: str, limit: int) -> None:
    if value is not None and (type(value) is not int or not -limit <= value < limit):
        raise rejected(f"{what} is {value!r:.40}, not an integer of its column's range")


def rows_of(args: dict[str, Any]) -> list[Row]:
    """push's parallel arrays as rows, each element of the type its array holds."""
    n = len(args.get("p_lsn") or [])
    arrays: dict[str, list[Any]] = {}
    for name in ("p_lsn", "p_idx", "p_key", "p_deleted", "p_codec", "p_vv", "p_hlc"):
        got = args.get(name) or []
        if len(got) != n:
            raise rejected("the entry arrays differ in length (SQLSTATE 22023)")
        arrays[name] = list(got)
    for name in ("p_data", "p_fence", "p_value_hash", "p_value_json"):
        got = args.get(name)
        if got is not None and len(got) != n:
            raise rejected("the entry arrays differ in length (SQLSTATE 22023)")
        arrays[name] = [None] * n if got is None else list(got)
    rows = []
    for i in range(n):
        lsn, key, vv = arrays["p_lsn"][i], arrays["p_key"][i], arrays["p_vv"][i]
        where = f"entry {i + 1}"
        if lsn is None or key is None:  # always new, then refused by the column
            raise rejected(f"{where}: a null LSN or key (SQLSTATE 23502)")
        _check_int(lsn, f"{where}: lsn", _BIGINT)
        check_text(key, f"{where}: key")
        _check_int(arrays["p_idx"][i], f"{where}: idx", _INT4)
        _check_int(arrays["p_codec"][i], f"{where}: codec", _INT2)
        _check_int(arrays["p_hlc"][i], f"{where}: hlc", _BIGINT)
        _check_int(arrays["p_fence"][i], f"{where}: fence", _BIGINT)
        check_text(arrays["p_value_hash"][i], f"{where}: value_hash")
        check_text(arrays["p_value_json"][i], f"{where}: value_json")
        deleted, data = arrays["p_deleted"][i], arrays["p_data"][i]
        if deleted is not None and type(deleted) is not bool:
            raise rejected(f"{where}: deleted is not a boolean")
        if data is not None and type(data) is not bytes:
            raise rejected(f"{where}: data is not bytes")
        if vv is not None and (type(vv) is not dict or not all(
                type(k) is str and type(c) is int and -_BIGINT <= c < _BIGINT
                for k, c in vv.items())):
            raise rejected(f"{where}: vv is not a version vector")
        rows.append(Row(i + 1, lsn, arrays["p_idx"][i], key, deleted, data,
                         arrays["p_codec"][i], None if vv is None else dict(vv),
                         arrays["p_hlc"][i], arrays["p_fence"][i] or 0,
                         arrays["p_value_hash"][i], arrays["p_value_json"][i]))
    return rows


def _null_last(value: int | None) -> tuple[bool, int]:
    return value is None, value or 0


def plan_push(t: Tables, node: str, rows: list[Row]) -> Plan:
    """What push does with a batch (migration 20261207000004's ``push``), changing nothing."""
    known = {r.n for r in rows if (node, r.lsn, r.key) in t.entries}
    refused: list[tuple[Row, str, Lease]] = []
    for r in rows:
        run = run_of(r.key)
        lease = None if run is None else t.leases.get(run)
        if r.n not in known and lease is not None and run is not None and (
                lease.holder != node or r.fence != lease.token):
            refused.append((r, run, lease))
    refused_ids = {(r.lsn, r.key) for r, _, _ in refused}
    incoming: dict[tuple[int, str], Row] = {}
    for r in rows:
        ident = (r.lsn, r.key)
        if r.n in known or ident in refused_ids or (node, r.lsn, r.key) in t.fenced:
            continue
        best = incoming.get(ident)
        if best is None or (_null_last(r.idx), r.n) < (_null_last(best.idx), best.n):
            incoming[ident] = r
    new = sorted(incoming.values(), key=lambda r: (r.lsn, _null_last(r.idx), r.key))
    latest: dict[str, Row] = {}
    for r in new:  # each key's newest new version: highest LSN, then idx
        best = latest.get(r.key)
        if best is None or (r.lsn, _null_last(r.idx)) >= (best.lsn, _null_last(best.idx)):
            latest[r.key] = r
    merged: list[Row] = []
    dropped: list[Entry] = []
    for r in latest.values():
        stored = t.siblings.get(r.key, [])
        if any(dominates_or_equal(s.vv, r.vv or {}) for s in stored):
            continue  # dominated by (or equal to) a stored sibling
        merged.append(r)
        dropped += [s for s in stored if dominates_or_equal(r.vv or {}, s.vv)]
    for r in new:
        if r.idx is None or r.deleted is None or r.codec is None or r.vv is None \
                or r.hlc is None:
            raise rejected(f"entry {r.n} of key {r.key!r}: a null column (SQLSTATE 23502)")
    for r in merged:
        if r.value_json is not None:
            try:
                json.loads(r.value_json)
            except ValueError:
                raise rejected(f"entry {r.n} of key {r.key!r}: value_json is not JSON "
                                "(SQLSTATE 22P02)") from None
            if "\\u0000" in r.value_json:
                raise rejected(f"entry {r.n} of key {r.key!r}: value_json holds \\u0000 "
                                "(SQLSTATE 22P05)")
    hlcs = [r.hlc for r in rows if r.hlc is not None]
    return Plan(node, new, merged, dropped, refused, max(hlcs) if hlcs else None)
