"""What the ``postgres`` and ``supabase`` transports share: the SQL functions of schema
``walsync_api`` called by name (``RpcTransport``), their answers checked into the typed
answers of transport.py, push's array arguments, and the classification of errors.

Both transports call the same functions and all merge logic runs there; they
differ only in how a call travels (psycopg straight to the database, or RPC over
PostgREST). ``RpcTransport.call`` is the raw call: the typed methods are built on
it, and nothing outside the transport modules uses it (tests of SQL functions
outside the protocol aside).

(Over 500 lines: one typed call and one answer check per server function, kept in one
place so every answer is checked the same way for both transports.)
"""

from __future__ import annotations

import base64
import json
import json.encoder
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from walsync.engine.errors import (
    PullCompactedError,
    RemoteAuthError,
    RemoteRejectedError,
    RemoteSchemaError,
    RemoteUnavailableError,
    SyncError,
    SyncProtocolError,
)
from walsync.engine.record import CODEC_NONE, CODEC_ZSTD
from walsync.engine.versions import Sibling, Version, make_sibling

# the door's names, importable from here as before
from .transport import (
    Claim,
    Compaction,
    Conflict,
    EntryPoint,
    FencedRun,
    Hello,
    LeaseGrant,
    LeaseInfo,
    LeaseRenewal,
    LogPage,
    LogRetention,
    LogRow,
    LogWindow,
    NodeEntry,
    NodeInfo,
    NodeLabel,
    NodeList,
    NodeStatus,
    PullPage,
    PushAck,
    ScopeGroup,
    StateCount,
    StatePage,
    StateRow,
    Transport,
    WireBatch,
    WireEntry,
)

__all__ = ["PUSH_ARRAYS", "Claim", "NodeStatus", "PullPage", "PushAck", "RpcTransport", "Transport",
           "WireBatch", "compaction_of", "conflicts_of", "entry_point_of", "error_for_sqlstate",
           "head_of", "hello_of", "json_text", "lease_grant", "lease_list", "lease_released",
           "lease_renewal", "log_page_of", "log_retention_of", "log_window_of", "node_entries_of",
           "node_label_of", "node_list_of", "node_status", "pull_page", "pull_page_of_rows",
           "push_ack", "push_arrays", "scope_groups_of", "state_count_of", "state_page",
           "wire_sibling"]

#: SQLSTATEs worth retrying: connection trouble, shutdown, overload,
#: serialization failures and deadlocks, statement timeouts, lock timeouts, a
#: session the server ended for idling (in a transaction: 25P03, e.g. after the
#: client was paused between a call's result and its COMMIT; or at all: 57P05)
_TRANSIENT = frozenset({"57P01", "57P02", "57P03", "57P05", "53300", "53400", "40001", "40P01",
                        "57014", "55P03", "58000", "25P03"})


def error_for_sqlstate(state: str, message: str) -> SyncError:
    """The sync error for a PostgreSQL SQLSTATE (both transports classify by it)."""
    if state.startswith("08") or state in _TRANSIENT:
        return RemoteUnavailableError(message)
    if state in ("28000", "28P01", "42501"):
        return RemoteAuthError(message)
    if state in ("3F000", "42883", "42P01"):
        return RemoteSchemaError(message)
    return RemoteRejectedError(message)


class RpcTransport(ABC):
    """A transport whose calls are ``walsync_api`` functions called by name: every
    typed call of the door in terms of ``call``, each answer checked here."""

    name: str

    @abstractmethod
    def call(self, function: str, args: dict[str, Any]) -> Any:
        """Call ``walsync_api.<function>`` with named arguments; its JSON result."""

    @abstractmethod
    def push(self, node_id: str, through_lsn: int, entries: list[WireEntry]) -> PushAck:
        """Ship entries (under ``entries.claim`` when a WireBatch carries one)."""

    @abstractmethod
    def close(self) -> None: ...

    def prepare_push(self, entries: WireBatch) -> None:
        """Nothing to encode ahead of ``push`` (a transport that has, overrides it)."""
        return None

    def pull(self, node_id: str, after: int, limit: int, *,
             prefixes: Sequence[str] | None = None, group: str | None = None) -> PullPage:
        if prefixes is None and group is None:  # every key: the plain pull
            return pull_page(self.call("pull", {"p_node": node_id, "p_after": after,
                                                "p_limit": limit}))
        return pull_page(self.call("pull_scoped", {
            "p_node": node_id, "p_after": after, "p_limit": limit,
            "p_prefixes": None if prefixes is None else list(prefixes), "p_group": group}))

    def node_status(self, node_id: str) -> NodeStatus:
        return node_status(self.call("node_status", {"p_node": node_id}))

    def head(self) -> int:
        return head_of(self.call("head", {}))

    def hello(self, node_id: str, *, tokens: Sequence[str], new_token: str | None,
              acked_lsn: int, base_lsn: int) -> Hello:
        return hello_of(self.call("hello", {"p_node": node_id, "p_tokens": list(tokens),
                                            "p_new_token": new_token,
                                            "p_acked_lsn": acked_lsn,
                                            "p_base_lsn": base_lsn}))

    def node_entries(self, node_id: str, after: int, upto: int) -> list[NodeEntry]:
        return node_entries_of(self.call("node_entries", {"p_node": node_id, "p_after": after,
                                                          "p_upto": upto}))

    def state_page(self, prefix: str, after_key: str | None, limit: int) -> StatePage:
        return state_page(self.call("state_page", {"p_prefix": prefix,
                                                   "p_after_key": after_key,
                                                   "p_limit": limit}))

    def state_count(self, prefix: str) -> StateCount:
        return state_count_of(self.call("state_count", {"p_prefix": prefix}))

    def conflicts(self, prefix: str, limit: int) -> list[Conflict]:
        return conflicts_of(self.call("conflicts", {"p_prefix": prefix, "p_limit": limit}))

    def lease_acquire(self, run_id: str, holder: str, ttl_seconds: float) -> LeaseGrant:
        return lease_grant(self.call("lease_acquire", {"p_run_id": run_id, "p_holder": holder,
                                                       "p_ttl_seconds": ttl_seconds}))

    def lease_renew(self, run_id: str, holder: str, token: int,
                    ttl_seconds: float) -> LeaseRenewal:
        return lease_renewal(self.call("lease_renew", {
            "p_run_id": run_id, "p_holder": holder, "p_token": token,
            "p_ttl_seconds": ttl_seconds}))

    def lease_release(self, run_id: str, holder: str, token: int) -> bool:
        return lease_released(self.call("lease_release", {"p_run_id": run_id,
                                                          "p_holder": holder,
                                                          "p_token": token}))

    def leases(self, holder: str | None = None) -> list[LeaseInfo]:
        return lease_list(self.call("leases", {"p_holder": holder}))

    def nodes(self) -> NodeList:
        return node_list_of(self.call("nodes", {}))

    def node_label(self, node_id: str, label: str | None, *, replace: bool = True) -> NodeLabel:
        return node_label_of(self.call("node_label", {"p_node": node_id, "p_label": label,
                                                      "p_replace": replace}))

    def log_window(self) -> LogWindow:
        return log_window_of(self.call("log_window", {}))

    def log_page(self, prefix: str, upto_hlc: int, after: int, limit: int) -> LogPage:
        return log_page_of(self.call("log_page", {"p_prefix": prefix, "p_upto_hlc": upto_hlc,
                                                  "p_after": after, "p_limit": limit}))

    def entry_point(self, node_id: str, lsn: int) -> EntryPoint:
        return entry_point_of(self.call("entry_point", {"p_node": node_id, "p_lsn": lsn}))

    def scope_backfill(self, node_id: str, prefix: str, after_pos: int, upto: int,
                       except_prefixes: Sequence[str], after_key: str | None,
                       limit: int) -> StatePage:
        return state_page(self.call("scope_backfill", {
            "p_node": node_id, "p_prefix": prefix, "p_after_pos": after_pos, "p_upto": upto,
            "p_except": list(except_prefixes), "p_after_key": after_key,
            "p_limit": limit}), "scope_backfill")

    def scope_group(self, name: str | None,
                    prefixes: Sequence[str] | None = None) -> list[ScopeGroup]:
        return scope_groups_of(self.call("scope_group", {
            "p_name": name, "p_prefixes": None if prefixes is None else list(prefixes)}))

    def log_retention(self, retention_seconds: float | None = None) -> LogRetention:
        if retention_seconds is not None and not math.isfinite(retention_seconds):
            raise ValueError(f"the retention window must be a finite number of seconds, "
                             f"not {retention_seconds}")
        return log_retention_of(self.call("log_retention",
                                          {"p_retention_seconds": retention_seconds}))

    def compact_log(self) -> Compaction:
        return compaction_of(self.call("compact_log", {}))


# -- the server's answers --------------------------------------------------------------
#
# Each answer is checked here, once, against the shape the protocol gives it: a
# malformed one (another protocol version, a proxy answering in the server's place)
# raises SyncProtocolError, never a KeyError or TypeError deep in the replicator, and
# nothing half-checked reaches the store.

#: integers the server sends are bigints
_BIGINT = 2**63


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return f"text {value[:40]!r}"
    return "null" if value is None else type(value).__name__


def _object(doc: Any, what: str) -> dict[Any, Any]:
    if type(doc) is not dict:
        raise SyncProtocolError(f"{what}: the server answered {_kind(doc)}, not a JSON object")
    return doc


def _list(doc: Any, what: str) -> list[Any]:
    if type(doc) is not list:
        raise SyncProtocolError(f"{what}: the server answered {_kind(doc)}, not a JSON array")
    return doc


def _int(doc: dict[Any, Any], name: str, what: str) -> int:
    value = doc.get(name)
    if type(value) is not int or not 0 <= value < _BIGINT:
        raise SyncProtocolError(f"{what}: {name!r} is {_kind(value)}, not a bigint >= 0")
    return value


def _int_or_null(doc: dict[Any, Any], name: str, what: str) -> int | None:
    return None if doc.get(name) is None else _int(doc, name, what)


def _text(doc: dict[Any, Any], name: str, what: str) -> str:
    value = doc.get(name)
    if type(value) is not str or not value:
        raise SyncProtocolError(f"{what}: {name!r} is {_kind(value)}, not a non-empty text")
    return value


def _text_or_null(doc: dict[Any, Any], name: str, what: str) -> str | None:
    return None if doc.get(name) is None else _text(doc, name, what)


def _string(doc: dict[Any, Any], name: str, what: str) -> str:
    """Text, empty or not (a run id is the caller's)."""
    value = doc.get(name)
    if type(value) is not str:
        raise SyncProtocolError(f"{what}: {name!r} is {_kind(value)}, not a text")
    return value


def _bool(doc: dict[Any, Any], name: str, what: str) -> bool:
    value = doc.get(name)
    if type(value) is not bool:
        raise SyncProtocolError(f"{what}: {name!r} is {_kind(value)}, not a boolean")
    return value


def wire_sibling(entry: Any, what: str = "pull") -> tuple[str, Sibling]:
    """A wire entry from the server (``data`` base64 text or bytes, with ``origin``) as
    ``(key, Sibling)``; SyncProtocolError if any field lacks its type."""
    e = _object(entry, f"{what}: an entry")
    key = _text(e, "key", f"{what}: an entry")
    origin = _text(e, "origin", f"{what}: an entry")
    where = f"{what}: entry {origin}:{e.get('lsn')!r} of key {key[:80]!r}"
    lsn = _int(e, "lsn", where)
    hlc = _int(e, "hlc", where)
    fence = 0 if e.get("fence") is None else _int(e, "fence", where)
    codec = CODEC_NONE if e.get("codec") is None else _int(e, "codec", where)
    if codec not in (CODEC_NONE, CODEC_ZSTD):
        raise SyncProtocolError(f"{where}: unknown codec {codec}")
    vv = e.get("vv")
    if type(vv) is not dict or not all(
            type(k) is str and type(n) is int and 0 <= n < _BIGINT for k, n in vv.items()):
        raise SyncProtocolError(f"{where}: 'vv' is {_kind(vv)}, not a version vector")
    deleted = e.get("deleted", False)
    if type(deleted) is not bool:
        raise SyncProtocolError(f"{where}: 'deleted' is {_kind(deleted)}, not a boolean")
    data = e.get("data")
    raw: bytes | None
    if deleted or data is None:
        raw = None
    elif type(data) is str:
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:  # binascii.Error
            raise SyncProtocolError(f"{where}: 'data' is not base64") from None
    elif type(data) is bytes:
        raw = data
    else:
        raise SyncProtocolError(f"{where}: 'data' is {_kind(data)}, not base64 text")
    return key, Sibling(Version(origin, lsn, hlc, dict(vv), fence, raw is None), codec, raw)


def push_ack(doc: Any) -> PushAck:
    d = _object(doc, "push")
    fenced = d.get("fenced") or []
    if type(fenced) is not list:
        raise SyncProtocolError(f"push: 'fenced' is {_kind(fenced)}, not a list")
    runs = []
    for item in fenced:
        run = _object(item, "push: a fenced run")
        runs.append(FencedRun(_text(run, "run_id", "push: a fenced run"),
                              _int(run, "current", "push: a fenced run"),
                              _text_or_null(run, "holder", "push: a fenced run")))
    refused = _text_or_null(d, "refused", "push")
    if refused not in (None, "taken", "behind"):
        raise SyncProtocolError(f"push: 'refused' is {refused!r}, not 'taken' or 'behind'")
    return PushAck(_int(d, "acked_lsn", "push"), _int(d, "inserted", "push"),
                   _int(d, "merged", "push"), _int(d, "head", "push"), runs,
                   _text_or_null(d, "server_id", "push"), refused)


def pull_page(doc: Any) -> PullPage:
    d = _object(doc, "pull")
    if d.get("refused") == "compacted":
        gc_through = _int(d, "gc_through", "pull")
        raise PullCompactedError(
            f"pull from position {_int(d, 'next', 'pull')}: the server's log compaction "
            f"collected tombstones up to position {gc_through} this store never pulled, "
            "so it must fill its scope in again from the server's state", gc_through=gc_through)
    entries = d.get("entries")
    if type(entries) is not list:
        raise SyncProtocolError(f"pull: 'entries' is {_kind(entries)}, not a list")
    siblings = [wire_sibling(e) for e in entries]
    scope = d.get("scope")
    if scope is not None and (type(scope) is not list
                              or any(type(p) is not str for p in scope)):
        raise SyncProtocolError(f"pull: 'scope' is {_kind(scope)}, not a list of text")
    return PullPage(entries, _int(d, "next", "pull"), _int(d, "head", "pull"), siblings,
                    None if scope is None else tuple(scope))


def node_status(doc: Any) -> NodeStatus:
    d = _object(doc, "node_status")
    known = {"node_id", "acked_lsn", "acked_hlc", "pull_cursor"}
    return NodeStatus(_text(d, "node_id", "node_status"), _int(d, "acked_lsn", "node_status"),
                      _int(d, "acked_hlc", "node_status"), _int(d, "pull_cursor", "node_status"),
                      {k: v for k, v in d.items() if type(k) is str and k not in known})


def head_of(doc: Any) -> int:
    return _int(_object(doc, "head"), "head", "head")


def hello_of(doc: Any) -> Hello:
    d = _object(doc, "hello")
    reason = _text_or_null(d, "reason", "hello")
    if reason not in (None, "taken", "ahead"):
        raise SyncProtocolError(f"hello: 'reason' is {reason!r:.40}, not 'taken' or 'ahead'")
    return Hello(_text(d, "server_id", "hello"), _text(d, "node_id", "hello"), reason,
                 _bool(d, "claimed", "hello"), _int(d, "acked_lsn", "hello"),
                 _int(d, "acked_hlc", "hello"), _int(d, "head", "hello"))


def node_entries_of(doc: Any) -> list[NodeEntry]:
    rows = _object(doc, "node_entries").get("rows")
    if type(rows) is not list:
        raise SyncProtocolError(f"node_entries: 'rows' is {_kind(rows)}, not a list")
    out = []
    for row in rows:
        r = _object(row, "node_entries: a row")
        out.append(NodeEntry(_int(r, "lsn", "node_entries: a row"),
                             _string(r, "key", "node_entries: a row"),
                             _text_or_null(r, "md5", "node_entries: a row"),
                             _int_or_null(r, "hlc", "node_entries: a row")))
    return out


def state_page(doc: Any, what: str = "state_page") -> StatePage:
    """A ``state_page`` answer (or ``scope_backfill``'s, of the same shape), checked:
    every row a wire entry (with ``value_hash`` text or null), ``last_key`` text or
    null, ``done`` a boolean."""
    d = _object(doc, what)
    rows = d.get("rows")
    if type(rows) is not list:
        raise SyncProtocolError(f"{what}: 'rows' is {_kind(rows)}, not a list")
    out = []
    for row in rows:
        key, sib = wire_sibling(row, what)
        out.append(StateRow(key, sib, _text_or_null(row, "value_hash", f"{what}: a row")))
    last_key = _text_or_null(d, "last_key", what)
    if type(d.get("done")) is not bool:
        raise SyncProtocolError(f"{what}: 'done' is {_kind(d.get('done'))}, not a boolean")
    return StatePage(out, last_key, d["done"])


def state_count_of(doc: Any) -> StateCount:
    d = _object(doc, "state_count")
    return StateCount(_int(d, "keys", "state_count"), _int(d, "bytes", "state_count"))


def conflicts_of(doc: Any) -> list[Conflict]:
    return [Conflict(_text(c, "key", "conflicts: a key"), _int(c, "versions", "conflicts: a key"))
            for c in (_object(item, "conflicts: a key")
                      for item in _list(doc, "conflicts"))]


def lease_grant(doc: Any) -> LeaseGrant:
    d = _object(doc, "lease_acquire")
    what = "lease_acquire"
    return LeaseGrant(_bool(d, "acquired", what), _string(d, "run_id", what),
                      _string(d, "holder", what), _int(d, "token", what),
                      _text(d, "expires_at", what), _text(d, "now", what))


def lease_renewal(doc: Any) -> LeaseRenewal:
    d = _object(doc, "lease_renew")
    renewed = _bool(d, "renewed", "lease_renew")
    if renewed:
        return LeaseRenewal(True, _int(d, "token", "lease_renew"),
                            _text(d, "expires_at", "lease_renew"))
    holder = None if d.get("holder") is None else _string(d, "holder", "lease_renew")
    return LeaseRenewal(False, _int_or_null(d, "token", "lease_renew"),
                        _text_or_null(d, "expires_at", "lease_renew"), holder)


def lease_released(doc: Any) -> bool:
    return _bool(_object(doc, "lease_release"), "released", "lease_release")


def lease_list(doc: Any) -> list[LeaseInfo]:
    out = []
    for item in _list(doc, "leases"):
        d = _object(item, "leases: a lease")
        what = "leases: a lease"
        out.append(LeaseInfo(_string(d, "run_id", what), _string(d, "holder", what),
                             _int(d, "token", what), _text(d, "expires_at", what),
                             _bool(d, "live", what)))
    return out


def node_list_of(doc: Any) -> NodeList:
    d = _object(doc, "nodes")
    what = "nodes: a node"
    out = []
    for item in _list(d.get("nodes"), "nodes: 'nodes'"):
        n = _object(item, what)
        leases = [_string({"run_id": r}, "run_id", f"{what}: a lease")
                  for r in _list(n.get("leases"), f"{what}: 'leases'")]
        out.append(NodeInfo(_text(n, "node_id", what), _text_or_null(n, "label", what),
                            _int(n, "acked_lsn", what), _int(n, "acked_hlc", what),
                            _int(n, "pull_cursor", what), _text_or_null(n, "first_push_at", what),
                            _text_or_null(n, "last_push_at", what),
                            _text_or_null(n, "last_pull_at", what),
                            _text_or_null(n, "claimed_at", what), leases))
    return NodeList(out, _int(d, "head", "nodes"), _text(d, "now", "nodes"))


def node_label_of(doc: Any) -> NodeLabel:
    d = _object(doc, "node_label")
    return NodeLabel(_text(d, "node_id", "node_label"), _bool(d, "known", "node_label"),
                     _text_or_null(d, "label", "node_label"))


def log_window_of(doc: Any) -> LogWindow:
    d = _object(doc, "log_window")
    return LogWindow(_int_or_null(d, "from_hlc", "log_window"),
                     _int_or_null(d, "to_hlc", "log_window"), _int(d, "entries", "log_window"),
                     _int(d, "head", "log_window"))


def log_page_of(doc: Any) -> LogPage:
    d = _object(doc, "log_page")
    rows = []
    for item in _list(d.get("entries"), "log_page: 'entries'"):
        key, sib = wire_sibling(item, "log_page")
        rows.append(LogRow(_int(item, "pos", "log_page: an entry"), key, sib,
                           _text_or_null(item, "value_hash", "log_page: an entry")))
    return LogPage(rows, _int(d, "next", "log_page"), _int(d, "head", "log_page"))


#: pull_rows' columns, in order (sync/migrations/20261207000010_scope_and_retention.sql)
_PULL_ROW_FIELDS = ("pos", "origin", "lsn", "idx", "key", "deleted", "data", "codec", "vv",
                    "hlc", "fence", "value_hash")


def pull_page_of_rows(rows: Sequence[Sequence[Any]]) -> PullPage:
    """``pull_rows``' answer as the PullPage ``pull`` answers: the entries (``data`` as
    the bytes the server sent, not base64 text: no JSON document carried them) and
    their siblings, then a last row with ``next``, ``head``, ``scope`` and a refusal.
    The columns arrive typed (binary results), so each entry is checked by type here
    rather than decoded from JSON: the page's cost stays that of reading its rows."""
    width = len(_PULL_ROW_FIELDS)
    if not rows or len(rows[-1]) != width + 5 or rows[-1][0] is not None:
        raise SyncProtocolError("pull_rows: the answer lacks its closing row")
    nxt, head, scope, refused, gc_through = rows[-1][width:]
    doc: dict[str, Any] = {"next": nxt, "head": head, "scope": scope, "entries": []}
    if refused is not None:
        doc.update(refused=refused, gc_through=gc_through)
        return pull_page(doc)
    checked = pull_page(doc)  # next, head and scope, checked as pull's
    entries: list[WireEntry] = []
    siblings: list[tuple[str, Sibling]] = []
    add_entry, add_sibling = entries.append, siblings.append
    for row in rows[:-1]:
        pos, origin, lsn, idx, key, deleted, data, codec, vv, hlc, fence, value_hash = (
            row[:width])
        if (type(key) is not str or type(origin) is not str or type(lsn) is not int
                or type(hlc) is not int or type(pos) is not int or type(deleted) is not bool
                or codec not in (CODEC_NONE, CODEC_ZSTD)
                or not (data is None or type(data) is bytes)
                or type(vv) is not dict or not _is_vv(vv)):
            raise SyncProtocolError(f"pull_rows: entry {origin!r}:{lsn!r} of key "
                                    f"{str(key)[:80]!r} has a field of another type")
        fence = fence or 0
        add_entry({"pos": pos, "origin": origin, "lsn": lsn, "idx": idx, "key": key,
                   "deleted": deleted, "data": data, "codec": codec, "vv": vv, "hlc": hlc,
                   "fence": fence, "value_hash": value_hash})
        add_sibling((key, make_sibling(origin, lsn, hlc, vv.copy(), fence, codec,
                                       None if deleted else data)))
    return PullPage(entries, checked.next, checked.head, siblings, checked.scope)


def _is_vv(vv: dict[Any, Any]) -> bool:
    """Every component a node id (text) with a count in bigint's range. A loop, not
    ``all()`` over a generator: a pull checks one vector per entry."""
    for k, n in vv.items():
        if type(k) is not str or type(n) is not int or not 0 <= n < _BIGINT:
            return False
    return True


def scope_groups_of(doc: Any) -> list[ScopeGroup]:
    groups = _object(doc, "scope_group").get("groups")
    if type(groups) is not list:
        raise SyncProtocolError(f"scope_group: 'groups' is {_kind(groups)}, not a list")
    out = []
    for item in groups:
        g = _object(item, "scope_group: a group")
        prefixes = g.get("prefixes")
        if type(prefixes) is not list or any(type(p) is not str for p in prefixes):
            raise SyncProtocolError(f"scope_group: 'prefixes' is {_kind(prefixes)}, "
                                    "not a list of text")
        out.append(ScopeGroup(_text(g, "name", "scope_group: a group"), tuple(prefixes)))
    return out


def log_retention_of(doc: Any) -> LogRetention:
    d = _object(doc, "log_retention")
    what = "log_retention"
    seconds = d.get("retention_seconds")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not seconds > 0:
        raise SyncProtocolError(f"{what}: 'retention_seconds' is {_kind(seconds)}, "
                                "not a positive number")
    return LogRetention(float(seconds), _int(d, "gc_through", what),
                        _int(d, "window_start_hlc", what),
                        _text_or_null(d, "compacted_at", what),
                        _int(d, "compacted_entries", what))


def compaction_of(doc: Any) -> Compaction:
    d = _object(doc, "compact_log")
    what = "compact_log"
    return Compaction(_bool(d, "ran", what), _int(d, "removed_entries", what),
                      _int(d, "collected_tombstones", what), _int(d, "gc_through", what),
                      _int(d, "window_start_hlc", what))


def entry_point_of(doc: Any) -> EntryPoint:
    d = _object(doc, "entry_point")
    what = "entry_point"
    return EntryPoint(_text(d, "node_id", what), _int(d, "lsn", what),
                      _int_or_null(d, "hlc", what), _int_or_null(d, "before", what),
                      _int_or_null(d, "after", what))


# -- push's arguments ------------------------------------------------------------------

#: the array arguments of ``walsync_api.push``, in order: element i of each is entry i
PUSH_ARRAYS = ("p_lsn", "p_idx", "p_key", "p_deleted", "p_data", "p_codec", "p_vv", "p_hlc",
               "p_fence", "p_value_hash", "p_value_json")


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


def _make_json_text() -> Callable[[Any], str]:
    """Compact ASCII JSON (no NaN): the stdlib's C encoder, built once instead of per
    value (``json.dumps`` builds one per call: most of its cost for small values)."""
    fallback = json.JSONEncoder(separators=(",", ":"), check_circular=False,
                                allow_nan=False).encode
    make = getattr(json.encoder, "c_make_encoder", None)  # None without the C accelerator
    if make is None:
        return fallback
    try:
        encode = make(None, _not_json, json.encoder.encode_basestring_ascii, None, ":", ",",
                      False, False, False)
        probe = {"a": [1, "\u00e9", None, 1.5, True]}
        if "".join(encode(probe, 0)) != fallback(probe):  # another signature: do not guess
            return fallback
    except (TypeError, ValueError):
        return fallback

    def json_text(value: Any) -> str:
        return "".join(encode(value, 0))

    return json_text


#: ``value`` as compact ASCII JSON text
json_text = _make_json_text()


def _push_json(value: Any) -> bytes:
    """Compact JSON as UTF-8 for push's arguments, which the server parses into jsonb (so
    non-ASCII may stay as it is): orjson, several times faster than ``json_text`` on the
    JSON views of whole values. What orjson declines (an integer past 64 bits) or may have
    written as null (it writes NaN and infinities so, where ``json_text`` refuses them)
    goes to ``json_text``: both give the same jsonb."""
    try:
        out = orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json_text(value).encode()
    return json_text(value).encode() if b"null" in out else out


def _push_json_text(value: Any) -> str:
    return _push_json(value).decode()


def _stored_bytes(data: Any) -> bytes | None:
    if data is None or type(data) is bytes:
        return data
    if isinstance(data, str):  # the JSON form of a wire entry
        return base64.b64decode(data, validate=True)
    return bytes(data)


def push_arrays(entries: Sequence[Mapping[str, Any]], *, vv_as_text: bool,
                json_as_bytes: bool = False) -> dict[str, list[Any]]:
    """A batch of wire entries as ``walsync_api.push``'s parallel arrays, in its order.

    ``p_data`` holds bytes (an entry's ``data`` may be bytes or base64 text),
    ``p_value_json`` JSON text, ``p_vv`` JSON text if ``vv_as_text`` else dicts;
    with ``json_as_bytes`` that JSON text is UTF-8 bytes. ``p_fence`` defaults to 0.
    A malformed entry raises RemoteRejectedError.
    """
    dumps = _push_json if json_as_bytes else _push_json_text
    try:
        return {
            "p_lsn": [e["lsn"] for e in entries],
            "p_idx": [e.get("idx", 0) for e in entries],
            "p_key": [e["key"] for e in entries],
            "p_deleted": [bool(e["deleted"]) for e in entries],
            "p_data": [_stored_bytes(e.get("data")) for e in entries],
            "p_codec": [e.get("codec") or 0 for e in entries],
            "p_vv": [dumps(vv if type(vv) is dict else dict(vv)) if vv_as_text
                     else (vv if type(vv) is dict else dict(vv))
                     for vv in (e["vv"] for e in entries)],
            "p_hlc": [e["hlc"] for e in entries],
            "p_fence": [e.get("fence") or 0 for e in entries],
            "p_value_hash": [e.get("value_hash") for e in entries],
            "p_value_json": [None if (v := e.get("value_json")) is None else dumps(v)
                             for e in entries],
        }
    except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
        raise RemoteRejectedError(f"push: a wire entry is malformed ({type(exc).__name__}: "
                                  f"{exc})") from None
