"""The merge rules on the client, the Python twin of the SQL functions. Pure.

The rules themselves live in ``engine.versions`` (the local store applies
them to pulled entries); this module converts between the wire form of an
entry and a Sibling, and holds ``Replica``, a key → siblings map that applies
entries exactly as a store and the server do. The shared test vectors
(tests/sync/merge_vectors.json) run against it and against the SQL.

Identical values are recognised by ``value_hash``: XXH3-64 (hex) of the
value's CBOR encoding before compression, so the same value compressed
differently on two hosts still counts once.

Shipping is the hot path: ``record_to_wire`` decodes each stored value at
most once (hash and JSON view) and leaves ``data`` as bytes; the transports
turn a batch into the parallel arrays ``walsync_api.push`` takes.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
import xxhash

from walsync.engine.record import CODEC_NONE, decode_entry, decode_value
from walsync.engine.versions import Sibling, Version, merge_sibling, visible_siblings, winner

__all__ = [
    "JSON_VIEW_MAX_BYTES",
    "Replica",
    "WireEntry",
    "json_view",
    "record_to_wire",
    "sibling_from_wire",
    "sibling_to_wire",
    "value_hash",
]

#: values larger than this (encoded) are not copied into the server's JSON view
JSON_VIEW_MAX_BYTES = 64 * 1024
#: integers the JSON view holds (a bigint's range)
_INT_LIMIT = 2**63

WireEntry = dict[str, Any]


def _raw_value(sib: Sibling) -> bytes | None:
    if sib.data is None:
        return None
    if sib.codec == CODEC_NONE:
        return sib.data
    return cbor2.dumps(decode_value(sib.codec, sib.data))


def value_hash(sib: Sibling) -> str | None:
    raw = _raw_value(sib)
    return None if raw is None else xxhash.xxh3_64_hexdigest(raw)


def _text_ok(text: str) -> bool:
    """A string PostgreSQL's jsonb can hold: no NUL, no lone surrogate."""
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_representable(value: Any, depth: int = 0) -> bool:
    """Whether jsonb holds ``value`` as it is (strings jsonb accepts, integers within a
    bigint, finite floats, string keys). Exact types first: what cbor2 returns."""
    if depth > 64:
        return False
    t = type(value)
    if t is dict:
        if depth == 64:  # its members would be too deep
            return not value
        for k, v in value.items():
            if not isinstance(k, str) or not _text_ok(k):
                return False
            tv = type(v)  # the common leaves inline: no call per field
            if tv is str:
                if not _text_ok(v):
                    return False
            elif tv is int:
                if not -_INT_LIMIT < v < _INT_LIMIT:
                    return False
            elif not (v is None or tv is bool or _json_representable(v, depth + 1)):
                return False
        return True
    if t is list:
        return all(_json_representable(v, depth + 1) for v in value)
    if t is str:
        return _text_ok(value)
    if t is int:
        return bool(-_INT_LIMIT < value < _INT_LIMIT)
    if value is None or t is bool:
        return True
    if t is float:
        return math.isfinite(value)
    # subclasses
    if isinstance(value, str):
        return _text_ok(value)
    if isinstance(value, int):  # bool included
        return abs(value) < _INT_LIMIT
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return _json_representable(dict(value), depth)
    if isinstance(value, list):
        return _json_representable(list(value), depth)
    return False


def json_view(sib: Sibling) -> Any:
    """The value as JSON for the server's table-editor view, or None."""
    if sib.data is None or len(sib.data) > JSON_VIEW_MAX_BYTES:
        return None
    value = decode_value(sib.codec, sib.data)
    return value if _json_representable(value) else None


def _wire(key: str, idx: int, data: bytes | None, codec: int, vv: Mapping[str, int], hlc: int,
          lsn: int, fence: int, *, binary: bool, with_json: bool) -> WireEntry:
    """One wire entry; the stored value is decoded at most once (hash and JSON view)."""
    digest = view = None
    if data is not None:
        if codec == CODEC_NONE:
            digest = xxhash.xxh3_64_hexdigest(data)
            if with_json and len(data) <= JSON_VIEW_MAX_BYTES:
                view = decode_value(codec, data)
        else:
            value = decode_value(codec, data)
            digest = xxhash.xxh3_64_hexdigest(cbor2.dumps(value))
            if with_json and len(data) <= JSON_VIEW_MAX_BYTES:
                view = value
        if view is not None and not _json_representable(view):
            view = None
    return {
        "lsn": lsn,
        "idx": idx,
        "key": key,
        "deleted": data is None,
        "data": data if binary or data is None else base64.b64encode(data).decode(),
        "codec": codec,
        "vv": dict(vv),
        "hlc": hlc,
        "fence": fence,
        "value_hash": digest,
        "value_json": view,
    }


def sibling_to_wire(key: str, idx: int, sib: Sibling, *, with_json: bool = True,
                    binary: bool = False) -> WireEntry:
    """A sibling as a wire entry: ``data`` base64 text (JSON-safe), or bytes if ``binary``."""
    v = sib.version
    return _wire(key, idx, sib.data, sib.codec, v.vv, v.hlc, v.lsn, v.fence, binary=binary,
                 with_json=with_json)


def sibling_from_wire(entry: Mapping[str, Any]) -> Sibling:
    """The Sibling of a wire entry (``data`` base64 text or bytes, with ``origin``)."""
    data = entry.get("data")
    if entry.get("deleted") or data is None:
        raw = None
    elif isinstance(data, str):
        raw = base64.b64decode(data)
    else:
        raw = bytes(data)
    vv = {str(k): int(n) for k, n in entry["vv"].items()}
    version = Version(str(entry["origin"]), int(entry["lsn"]), int(entry["hlc"]), vv,
                      int(entry.get("fence") or 0), raw is None)
    return Sibling(version, int(entry.get("codec") or 0), raw)


def _one_sibling(entry: bytes) -> list[Any]:
    """The fields ``[data, codec, vv, hlc, origin, lsn, fence]`` of an operation's only sibling.

    The shape every local write has is checked here; anything else goes through
    ``decode_entry``, which names the damage.
    """
    try:
        items = cbor2.loads(entry)
    except Exception:  # noqa: BLE001 - decode_entry below reports it
        items = None
    if type(items) is list and len(items) == 1:
        item = items[0]
        if type(item) is list and len(item) == 7:
            data, codec, vv, hlc, origin, lsn, fence = item
            if ((data is None or type(data) is bytes) and type(codec) is int
                    and type(vv) is dict and type(hlc) is int and type(origin) is str
                    and type(lsn) is int and type(fence) is int):
                for k, n in vv.items():
                    if type(k) is not str or type(n) is not int:
                        break
                else:
                    return item
    (sib,) = decode_entry(entry)
    return sib.to_wire()


def record_to_wire(lsn: int, ops: Iterable[list[Any]]) -> list[WireEntry]:
    """The wire entries of one local WAL record (each op's entry holds one sibling).

    A key written twice in one record ships once, with its last value. ``data``
    is bytes (the transports send it as bytea, never as base64).
    """
    if type(ops) is list and len(ops) == 1:
        items = [(0, ops[0][0], ops[0][1])] if ops[0][0] else []
    else:
        last: dict[str, tuple[int, bytes]] = {}
        for idx, (key, entry) in enumerate(ops):
            if key:
                last[key] = (idx, entry)
        items = sorted(((i, k, e) for k, (i, e) in last.items()), key=lambda t: t[0])
    out = []
    for idx, key, entry in items:
        data, codec, vv, hlc, _origin, sib_lsn, fence = _one_sibling(entry)
        out.append(_wire(key, idx, data, codec, vv, hlc, sib_lsn, fence, binary=True,
                         with_json=True))
    return out


@dataclass
class Replica:
    """A key → stored siblings map that merges entries by the shared rules."""

    keys: dict[str, list[Sibling]]

    def __init__(self) -> None:
        self.keys = {}

    def apply(self, key: str, incoming: Sibling) -> bool:
        merged = merge_sibling(self.keys.get(key, []), incoming)
        if merged is None:
            return False
        self.keys[key] = merged
        return True

    def visible(self, key: str) -> list[Sibling]:
        return visible_siblings(self.keys.get(key, []), decode=value_hash)

    def winner(self, key: str) -> Sibling | None:
        sibs = self.keys.get(key)
        return winner(sibs) if sibs else None

    def canonical(self) -> dict[str, list[tuple[str, int]]]:
        """Each key's stored dots, sorted: equal across replicas that converged."""
        return {k: sorted((s.version.origin, s.version.lsn) for s in v)
                for k, v in sorted(self.keys.items())}
