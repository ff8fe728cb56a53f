"""Reading the snapshot: values, versions, ranges, conflicts, and consistent views.

Every read decodes what LMDB holds for a key (its *entry*: the key's siblings,
engine/record.py) and, for values, the winner's bytes. An entry whose checksum
holds but which does not decode was written so, or damaged before it was
sealed: the error names the key and the file, and the way back. The common
single-sibling entry is read without building Sibling objects (``get`` and
``scan`` are hot paths).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cbor2

from .errors import CorruptionError, InvalidKeyError
from .ops import VersionedValue
from .record import CODEC_NONE, decode_entry, decode_value
from .snapshot import SnapshotStore
from .snapshot.conflicts import listed_conflicts
from .snapshot.seal import key_text
from .versions import Sibling, Version, visible_siblings, winner

__all__ = [
    "ReadView",
    "conflicts",
    "count_keys",
    "iter_siblings",
    "key_bytes",
    "prefix_end",
    "scan_in",
    "siblings_of",
    "value_of",
    "versions_of",
]


class ReadView:
    """Reads from one consistent snapshot (see Store.snapshot)."""

    def __init__(self, snapshot: SnapshotStore, txn: Any) -> None:
        self._snapshot = snapshot
        self._txn = txn

    def get(self, key: str, default: Any = None) -> Any:
        raw_key = key_bytes(key)
        snapshot = self._snapshot
        raw = snapshot.entry_in(self._txn, raw_key)
        if raw is None:
            return default
        return value_of(snapshot, raw_key, raw, default)

    def get_version(self, key: str) -> Version | None:
        raw_key = key_bytes(key)
        snapshot = self._snapshot
        raw = snapshot.entry_in(self._txn, raw_key)
        if raw is None:
            return None
        best = winner(siblings_of(snapshot, raw_key, raw))
        return None if best.deleted else best.version

    def get_versions(self, key: str) -> list[VersionedValue]:
        raw_key = key_bytes(key)
        snapshot = self._snapshot
        return versions_of(snapshot, raw_key, snapshot.entry_in(self._txn, raw_key))

    def scan(self, prefix: str = "", *, start: str | None = None, end: str | None = None,
             reverse: bool = False, limit: int | None = None) -> list[tuple[str, Any]]:
        return scan_in(self._snapshot, self._txn, prefix, start, end, reverse, limit,
                       values=True)


def scan_in(
    snapshot: SnapshotStore, txn: Any, prefix: str, start: str | None, end: str | None,
    reverse: bool, limit: int | None, *, values: bool,
) -> list[tuple[str, Any]]:
    """Live keys under ``prefix`` within [start, end) in one read transaction, with
    their values (``values``) or None."""
    lo = key_bytes(prefix, allow_empty=True)
    hi = prefix_end(lo)
    if start is not None and key_bytes(start, allow_empty=True) > lo:
        lo = start.encode()
    if end is not None and (hi is None or key_bytes(end, allow_empty=True) < hi):
        hi = end.encode()
    out: list[tuple[str, Any]] = []
    if limit is not None and limit <= 0:
        return out
    for key, raw in snapshot.iter_range(txn, lo, hi, reverse):
        try:
            codec, data = _winner_data(raw)
            if data is None:
                continue
            out.append((key.decode(), decode_value(codec, data) if values else None))
        except _UNDECODABLE as exc:
            raise _undecodable(snapshot, key, exc) from None
        if limit is not None and len(out) >= limit:
            break
    return out


def iter_siblings(
    snapshot: SnapshotStore, prefix: str, chunk_keys: int
) -> Iterator[tuple[str, list[Sibling]]]:
    """Every key under ``prefix`` with its stored siblings, tombstones included, in
    chunks of ``chunk_keys`` keys, each from one read transaction (not one view)."""
    lo = prefix.encode()
    hi = prefix_end(lo)
    while True:
        with snapshot.read() as txn:
            rows: list[tuple[bytes, bytes]] = []
            for key, raw in snapshot.iter_range(txn, lo, hi, False):
                rows.append((key, raw))
                if len(rows) >= chunk_keys:
                    break
        for key, raw in rows:
            yield key.decode(), siblings_of(snapshot, key, raw)
        if len(rows) < chunk_keys:
            return
        lo = rows[-1][0] + b"\x00"


def conflicts(
    snapshot: SnapshotStore, prefix: str, limit: int | None
) -> list[tuple[str, list[VersionedValue]]]:
    """Keys under ``prefix`` in conflict (several visible values), in key order, from
    the snapshot's table of keys holding several siblings: the cost follows the
    conflicts, not the store's size."""
    lo = key_bytes(prefix, allow_empty=True)
    hi = prefix_end(lo)
    out: list[tuple[str, list[VersionedValue]]] = []
    if limit is not None and limit <= 0:
        return out
    with snapshot.read() as txn:
        for key, raw in listed_conflicts(snapshot, txn, lo, hi):
            versions = versions_of(snapshot, key, raw)
            if len(versions) > 1:  # not siblings that hold one value
                out.append((key.decode(), versions))
                if limit is not None and len(out) >= limit:
                    break
    return out


def count_keys(snapshot: SnapshotStore, prefix: str) -> int:
    """Keys under ``prefix``, tombstones included, counted without decoding entries."""
    if not prefix:
        return snapshot.count()
    lo = prefix.encode()
    hi = prefix_end(lo)
    with snapshot.read() as txn:
        return sum(1 for _ in snapshot.iter_range(txn, lo, hi, False))


def versions_of(snapshot: SnapshotStore, key: bytes, raw: bytes | None) -> list[VersionedValue]:
    """Every visible sibling of an entry (tombstones have value None), winner last."""
    if raw is None:
        return []
    try:
        return [
            VersionedValue(None if s.data is None else decode_value(s.codec, s.data), s.version)
            for s in visible_siblings(decode_entry(raw), decode=_plain_bytes)
        ]
    except _UNDECODABLE as exc:
        raise _undecodable(snapshot, key, exc) from None


def value_of(snapshot: SnapshotStore, key: bytes, raw: bytes, default: Any) -> Any:
    """The winning value of an entry (``default`` for a tombstone)."""
    try:
        codec, data = _winner_data(raw)
        return default if data is None else decode_value(codec, data)
    except _UNDECODABLE as exc:
        raise _undecodable(snapshot, key, exc) from None


def siblings_of(snapshot: SnapshotStore, key: bytes, raw: bytes) -> list[Sibling]:
    try:
        return decode_entry(raw)
    except CorruptionError as exc:
        raise _undecodable(snapshot, key, exc) from None


def key_bytes(key: str, *, allow_empty: bool = False) -> bytes:
    if not isinstance(key, str):
        raise InvalidKeyError(f"key {key!r} is not a string but {type(key).__name__}")
    if not key and not allow_empty:
        raise InvalidKeyError("key is empty")
    try:
        return key.encode()
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r} is not valid UTF-8: {exc.reason}") from None


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


#: what decoding an entry or a value may raise when its bytes are not what a store
#: writes (cbor2 raises several kinds, not all of them its own)
_UNDECODABLE: tuple[type[BaseException], ...] = (
    CorruptionError, cbor2.CBORDecodeError, ValueError, TypeError, LookupError,
    ArithmeticError, RecursionError,
)


def _undecodable(snapshot: SnapshotStore, key: bytes, exc: BaseException) -> CorruptionError:
    """An entry whose checksum holds but which does not decode: written so, or
    damaged before it was sealed; the error names the key and the file."""
    why = str(exc) if isinstance(exc, CorruptionError) else f"{type(exc).__name__}: {exc}"
    return CorruptionError(
        f"snapshot entry of key {key_text(key)} does not decode ({why})",
        path=snapshot.data_file,
        hint="it holds what was written (its checksum matches): overwrite or delete the key, "
        "or bring it back from the sync server (`walsync restore --to NEW --prefix KEY`, then "
        "`walsync export` it there and `walsync import` it here)",
    )


def _plain_bytes(sib: Sibling) -> tuple[bool, bytes | None]:
    """A sibling's identity for collapsing: its value's bytes before compression."""
    if sib.data is None or sib.codec == CODEC_NONE:
        return sib.data is None, sib.data
    return False, cbor2.dumps(decode_value(sib.codec, sib.data))


def _winner_data(raw: bytes) -> tuple[int, bytes | None]:
    """(codec, data) of an entry's winner; the common single-sibling entry is read
    without building Sibling objects (a read hot path: get and scan)."""
    items = cbor2.loads(raw)
    if type(items) is list and len(items) == 1 and type(items[0]) is list and len(items[0]) == 7:
        data, codec = items[0][0], items[0][1]
        if (data is None or type(data) is bytes) and type(codec) is int:
            return codec, data
    best = winner(decode_entry(raw))
    return best.codec, best.data
