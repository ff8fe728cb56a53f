"""Fuzz target: ``engine.export.ExportReader`` (the reader behind ``walsync import``).

Contract: reading arbitrary bytes as an export yields records and a summary,
or raises ``ExportFormatError`` naming the file and an offset inside it; any
other exception (a cbor2 error, a struct.error, a KeyError from a wrongly
shaped header, ...) is a bug in the reader. On top of that, for a file that
reads cleanly:

* the summary agrees with what was yielded: record, key and value-byte counts,
  keys in order, the file's size, the checksum in its last 8 bytes;
* every value decodes, and every sibling's fields have their wire types;
* re-encoding the header and records (ExportWriter) gives a file that reads
  back to the same header, records and counts.

Each input is read as found and with every checksum made right (the header's,
each frame's and the whole file's, see :func:`fix_checksums`), so mutations
reach the decoding behind the checksums.

Run: ``python fuzz/fuzz_export.py -max_total_time=600 /tmp/export-corpus fuzz/corpus/export``
"""

from __future__ import annotations

import io
import struct

from _harness import engine_imports, run

with engine_imports(__name__ == "__main__"):
    import xxhash

    from walsync.engine.errors import ExportFormatError, WalsyncError
    from walsync.engine.export import (
        EXPORT_MAGIC,
        FRAME_HEADER_BYTES,
        HEADER_PREFIX_BYTES,
        KIND_TRAILER,
        ExportReader,
        ExportWriter,
    )
    from walsync.engine.record import decode_value
    from walsync.engine.versions import Sibling

NAME = "fuzz.wsx"
_U64 = struct.Struct("<Q")


def fix_checksums(data: bytes) -> bytes:
    """``data`` with the header, frame and whole-file checksums made right, as far as
    its size fields let the layout be followed."""
    out = bytearray(data)
    if len(out) < HEADER_PREFIX_BYTES or not out.startswith(EXPORT_MAGIC):
        return bytes(out)
    (body,) = struct.unpack_from("<I", out, 12)
    pos = HEADER_PREFIX_BYTES + body
    if pos + 8 > len(out):
        return bytes(out)
    out[pos : pos + 8] = _U64.pack(xxhash.xxh3_64_intdigest(bytes(out[:pos])))
    pos += 8
    while pos + FRAME_HEADER_BYTES <= len(out):
        kind = out[pos + 8]
        (length,) = struct.unpack_from("<I", out, pos + 12)
        stop = pos + FRAME_HEADER_BYTES + length
        if stop > len(out):
            return bytes(out)
        out[pos : pos + 8] = _U64.pack(xxhash.xxh3_64_intdigest(bytes(out[pos + 8 : stop])))
        pos = stop
        if kind == KIND_TRAILER:
            break
    if pos + 8 <= len(out):
        out[pos : pos + 8] = _U64.pack(xxhash.xxh3_64_intdigest(bytes(out[:pos])))
    return bytes(out)


def read(data: bytes) -> tuple[object, list[tuple[str, Sibling]], object] | None:
    """(header, records, summary) of a clean read, None after an ExportFormatError."""
    error: WalsyncError | None = None
    try:
        reader = ExportReader(io.BytesIO(data), name=NAME, size=len(data))
        records = list(reader.records())
    except WalsyncError as exc:
        error = exc
    if error is not None:
        assert isinstance(error, ExportFormatError), repr(error)
        assert error.path == NAME, error.path
        assert error.offset is not None, error
        assert 0 <= error.offset <= len(data), (error.offset, len(data))
        return None
    summary = reader.summary
    assert summary is not None, "records() ended without a summary"
    keys = [key for key, _ in records]
    assert keys == sorted(keys), "keys out of order"
    assert summary.records == len(records)
    assert summary.keys == len(set(keys))
    assert summary.value_bytes == sum(len(s.data or b"") for _, s in records)
    assert summary.file_bytes == len(data)
    assert summary.checksum == _U64.unpack(data[-8:])[0]
    assert summary.header == reader.header
    for key, s in records:
        assert isinstance(key, str)
        assert key
        assert isinstance(s, Sibling)
        assert s.deleted == (s.data is None) == s.version.deleted
        assert isinstance(s.version.origin, str)
        assert s.version.origin
        assert all(isinstance(k, str) and type(n) is int for k, n in s.version.vv.items())
        if s.data is not None:
            decode_value(s.codec, s.data)  # verified: must not raise
    return reader.header, records, summary


def check(data: bytes) -> None:
    result = read(data)
    if result is None:
        return
    header, records, summary = result
    chunks: list[bytes] = []
    writer = ExportWriter(chunks.append, header)  # type: ignore[arg-type]
    for key, sibling in records:
        writer.add(key, sibling)
    writer.finish()
    again = read(b"".join(chunks))
    assert again is not None, "a re-encoded export does not read back"
    assert again[0] == header
    assert again[1] == records
    assert again[2].records == summary.records  # type: ignore[attr-defined]


def test_one_input(data: bytes) -> None:
    check(data)
    fixed = fix_checksums(data)
    if fixed != data:
        check(fixed)


if __name__ == "__main__":
    run(test_one_input)
