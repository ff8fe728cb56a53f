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
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.errors import (
    RemoteAuthError,
    RemoteRejectedError,
    RemoteSchemaError,
    RemoteUnavailableError,
    SyncError,
)

__all__ = ["PUSH_ARRAYS", "NodeStatus", "PullPage", "PushAck", "Transport", "error_for_sqlstate",
           "json_text", "push_arrays"]

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


@dataclass(frozen=True)
class PullPage:
    entries: list[dict[str, Any]]
    #: the position to pass to the next pull
    next: int
    head: int


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
        return int(self.call("head", {})["head"])


def push_ack(doc: dict[str, Any]) -> PushAck:
    return PushAck(int(doc["acked_lsn"]), int(doc["inserted"]), int(doc["merged"]),
                   int(doc["head"]), list(doc.get("fenced") or []))


def pull_page(doc: dict[str, Any]) -> PullPage:
    return PullPage(list(doc["entries"]), int(doc["next"]), int(doc["head"]))


def node_status(doc: dict[str, Any]) -> NodeStatus:
    known = {"node_id", "acked_lsn", "acked_hlc", "pull_cursor"}
    return NodeStatus(str(doc["node_id"]), int(doc["acked_lsn"]), int(doc["acked_hlc"]),
                      int(doc["pull_cursor"]), {k: v for k, v in doc.items() if k not in known})


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


def _stored_bytes(data: Any) -> bytes | None:
    if data is None or type(data) is bytes:
        return data
    if isinstance(data, str):  # the JSON form of a wire entry
        return base64.b64decode(data, validate=True)
    return bytes(data)


def push_arrays(entries: Sequence[Mapping[str, Any]], *, vv_as_text: bool
                ) -> dict[str, list[Any]]:
    """A batch of wire entries as ``walsync_api.push``'s parallel arrays, in its order.

    ``p_data`` holds bytes (an entry's ``data`` may be bytes or base64 text),
    ``p_value_json`` JSON text, ``p_vv`` JSON text if ``vv_as_text`` else dicts;
    ``p_fence`` defaults to 0. A malformed entry raises RemoteRejectedError.
    """
    try:
        return {
            "p_lsn": [e["lsn"] for e in entries],
            "p_idx": [e.get("idx", 0) for e in entries],
            "p_key": [e["key"] for e in entries],
            "p_deleted": [bool(e["deleted"]) for e in entries],
            "p_data": [_stored_bytes(e.get("data")) for e in entries],
            "p_codec": [e.get("codec") or 0 for e in entries],
            "p_vv": [json_text(vv if type(vv) is dict else dict(vv)) if vv_as_text
                     else (vv if type(vv) is dict else dict(vv))
                     for vv in (e["vv"] for e in entries)],
            "p_hlc": [e["hlc"] for e in entries],
            "p_fence": [e.get("fence") or 0 for e in entries],
            "p_value_hash": [e.get("value_hash") for e in entries],
            "p_value_json": [None if (v := e.get("value_json")) is None else json_text(v)
                             for e in entries],
        }
    except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
        raise RemoteRejectedError(f"push: a wire entry is malformed ({type(exc).__name__}: "
                                  f"{exc})") from None
