"""The transport protocol: what the replicator needs from a server.

Two implementations pass one contract suite: ``postgres`` (psycopg, direct)
and ``supabase`` (supabase-py, RPC over PostgREST). Both call the same SQL
functions of schema ``walsync_api``; all merge logic runs there.

Errors a transport raises are the sync branch of the error tree:
RemoteUnavailableError is transient (the replicator retries it);
RemoteAuthError, RemoteSchemaError and RemoteRejectedError are permanent
(the replicator stops and reports them).
"""

from __future__ import annotations

import base64
import json
import json.encoder
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from walsync.engine.errors import (
    RemoteAuthError,
    RemoteRejectedError,
    RemoteSchemaError,
    RemoteUnavailableError,
    SyncError,
    SyncProtocolError,
)
from walsync.engine.record import CODEC_NONE, CODEC_ZSTD
from walsync.engine.versions import Sibling, Version

__all__ = ["PUSH_ARRAYS", "Claim", "NodeStatus", "PullPage", "PushAck", "Transport", "WireBatch",
           "error_for_sqlstate", "head_of", "json_text", "node_status", "pull_page", "push_ack",
           "push_arrays", "state_page", "wire_sibling"]

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


@dataclass(frozen=True)
class PushAck:
    acked_lsn: int
    inserted: int
    merged: int
    head: int
    #: runs whose entries the server refused for an older fencing token:
    #: ``[{"run_id": ..., "current": token}]``
    fenced: list[dict[str, Any]] = field(default_factory=list)
    #: the server's identity (walsync.server), in the answer to a claimed push
    server_id: str | None = None
    #: why a claimed push was refused, nothing of it stored: "taken" (another
    #: incarnation holds the node id) or "behind" (the server lacks entries before
    #: the batch; ``acked_lsn`` is what it holds)
    refused: str | None = None


@dataclass(frozen=True)
class Claim:
    """What a batch is pushed under (``walsync_api.push_claimed``): the incarnation
    token the node id was claimed with (None: an id the store retired, whose LSNs the
    server held before), the LSN below the id's first (``base_lsn``) and the
    acknowledged LSN the batch follows. A batch without one goes to the plain push."""

    incarnation: str | None
    base_lsn: int
    after_lsn: int


@dataclass(frozen=True)
class PullPage:
    entries: list[dict[str, Any]]
    #: the position to pass to the next pull
    next: int
    head: int
    #: the entries decoded, ``(key, Sibling)`` each (decoded here when not given)
    siblings: list[tuple[str, Sibling]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.entries and not self.siblings:
            object.__setattr__(self, "siblings", [wire_sibling(e) for e in self.entries])


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    acked_lsn: int
    acked_hlc: int
    pull_cursor: int
    extra: dict[str, Any] = field(default_factory=dict)


class Transport(Protocol):
    name: str

    def push(self, node_id: str, through_lsn: int, entries: list[dict[str, Any]]) -> PushAck:
        """Ship entries; the server acknowledges every LSN up to ``through_lsn``."""

    def pull(self, node_id: str, after: int, limit: int) -> PullPage:
        """Other origins' entries after position ``after`` (whole records)."""

    def node_status(self, node_id: str) -> NodeStatus: ...

    def head(self) -> int: ...

    def call(self, function: str, args: dict[str, Any]) -> Any:
        """Call any ``walsync_api`` function by name (leases, restore, conflicts)."""

    def close(self) -> None: ...


class RpcTransport(ABC):
    """What both transports do the same way, in terms of their ``call``."""

    @abstractmethod
    def call(self, function: str, args: dict[str, Any]) -> Any:
        """Call ``walsync_api.<function>`` with named arguments; its JSON result."""

    def pull(self, node_id: str, after: int, limit: int) -> PullPage:
        return pull_page(self.call("pull", {"p_node": node_id, "p_after": after,
                                            "p_limit": limit}))

    def node_status(self, node_id: str) -> NodeStatus:
        return node_status(self.call("node_status", {"p_node": node_id}))

    def head(self) -> int:
        return head_of(self.call("head", {}))


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


def _int(doc: dict[Any, Any], name: str, what: str) -> int:
    value = doc.get(name)
    if type(value) is not int or not 0 <= value < _BIGINT:
        raise SyncProtocolError(f"{what}: {name!r} is {_kind(value)}, not a bigint >= 0")
    return value


def _text(doc: dict[Any, Any], name: str, what: str) -> str:
    value = doc.get(name)
    if type(value) is not str or not value:
        raise SyncProtocolError(f"{what}: {name!r} is {_kind(value)}, not a non-empty text")
    return value


def _text_or_null(doc: dict[Any, Any], name: str, what: str) -> str | None:
    return None if doc.get(name) is None else _text(doc, name, what)


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
    for item in fenced:
        run = _object(item, "push: a fenced run")
        _text(run, "run_id", "push: a fenced run")
        _int(run, "current", "push: a fenced run")
        _text_or_null(run, "holder", "push: a fenced run")
    refused = _text_or_null(d, "refused", "push")
    if refused not in (None, "taken", "behind"):
        raise SyncProtocolError(f"push: 'refused' is {refused!r}, not 'taken' or 'behind'")
    return PushAck(_int(d, "acked_lsn", "push"), _int(d, "inserted", "push"),
                   _int(d, "merged", "push"), _int(d, "head", "push"), list(fenced),
                   _text_or_null(d, "server_id", "push"), refused)


def pull_page(doc: Any) -> PullPage:
    d = _object(doc, "pull")
    entries = d.get("entries")
    if type(entries) is not list:
        raise SyncProtocolError(f"pull: 'entries' is {_kind(entries)}, not a list")
    siblings = [wire_sibling(e) for e in entries]
    return PullPage(entries, _int(d, "next", "pull"), _int(d, "head", "pull"), siblings)


def node_status(doc: Any) -> NodeStatus:
    d = _object(doc, "node_status")
    known = {"node_id", "acked_lsn", "acked_hlc", "pull_cursor"}
    return NodeStatus(_text(d, "node_id", "node_status"), _int(d, "acked_lsn", "node_status"),
                      _int(d, "acked_hlc", "node_status"), _int(d, "pull_cursor", "node_status"),
                      {k: v for k, v in d.items() if type(k) is str and k not in known})


def head_of(doc: Any) -> int:
    return _int(_object(doc, "head"), "head", "head")


def state_page(doc: Any) -> dict[str, Any]:
    """A ``state_page`` answer, checked: every row a wire entry (with ``value_hash``
    text or null), ``last_key`` text or null, ``done`` a boolean."""
    d = _object(doc, "state_page")
    rows = d.get("rows")
    if type(rows) is not list:
        raise SyncProtocolError(f"state_page: 'rows' is {_kind(rows)}, not a list")
    for row in rows:
        wire_sibling(row, "state_page")
        _text_or_null(row, "value_hash", "state_page: a row")
    _text_or_null(d, "last_key", "state_page")
    if type(d.get("done")) is not bool:
        raise SyncProtocolError(f"state_page: 'done' is {_kind(d.get('done'))}, not a boolean")
    return d


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


class WireBatch(list[dict[str, Any]]):
    """The wire entries of one push, carrying what a transport encoded of them ahead of
    time (``prepare_push``, called off the pushing thread while the previous batch is in
    flight) so that ``push`` only sends it.

    An encoding is kept with the entries it was made from and used only while the
    batch still holds exactly those objects: a slice or copy is a plain list, and a
    batch whose entries were added, removed or replaced is encoded again. (Entries are
    not to be changed in place once encoded.)
    """

    __slots__ = ("_encoded", "claim")

    def __init__(self, entries: Iterable[dict[str, Any]] = (), claim: Claim | None = None
                 ) -> None:
        super().__init__(entries)
        self._encoded: dict[str, tuple[tuple[dict[str, Any], ...], Any]] = {}
        #: the incarnation the batch is pushed under (travels with the batch through
        #: any wrapper of a transport to the one that sends it)
        self.claim = claim

    def keep(self, transport: str, encoded: Any) -> None:
        self._encoded[transport] = (tuple(self), encoded)

    def kept(self, transport: str) -> Any | None:
        """The transport's encoding of exactly these entries, if it made one."""
        got = self._encoded.get(transport)
        if got is None or len(got[0]) != len(self) or not all(map(operator.is_, got[0], self)):
            return None
        return got[1]


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
