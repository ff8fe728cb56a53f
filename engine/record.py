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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import xxhash
import zstandard

from .errors import CapacityError, CorruptionError, FormatVersionError
from .versions import Sibling

__all__ = [
    "CODEC_NONE",
    "CODEC_ZSTD",
    "FRAME_HEADER_BYTES",
    "FRAME_MAGIC",
    "FRAME_MAGIC_OFFSET",
    "FRAME_VERSION",
    "KIND_LOCAL",
    "KIND_MERGE",
    "MAX_PAYLOAD_BYTES",
    "SEGMENT_HEADER_BYTES",
    "SEGMENT_MAGIC",
    "SEGMENT_VERSION",
    "SPLIT_VALUE_BYTES",
    "Frame",
    "FrameStatus",
    "compress_value",
    "decode_entry",
    "decode_frame",
    "decode_payload",
    "decode_segment_header",
    "decode_value",
    "encode_entry",
    "encode_entry_parts",
    "encode_frame",
    "encode_frame_parts",
    "encode_payload",
    "encode_payload_parts",
    "encode_segment_header",
    "join_parts",
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


def _check_payload_size(size: int) -> None:
    if size > MAX_PAYLOAD_BYTES:
        # decode_frame takes such a frame for damage: writing it would lose the record
        raise CapacityError(
            f"record payload is {size} bytes, above the frame limit of "
            f"{MAX_PAYLOAD_BYTES} bytes; nothing was written",
            hint="commit fewer or smaller values per record",
        )


def encode_frame(lsn: int, synced_lsn: int, payload: bytes) -> bytes:
    """Header and payload; the checksum covers every byte after itself."""
    _check_payload_size(len(payload))
    prefix = _FRAME_PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, 0, len(payload), lsn, synced_lsn)
    if len(payload) <= 65536:
        body = prefix + payload
        return _U64.pack(_xxh3(body)) + body
    h = xxhash.xxh3_64(prefix)
    h.update(payload)
    return b"".join((_U64.pack(h.intdigest()), prefix, payload))


def encode_frame_parts(lsn: int, synced_lsn: int, payload: Sequence[bytes]) -> list[bytes]:
    """The frame of a payload given in parts, as buffers for ``writev``: the
    header, then the parts themselves (hashed in place, not copied). The same
    bytes as ``encode_frame(lsn, synced_lsn, b"".join(payload))``."""
    size = sum(len(p) for p in payload)
    _check_payload_size(size)
    prefix = _FRAME_PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, 0, size, lsn, synced_lsn)
    h = xxhash.xxh3_64(prefix)
    for part in payload:
        h.update(part)
    return [_U64.pack(h.intdigest()) + prefix, *payload]


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


#: a value at least this large is not copied into the record's encodings: the
#: entry and the payload keep it as a separate buffer (see encode_entry_parts)
SPLIT_VALUE_BYTES = 1 << 16

#: one sibling, a 7-element array, whose first element is an empty byte string
_ONE_SIBLING_EMPTY_DATA = b"\x81\x87\x40"


def _cbor_head(major: int, length: int) -> bytes:
    """A CBOR item head, in the shortest form (as cbor2 writes it)."""
    if length < 24:
        return bytes((major << 5 | length,))
    if length < 1 << 8:
        return bytes((major << 5 | 24, length))
    if length < 1 << 16:
        return bytes((major << 5 | 25,)) + length.to_bytes(2, "big")
    if length < 1 << 32:
        return bytes((major << 5 | 26,)) + length.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + length.to_bytes(8, "big")


def encode_entry_parts(siblings: list[Sibling]) -> bytes | list[bytes]:
    """:func:`encode_entry`'s bytes; for one sibling with a large value, as
    ``[head, value, tail]`` so that the value's bytes are not copied."""
    if len(siblings) != 1:
        return encode_entry(siblings)
    data = siblings[0].data
    if data is None or len(data) < SPLIT_VALUE_BYTES:
        return encode_entry(siblings)
    wire = siblings[0].to_wire()
    wire[0] = b""
    empty = cbor2.dumps([wire])
    assert empty.startswith(_ONE_SIBLING_EMPTY_DATA)
    return [b"\x81\x87" + _cbor_head(2, len(data)), data, empty[3:]]


def encode_payload_parts(
    kind: int, hlc: int, ops: Sequence[tuple[str, bytes | list[bytes]]]
) -> bytes | list[bytes]:
    """:func:`encode_payload`'s bytes, with entries given in parts (see
    :func:`encode_entry_parts`) kept as separate buffers: a list of parts when
    there is one, else plain bytes."""
    if all(isinstance(entry, bytes) for _key, entry in ops):
        return encode_payload(kind, hlc, [[key, entry] for key, entry in ops])
    out: list[bytes] = []
    cur = bytearray(b"\x83")
    cur += cbor2.dumps(kind)
    cur += cbor2.dumps(hlc)
    cur += _cbor_head(4, len(ops))
    for key, entry in ops:
        cur += b"\x82"
        cur += cbor2.dumps(key)
        if isinstance(entry, bytes):
            cur += _cbor_head(2, len(entry))
            cur += entry
            continue
        cur += _cbor_head(2, sum(len(p) for p in entry))
        for piece in entry[:-2]:
            cur += piece
        out.append(bytes(cur))
        out.append(entry[-2])  # the value: not copied
        cur = bytearray(entry[-1])
    out.append(bytes(cur))
    return out


def join_parts(buffer: bytes | list[bytes]) -> bytes:
    """The bytes of a buffer that may be given in parts."""
    return buffer if isinstance(buffer, bytes) else b"".join(buffer)


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
