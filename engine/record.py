"""Frames, record payloads, snapshot entries and value codecs. Pure, no I/O.

The byte layouts are specified in FORMAT.md beside this file; the constants
here are checked against it by a test.

A *frame* is one record on disk: a 32-byte header and a CBOR payload. The
payload of a local commit lists ``[key, entry]`` pairs where ``entry`` is the
exact byte string the LMDB snapshot stores for that key, so replay is a
decode and a put, with no re-encoding.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

import cbor2
import xxhash
import zstandard

from .errors import CapacityError, CorruptionError, FormatVersionError
from .versions import Sibling

__all__ = [
    "FRAME_HEADER_BYTES",
    "FRAME_MAGIC",
    "FRAME_VERSION",
    "SEGMENT_HEADER_BYTES",
    "SEGMENT_MAGIC",
    "SEGMENT_VERSION",
    "Frame",
    "FrameStatus",
    "decode_entry",
    "decode_frame",
    "decode_payload",
    "decode_segment_header",
    "decode_value",
    "encode_entry",
    "encode_frame",
    "encode_payload",
    "encode_segment_header",
]

SEGMENT_MAGIC = b"walsync\x00"
SEGMENT_VERSION = 1
SEGMENT_HEADER_BYTES = 32
_SEGMENT_HEADER = struct.Struct("<8sHHIQ")  # magic, version, header bytes, reserved, first LSN

FRAME_MAGIC = b"\xd7\x5a"
FRAME_VERSION = 1
FRAME_HEADER_BYTES = 32
#: after the leading 8-byte checksum: magic, version, flags, payload bytes, LSN, synced LSN
_FRAME_PREFIX = struct.Struct("<2sBBIQQ")
#: where the magic sits inside a frame (a scanner resynchronising looks for it)
FRAME_MAGIC_OFFSET = 8
_U64 = struct.Struct("<Q")
_FRAME_HEADER = struct.Struct("<Q2sBBIQQ")
#: no single frame may claim more payload than this (a damaged length field
#: must not make a reader allocate gigabytes)
MAX_PAYLOAD_BYTES = 1 << 31

KIND_LOCAL = 0
KIND_MERGE = 1

CODEC_NONE = 0
CODEC_ZSTD = 1

_xxh3 = xxhash.xxh3_64_intdigest


def encode_segment_header(first_lsn: int) -> bytes:
    head = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, SEGMENT_HEADER_BYTES, 0, first_lsn)
    return head + _U64.pack(_xxh3(head))


def decode_segment_header(buf: bytes, path: str, lsn: int | None = None) -> int:
    """The first LSN of a segment; raises CorruptionError / FormatVersionError.

    ``lsn`` (the first LSN the file name promises) is named in the errors.
    """
    if len(buf) < SEGMENT_HEADER_BYTES:
        raise CorruptionError("segment header is incomplete", path=path, offset=0, lsn=lsn)
    head = buf[:24]
    magic, version, header_bytes, _reserved, first_lsn = _SEGMENT_HEADER.unpack(head)
    (checksum,) = _U64.unpack_from(buf, 24)
    if magic != SEGMENT_MAGIC:
        raise CorruptionError(
            "not a walsync WAL segment (bad magic)", path=path, offset=0, lsn=lsn
        )
    if checksum != _xxh3(head):
        raise CorruptionError("segment header checksum mismatch", path=path, offset=0, lsn=lsn)
    if version != SEGMENT_VERSION or header_bytes != SEGMENT_HEADER_BYTES:
        raise FormatVersionError(
            f"WAL segment format version {version} is not supported by this walsync, "
            f"which reads version {SEGMENT_VERSION}",
            path=path,
            offset=0,
            lsn=lsn,
        )
    return int(first_lsn)


def encode_frame(lsn: int, synced_lsn: int, payload: bytes) -> bytes:
    """Header and payload; the checksum covers every byte after itself."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        # decode_frame takes such a frame for damage: writing it would lose the record
        raise CapacityError(
            f"record payload is {len(payload)} bytes, above the frame limit of "
            f"{MAX_PAYLOAD_BYTES} bytes; nothing was written",
            hint="commit fewer or smaller values per record",
        )
    prefix = _FRAME_PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, 0, len(payload), lsn, synced_lsn)
    if len(payload) <= 65536:
        body = prefix + payload
        return _U64.pack(_xxh3(body)) + body
    h = xxhash.xxh3_64(prefix)
    h.update(payload)
    return b"".join((_U64.pack(h.intdigest()), prefix, payload))


class FrameStatus:
    OK = 0
    INCOMPLETE = 1  # the buffer ends inside the frame
    BAD = 2  # magic, length or checksum wrong


@dataclass(slots=True)
class Frame:
    lsn: int
    synced_lsn: int
    offset: int
    size: int  # header + payload bytes
    payload: bytes


def decode_frame(buf: bytes | memoryview, offset: int, path: str = "") -> tuple[int, Frame | None]:
    """Decode the frame at ``offset``: (FrameStatus, Frame or None).

    A frame whose checksum holds but whose version is unknown raises
    FormatVersionError: it is intact data from another version, not damage.
    """
    end = len(buf)
    if end - offset < FRAME_HEADER_BYTES:
        return FrameStatus.INCOMPLETE, None
    checksum, magic, version, _flags, length, lsn, synced = _FRAME_HEADER.unpack_from(buf, offset)
    if magic != FRAME_MAGIC or length > MAX_PAYLOAD_BYTES:
        return FrameStatus.BAD, None
    stop = offset + FRAME_HEADER_BYTES + length
    if stop > end:
        return FrameStatus.INCOMPLETE, None
    view = memoryview(buf)
    if _xxh3(view[offset + 8 : stop]) != checksum:
        return FrameStatus.BAD, None
    if version != FRAME_VERSION:
        raise FormatVersionError(
            f"WAL frame format version {version} is not supported by this walsync, "
            f"which reads version {FRAME_VERSION}",
            path=path,
            offset=offset,
            lsn=lsn,
        )
    payload = bytes(view[offset + FRAME_HEADER_BYTES : stop])
    return FrameStatus.OK, Frame(lsn, synced, offset, FRAME_HEADER_BYTES + length, payload)


def encode_payload(kind: int, hlc: int, ops: list[list[Any]]) -> bytes:
    """A record's payload: ``[kind, hlc, [[key, entry], ...]]``."""
    return cbor2.dumps([kind, hlc, ops])


def decode_payload(payload: bytes, path: str = "", offset: int = 0, lsn: int = 0) -> tuple[
    int, int, list[tuple[str, bytes]]
]:
    """Decode and check a payload's shape; damage raises CorruptionError."""
    try:
        record = cbor2.loads(payload)
        if not isinstance(record, list) or len(record) != 3:
            raise ValueError("not a [kind, hlc, ops] array")
        kind, hlc, ops = record
        if kind not in (KIND_LOCAL, KIND_MERGE) or not isinstance(hlc, int):
            raise ValueError("bad record kind or HLC")
        if not isinstance(ops, list):
            raise ValueError("operations are not an array")
        for op in ops:
            if not isinstance(op, list) or len(op) != 2:
                raise ValueError("bad operation")
            key, entry = op
            if not isinstance(key, str) or not isinstance(entry, bytes):
                raise ValueError("bad operation")
    except (ValueError, TypeError, cbor2.CBORDecodeError, RecursionError) as exc:
        raise CorruptionError(
            f"record payload does not decode: {exc}", path=path, offset=offset, lsn=lsn
        ) from None
    return kind, hlc, ops


def encode_entry(siblings: list[Sibling]) -> bytes:
    """The snapshot's value for a key: its stored siblings."""
    return cbor2.dumps([s.to_wire() for s in siblings])


def decode_entry(entry: bytes) -> list[Sibling]:
    """The siblings of a snapshot entry; damage raises CorruptionError."""
    try:
        items = cbor2.loads(entry)
        if not isinstance(items, list):
            raise ValueError("not an array of siblings")
        for item in items:
            if not isinstance(item, list) or len(item) != 7:
                raise ValueError("a sibling is not a 7-element array")
            data, codec, vv, hlc, origin, lsn, fence = item
            if not (
                (data is None or isinstance(data, bytes))
                and isinstance(codec, int)
                and isinstance(vv, dict)
                and all(isinstance(k, str) and isinstance(v, int) for k, v in vv.items())
                and isinstance(hlc, int)
                and isinstance(origin, str)
                and isinstance(lsn, int)
                and isinstance(fence, int)
            ):
                raise ValueError("a sibling field has the wrong type")
    except (ValueError, TypeError, cbor2.CBORDecodeError, RecursionError) as exc:
        raise CorruptionError(f"snapshot entry does not decode: {exc}") from None
    return [Sibling.from_wire(item) for item in items]


_compressor = zstandard.ZstdCompressor
#: zstandard contexts are not thread-safe: a shared one, used by reader threads
#: at once, returns wrong bytes. One decompressor per thread.
_local = threading.local()
#: compression is tried on a sample first: a value whose first 64 KiB do not
#: shrink by an eighth is stored as it is (random or already-compressed bytes)
_SAMPLE_BYTES = 65536


def compress_value(encoded: bytes, level: int) -> tuple[int, bytes]:
    """(codec, bytes) for an encoded value already above the threshold."""
    cctx = _compressor(level=level)
    if len(encoded) > 2 * _SAMPLE_BYTES:
        sample = encoded[:_SAMPLE_BYTES]
        if len(cctx.compress(sample)) > _SAMPLE_BYTES - _SAMPLE_BYTES // 8:
            return CODEC_NONE, encoded
    packed = cctx.compress(encoded)
    if len(packed) >= len(encoded) - len(encoded) // 8:
        return CODEC_NONE, encoded
    return CODEC_ZSTD, packed


def decode_value(codec: int, data: bytes) -> Any:
    """A stored value; damage raises CorruptionError."""
    try:
        if codec == CODEC_ZSTD:
            # the header's content size is what decompress allocates: check it first
            size = zstandard.frame_content_size(data)
            if size < 0 or size > MAX_PAYLOAD_BYTES:
                raise ValueError(f"zstd frame declares a content size of {size}")
            dctx = getattr(_local, "dctx", None)
            if dctx is None:
                dctx = _local.dctx = zstandard.ZstdDecompressor()
            data = dctx.decompress(data)
        elif codec != CODEC_NONE:
            raise ValueError(f"unknown value codec {codec}")
        return cbor2.loads(data)
    except (ValueError, TypeError, zstandard.ZstdError, cbor2.CBORDecodeError,
            RecursionError) as exc:
        raise CorruptionError(f"stored value does not decode: {exc}") from None
