"""The merge rules on the client, the Python twin of the SQL functions. Pure.

The rules themselves live in ``engine.versions`` (the local store applies
them to pulled entries); this module converts between the wire form of an
entry and a Sibling, and holds ``Replica``, a key → siblings map that applies
entries exactly as a store and the server do. The shared test vectors
(tests/sync/merge_vectors.json) run against it and against the SQL.

Identical values are recognised by ``value_hash``: XXH3-64 (hex) of the
value's CBOR encoding before compression, so the same value compressed
differently on two hosts still counts once.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
import xxhash

from engine.record import CODEC_NONE, decode_entry, decode_value
from engine.versions import Sibling, Version, merge_sibling, visible_siblings, winner

__all__ = [
    "Replica",
    "WireEntry",
    "json_view",
    "sibling_from_wire",
    "sibling_to_wire",
    "value_hash",
]

#: values larger than this (encoded) are not copied into the server's JSON view
JSON_VIEW_MAX_BYTES = 64 * 1024

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


def _json_representable(value: Any, depth: int = 0) -> bool:
    if depth > 64:
        return False
    if value is None or isinstance(value, bool | int | str):
        return not isinstance(value, int) or abs(value) < 2**63
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_representable(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_representable(v, depth + 1)
                   for k, v in value.items())
    return False


def json_view(sib: Sibling) -> Any:
    """The value as JSON for the server's table-editor view, or None."""
    if sib.data is None or len(sib.data) > JSON_VIEW_MAX_BYTES:
        return None
    value = decode_value(sib.codec, sib.data)
    return value if _json_representable(value) else None


def sibling_to_wire(key: str, idx: int, sib: Sibling, *, with_json: bool = True) -> WireEntry:
    v = sib.version
    return {
        "lsn": v.lsn,
        "idx": idx,
        "key": key,
        "deleted": sib.data is None,
        "data": None if sib.data is None else base64.b64encode(sib.data).decode(),
        "codec": sib.codec,
        "vv": dict(v.vv),
        "hlc": v.hlc,
        "fence": v.fence,
        "value_hash": value_hash(sib),
        "value_json": json_view(sib) if with_json else None,
    }


def sibling_from_wire(entry: Mapping[str, Any]) -> Sibling:
    data = entry.get("data")
    raw = None if entry.get("deleted") or data is None else base64.b64decode(data)
    vv = {str(k): int(n) for k, n in entry["vv"].items()}
    version = Version(str(entry["origin"]), int(entry["lsn"]), int(entry["hlc"]), vv,
                      int(entry.get("fence") or 0), raw is None)
    return Sibling(version, int(entry.get("codec") or 0), raw)


def record_to_wire(lsn: int, ops: Iterable[list[Any]]) -> list[WireEntry]:
    """The wire entries of one local WAL record (each op's entry holds one sibling).

    A key written twice in one record ships once, with its last value.
    """
    last: dict[str, tuple[int, bytes]] = {}
    for idx, (key, entry) in enumerate(ops):
        if key:
            last[key] = (idx, entry)
    out = []
    for key, (idx, entry) in sorted(last.items(), key=lambda kv: kv[1][0]):
        (sib,) = decode_entry(entry)
        out.append(sibling_to_wire(key, idx, sib))
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
