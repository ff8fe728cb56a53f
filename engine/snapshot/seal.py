"""The snapshot's sealed values and the names of its tables and metadata entries.

Every value in both LMDB tables is *sealed*: an XXH3-64 checksum of the entry,
seeded with the checksum of its key, precedes the entry's bytes (FORMAT.md,
snapshot format 2). LMDB checks nothing of what it stores, and a flipped bit
in a page would otherwise come back as another value, or the value of another
key. The snapshot, verify, repair and the base all read and write values
through this codec.
"""

from __future__ import annotations

import struct

import xxhash

__all__ = [
    "APPLIED_LSN_NAME",
    "CONFLICTS_BUILT_NAME",
    "CONFLICTS_DB",
    "DATA_DB",
    "FORMAT_NAME",
    "HLC_NAME",
    "META_DB",
    "META_OP_PREFIX",
    "REPAIR_HINT",
    "SEAL_BYTES",
    "SNAPSHOT_FORMAT_VERSION",
    "entry_checksum",
    "holds_siblings",
    "key_text",
    "pack_seal",
    "seal",
    "unpack_seal",
    "unseal",
    "xxh3",
]

#: the snapshot format this code writes and reads (FORMAT.md, "Snapshot entry")
SNAPSHOT_FORMAT_VERSION = 2

DATA_DB = b"data"
META_DB = b"meta"
#: the keys whose entry holds more than one sibling (value: empty), kept in the
#: transaction that writes the entry: listing conflicts costs what they are
CONFLICTS_DB = b"conflicts"

#: meta entry: the LSN of the last record applied (written with the data it covers)
APPLIED_LSN_NAME = b"applied_lsn"
#: meta entry: the highest HLC applied
HLC_NAME = b"hlc"
#: meta entry holding the snapshot format (absent: format 1, values unsealed)
FORMAT_NAME = b"format"
#: meta entry: the conflicts table covers every entry (absent: a snapshot written
#: before the table existed; its next writer's open builds it)
CONFLICTS_BUILT_NAME = b"conflicts_built"
#: meta-table names set by records' meta ops start with this
META_OP_PREFIX = b"record/"

#: a sealed value: this checksum, then the entry
_SEAL = struct.Struct("<Q")
SEAL_BYTES = _SEAL.size
#: the codec's parts, for the hot paths that inline it (a commit's apply, every read)
pack_seal = _SEAL.pack
unpack_seal = _SEAL.unpack_from
xxh3 = xxhash.xxh3_64_intdigest

#: what to do about a damaged snapshot entry
REPAIR_HINT = (
    "run `walsync verify` to list the damage, then `walsync repair`: it rebuilds the "
    "snapshot from its base copy and the WAL, and names any key it cannot rebuild "
    "(bring those back from the sync server: `walsync restore --to NEW --prefix KEY`, "
    "then `walsync export` there and `walsync import` here)"
)


def entry_checksum(key: bytes, entry: bytes | memoryview) -> int:
    """The checksum that seals ``entry`` under ``key``: XXH3-64 of the entry, seeded
    with XXH3-64 of the key, so an entry read under another key fails it too."""
    return xxh3(entry, xxh3(key))


def seal(key: bytes, entry: bytes | list[bytes]) -> bytes:
    """The value LMDB stores for ``entry`` (given whole, or in parts that are
    hashed in place and joined once)."""
    if isinstance(entry, bytes):
        return pack_seal(xxh3(entry, xxh3(key))) + entry
    h = xxhash.xxh3_64(seed=xxh3(key))
    for part in entry:
        h.update(part)
    return b"".join([pack_seal(h.intdigest()), *entry])


def unseal(key: bytes, raw: bytes | memoryview) -> bytes | None:
    """The entry a sealed value holds, or None if its checksum does not match."""
    if len(raw) < SEAL_BYTES:
        return None
    entry = bytes(raw[SEAL_BYTES:])
    if unpack_seal(raw)[0] != xxh3(entry, xxh3(key)):
        return None
    return entry


def key_text(key: bytes) -> str:
    """A key as an error message names it."""
    try:
        return repr(key.decode())
    except UnicodeDecodeError:
        return repr(key)


def holds_siblings(entry: bytes | list[bytes]) -> bool:
    """Whether an entry holds more than one sibling, from its CBOR array head alone
    (0x80 + n for n < 24; an entry in parts is a single sibling's)."""
    return type(entry) is bytes and entry[:1] not in (b"\x80", b"\x81")
