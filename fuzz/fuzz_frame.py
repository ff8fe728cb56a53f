"""Fuzz target: ``engine.record.decode_frame`` on arbitrary bytes at arbitrary offsets.

Contract: decode_frame returns ``(FrameStatus, Frame | None)`` or raises a
``WalsyncError`` (in practice only ``FormatVersionError``, for an intact frame
of another version); any other exception is a bug. On top of that the target
checks what a result means:

* OK comes with a Frame that lies inside the buffer and re-encodes to the
  same bytes (flags aside: version 1 does not interpret them);
* INCOMPLETE only when the buffer really ends inside the frame;
* bytes and memoryview inputs decode alike;
* once the checksum is made right (the target patches it), a frame with the
  magic and a length that fits must decode OK, or raise FormatVersionError
  when its version is not 1: a checksum-valid frame is never "damage".

Run: ``python fuzz/fuzz_frame.py -max_total_time=600 /tmp/frame-corpus fuzz/corpus/frame``
"""

from __future__ import annotations

import struct

from _harness import engine_imports, magic_offsets, run

with engine_imports(__name__ == "__main__"):
    import xxhash

    from walsync.engine.errors import FormatVersionError, WalsyncError
    from walsync.engine.record import (
        FRAME_HEADER_BYTES,
        FRAME_MAGIC,
        FRAME_MAGIC_OFFSET,
        FRAME_VERSION,
        MAX_PAYLOAD_BYTES,
        FrameStatus,
        decode_frame,
        encode_frame,
    )

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _decode(buf: bytes | memoryview, offset: int) -> tuple[int, object] | WalsyncError:
    try:
        return decode_frame(buf, offset, "fuzz.wal")
    except WalsyncError as exc:
        return exc


def check_at(buf: bytes, offset: int) -> int | None:
    """Decode at ``offset`` and check the result; the status, or None if it raised."""
    result = _decode(buf, offset)
    again = _decode(memoryview(buf), offset)
    if isinstance(result, WalsyncError):
        assert type(again) is type(result), (result, again)
        if isinstance(result, FormatVersionError):
            assert buf[offset + 10] != FRAME_VERSION, "FormatVersionError for version 1"
        return None
    status, frame = result
    assert not isinstance(again, WalsyncError)
    assert again[0] == status, (status, again)
    assert status in (FrameStatus.OK, FrameStatus.INCOMPLETE, FrameStatus.BAD), status
    assert (status == FrameStatus.OK) == (frame is not None), (status, frame)
    if status == FrameStatus.INCOMPLETE:
        remaining = len(buf) - offset
        assert remaining < FRAME_HEADER_BYTES or (
            FRAME_HEADER_BYTES + _U32.unpack_from(buf, offset + 12)[0] > remaining
        ), "INCOMPLETE for a frame that fits"
    if frame is not None:
        assert again[1] == frame
        assert frame.offset == offset
        assert frame.size == FRAME_HEADER_BYTES + len(frame.payload)
        assert offset + frame.size <= len(buf)
        stored = bytearray(buf[offset : offset + frame.size])
        assert stored[10] == FRAME_VERSION
        encoded = encode_frame(frame.lsn, frame.synced_lsn, frame.payload)
        if stored[11] == 0:
            assert encoded == stored, "an OK frame does not re-encode to its bytes"
        else:
            assert encoded[8:11] + encoded[12:] == stored[8:11] + stored[12:]
    return status


def with_checksum(buf: bytes, offset: int) -> bytes | None:
    """``buf`` with the frame checksum at ``offset`` made right, if the frame fits."""
    if len(buf) - offset < FRAME_HEADER_BYTES:
        return None
    (length,) = _U32.unpack_from(buf, offset + 12)
    stop = offset + FRAME_HEADER_BYTES + length
    if stop > len(buf):
        return None
    digest = xxhash.xxh3_64_intdigest(buf[offset + 8 : stop])
    return buf[:offset] + _U64.pack(digest) + buf[offset + 8 :]


def test_one_input(data: bytes) -> None:
    n = len(data)
    offsets = {0, 1, max(0, n - FRAME_HEADER_BYTES), n, n + 7}
    offsets.update(magic_offsets(data, FRAME_MAGIC, FRAME_MAGIC_OFFSET))
    for offset in sorted(offsets):
        check_at(data, offset)
        fixed = with_checksum(data, offset)
        if fixed is None:
            continue
        status = check_at(fixed, offset)
        (length,) = _U32.unpack_from(fixed, offset + 12)
        intact = fixed[offset + 8 : offset + 10] == FRAME_MAGIC and length <= MAX_PAYLOAD_BYTES
        if not intact:
            assert status == FrameStatus.BAD, status
        elif fixed[offset + 10] == FRAME_VERSION:
            assert status == FrameStatus.OK, f"checksum-valid frame decoded as {status}"
        else:
            assert status is None, "checksum-valid frame of another version not refused"


if __name__ == "__main__":
    run(test_one_input)
