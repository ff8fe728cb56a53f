"""Unit tests of engine/record.py's byte layouts: frames, segment headers, value codecs,
and a check that engine/FORMAT.md documents the constants the code uses."""

from __future__ import annotations

import itertools
import random
import re
import struct
from pathlib import Path

import cbor2
import pytest
import xxhash

from walsync.engine import record
from walsync.engine.errors import CapacityError, CorruptionError, FormatVersionError
from walsync.engine.options import StoreOptions
from walsync.engine.record import (
    CODEC_NONE,
    CODEC_ZSTD,
    FRAME_HEADER_BYTES,
    FRAME_MAGIC,
    FRAME_MAGIC_OFFSET,
    FRAME_VERSION,
    MAX_PAYLOAD_BYTES,
    SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    Frame,
    FrameStatus,
    compress_value,
    decode_frame,
    decode_segment_header,
    decode_value,
    encode_frame,
    encode_segment_header,
)
from walsync.engine.storefile import STORE_FORMAT_VERSION

FORMAT_MD = Path(record.__file__).with_name("FORMAT.md")
PAYLOAD = cbor2.dumps([0, 123, [["k", b"entry"]]])


def _rechecksum(frame: bytes | bytearray) -> bytes:
    return struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(frame[8:]))) + bytes(frame[8:])


def _flip(buf: bytes, index: int, mask: int = 0x01) -> bytes:
    return buf[:index] + bytes([buf[index] ^ mask]) + buf[index + 1 :]


# -- frames ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"x", PAYLOAD, bytes(range(256)) * 300, b"\xd7\x5a" * 40_000],
    ids=["empty", "one-byte", "cbor", "77KB-hashed-in-two-parts", "all-magic"],
)
@pytest.mark.parametrize(("lsn", "synced"), [(1, 0), (2**40 + 5, 2**40), (2**64 - 1, 2**64 - 2)])
def test_frame_round_trip(payload: bytes, lsn: int, synced: int) -> None:
    frame = encode_frame(lsn, synced, payload)
    assert len(frame) == FRAME_HEADER_BYTES + len(payload)
    status, decoded = decode_frame(frame, 0, "seg.wal")
    assert status == FrameStatus.OK
    assert decoded == Frame(lsn, synced, 0, len(frame), payload)
    # the same bytes inside a larger buffer, as bytes and as a memoryview
    buf = b"junk" + frame + b"tail"
    for view in (buf, memoryview(buf)):
        status, decoded = decode_frame(view, 4)
        assert status == FrameStatus.OK
        assert decoded == Frame(lsn, synced, 4, len(frame), payload)


def test_frames_back_to_back_decode_in_order() -> None:
    frames = [encode_frame(lsn, lsn - 1, PAYLOAD * lsn) for lsn in range(1, 6)]
    buf = b"".join(frames)
    offset, lsns = 0, []
    while offset < len(buf):
        status, frame = decode_frame(buf, offset)
        assert status == FrameStatus.OK
        assert frame is not None
        lsns.append(frame.lsn)
        offset += frame.size
    assert lsns == [1, 2, 3, 4, 5]
    assert decode_frame(buf, offset) == (FrameStatus.INCOMPLETE, None)


def test_frame_checksum_is_xxh3_of_everything_after_it() -> None:
    frame = encode_frame(9, 8, PAYLOAD)
    (checksum,) = struct.unpack_from("<Q", frame, 0)
    assert checksum == xxhash.xxh3_64_intdigest(frame[8:])
    assert checksum == xxhash.xxh3_64(frame[8:], seed=0).intdigest()


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_frame_version_with_valid_checksum_raises_format_version_error(
    version: int,
) -> None:
    frame = bytearray(encode_frame(42, 41, PAYLOAD))
    frame[10] = version
    frame = bytearray(_rechecksum(frame))
    with pytest.raises(FormatVersionError) as info:
        decode_frame(bytes(frame), 0, "wal/000000000000002a.wal")
    err = info.value
    assert f"version {version}" in str(err)
    assert f"version {FRAME_VERSION}" in str(err)
    assert err.lsn == 42
    assert err.offset == 0
    assert err.path == "wal/000000000000002a.wal"
    assert isinstance(err, CorruptionError)  # still caught by the corruption handlers


def test_unknown_frame_version_with_bad_checksum_is_damage_not_a_version() -> None:
    frame = bytearray(encode_frame(42, 41, PAYLOAD))
    frame[10] = 2  # checksum not updated: this is a flipped byte
    assert decode_frame(bytes(frame), 0) == (FrameStatus.BAD, None)


def test_every_flipped_bit_is_detected() -> None:
    frame = encode_frame(7, 6, PAYLOAD)
    length_field = range(12, 16)
    for index in range(len(frame)):
        for mask in (0x01, 0x80):
            status, decoded = decode_frame(_flip(frame, index, mask), 0)
            assert decoded is None, (index, mask)
            if index in length_field:
                # a longer claimed length runs past the buffer
                assert status in (FrameStatus.BAD, FrameStatus.INCOMPLETE), (index, mask)
            else:
                assert status == FrameStatus.BAD, (index, mask)


@pytest.mark.parametrize("index", [0, 7, 8, 9, 11, 16, 24, 31, 32, -1])
def test_flipped_byte_is_bad(index: int) -> None:
    frame = encode_frame(3, 2, PAYLOAD)
    assert decode_frame(_flip(frame, index % len(frame)), 0) == (FrameStatus.BAD, None)


def test_truncated_frame_is_incomplete_at_every_length() -> None:
    frame = encode_frame(3, 2, PAYLOAD)
    for cut in range(len(frame)):
        assert decode_frame(frame[:cut], 0) == (FrameStatus.INCOMPLETE, None), cut
    # an offset at or past the end is "nothing more yet", not damage
    assert decode_frame(frame, len(frame)) == (FrameStatus.INCOMPLETE, None)
    assert decode_frame(frame, len(frame) + 100) == (FrameStatus.INCOMPLETE, None)


def test_magic_offset_matches_encoding() -> None:
    frame = encode_frame(1, 0, b"")
    assert frame[FRAME_MAGIC_OFFSET : FRAME_MAGIC_OFFSET + len(FRAME_MAGIC)] == FRAME_MAGIC


# -- the MAX_PAYLOAD_BYTES guard ------------------------------------------------------


def _header_claiming(length: int) -> bytes:
    body = struct.pack("<2sBBIQQ", FRAME_MAGIC, FRAME_VERSION, 0, length, 1, 0)
    return struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + body


def test_max_payload_bytes_is_two_to_the_31() -> None:
    assert MAX_PAYLOAD_BYTES == 2**31


@pytest.mark.parametrize("length", [MAX_PAYLOAD_BYTES + 1, 2**32 - 1])
def test_length_above_max_is_bad_not_incomplete(length: int) -> None:
    """A damaged length field must not make a reader wait for (or allocate) gigabytes."""
    assert decode_frame(_header_claiming(length) + b"x" * 64, 0) == (FrameStatus.BAD, None)


def test_length_at_max_with_short_buffer_is_incomplete() -> None:
    assert decode_frame(_header_claiming(MAX_PAYLOAD_BYTES), 0) == (FrameStatus.INCOMPLETE, None)


class _Huge(bytes):
    """A payload that claims a size without holding it."""

    def __len__(self) -> int:
        return MAX_PAYLOAD_BYTES + 1


def test_encode_frame_refuses_payload_above_max() -> None:
    """Writing a frame the decoder rejects would lose an acknowledged commit."""
    with pytest.raises(CapacityError, match="above the frame limit"):
        encode_frame(1, 0, _Huge(b"x"))


# -- segment header -------------------------------------------------------------------


@pytest.mark.parametrize("first_lsn", [0, 1, 4096, 2**63, 2**64 - 1])
def test_segment_header_round_trip(first_lsn: int) -> None:
    header = encode_segment_header(first_lsn)
    assert len(header) == SEGMENT_HEADER_BYTES
    assert decode_segment_header(header, "x.wal") == first_lsn
    assert decode_segment_header(header + b"frames follow", "x.wal") == first_lsn


def test_segment_header_incomplete() -> None:
    header = encode_segment_header(1)
    for cut in range(SEGMENT_HEADER_BYTES):
        with pytest.raises(CorruptionError, match="incomplete") as info:
            decode_segment_header(header[:cut], "x.wal")
        assert type(info.value) is CorruptionError


def test_segment_header_bad_magic() -> None:
    header = bytearray(encode_segment_header(1))
    header[0:8] = b"notwalsy"
    header[24:32] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(header[:24])))
    with pytest.raises(CorruptionError, match="bad magic") as info:
        decode_segment_header(bytes(header), "x.wal")
    assert type(info.value) is CorruptionError
    assert info.value.path == "x.wal"
    assert info.value.offset == 0


@pytest.mark.parametrize("index", range(SEGMENT_HEADER_BYTES))
def test_segment_header_any_flipped_byte_is_corruption(index: int) -> None:
    header = _flip(encode_segment_header(77), index)
    with pytest.raises(CorruptionError) as info:
        decode_segment_header(header, "x.wal")
    assert type(info.value) is CorruptionError  # damage, never a version mismatch


@pytest.mark.parametrize(("version", "size"), [(2, 32), (0, 32), (1, 64)])
def test_segment_header_other_version_with_valid_checksum(version: int, size: int) -> None:
    head = struct.pack("<8sHHIQ", SEGMENT_MAGIC, version, size, 0, 5)
    header = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    with pytest.raises(FormatVersionError) as info:
        decode_segment_header(header, "x.wal")
    assert f"version {version}" in str(info.value)
    assert f"version {SEGMENT_VERSION}" in str(info.value)


# -- value codecs ---------------------------------------------------------------------


def test_compress_value_uses_zstd_for_compressible_data() -> None:
    encoded = cbor2.dumps({"log": "step finished\n" * 2000})
    codec, packed = compress_value(encoded, 3)
    assert codec == CODEC_ZSTD
    assert len(packed) < len(encoded) - len(encoded) // 8
    assert decode_value(codec, packed) == {"log": "step finished\n" * 2000}


@pytest.mark.parametrize("size", [5000, 70_000, 300_000], ids=["small", "medium", "sampled"])
def test_compress_value_keeps_random_data_as_is(size: int) -> None:
    encoded = cbor2.dumps(random.Random(size).randbytes(size))
    codec, packed = compress_value(encoded, 3)
    assert codec == CODEC_NONE
    assert packed is encoded
    assert decode_value(codec, packed) == cbor2.loads(encoded)


def test_compress_value_needs_an_eighth_saved() -> None:
    rng = random.Random(1)
    # mostly random with a compressible part: shrinks, but by less than an eighth
    encoded = cbor2.dumps(rng.randbytes(9000) + b"a" * 600)
    assert compress_value(encoded, 3)[0] == CODEC_NONE


def test_decode_value_unknown_codec_is_corruption() -> None:
    with pytest.raises(CorruptionError, match="codec 7"):
        decode_value(7, cbor2.dumps(1))


# -- FORMAT.md agrees with the code -------------------------------------------------


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    return {p.split("\n", 1)[0].strip(): p.split("\n", 1)[1] for p in parts[1:]}


def _table(section: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table in ``section``."""
    rows: list[list[str]] = []
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(re.fullmatch(r"-+", c) for c in cells):
                continue
            rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header row


def _layout(section: str) -> dict[str, tuple[int, int]]:
    """{field text: (offset, size)} of an offset/size/field table; ``n`` sizes are -1."""
    out = {}
    for offset, size, field in _table(section):
        out[field] = (int(offset), -1 if size == "n" else int(size))
    return out


def _hex_in(text: str) -> bytes:
    m = re.search(r"`((?:[0-9a-f]{2} )*[0-9a-f]{2})`", text)
    assert m, text
    return bytes.fromhex(m.group(1))


def _field(layout: dict[str, tuple[int, int]], prefix: str) -> tuple[str, int, int]:
    hits = [(f, o, s) for f, (o, s) in layout.items() if f.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(layout))
    return hits[0]


def _number_in_parens(text: str) -> int:
    m = re.search(r"\((\d+)\)", text)
    assert m, text
    return int(m.group(1))


@pytest.fixture(scope="module")
def format_md() -> dict[str, str]:
    return _sections(FORMAT_MD.read_text())


def test_format_md_versions(format_md: dict[str, str]) -> None:
    text = FORMAT_MD.read_text()
    m = re.search(r"\*\*store (\d+)\*\*, \*\*segment (\d+)\*\*, \*\*frame (\d+)\*\*", text)
    assert m, "FORMAT.md no longer names its versions in the expected sentence"
    assert (int(m.group(1)), int(m.group(2)), int(m.group(3))) == (
        STORE_FORMAT_VERSION, SEGMENT_VERSION, FRAME_VERSION
    )
    assert "XXH3-64 (seed 0)" in text


def test_format_md_segment_header(format_md: dict[str, str]) -> None:
    section = format_md["Segment"]
    m = re.search(r"(\d+)-byte header", section)
    assert m
    assert int(m.group(1)) == SEGMENT_HEADER_BYTES
    layout = _layout(section)
    # the fields tile the header exactly
    spans = sorted(layout.values())
    assert spans[0][0] == 0
    for (o1, s1), (o2, _) in itertools.pairwise(spans):
        assert o1 + s1 == o2
    assert spans[-1][0] + spans[-1][1] == SEGMENT_HEADER_BYTES

    header = encode_segment_header(0x0102030405060708)
    text, off, size = _field(layout, "magic")
    assert _hex_in(text) == SEGMENT_MAGIC == header[off : off + size]
    text, off, size = _field(layout, "segment format version")
    assert _number_in_parens(text) == SEGMENT_VERSION
    assert int.from_bytes(header[off : off + size], "little") == SEGMENT_VERSION
    text, off, size = _field(layout, "header size")
    assert _number_in_parens(text) == SEGMENT_HEADER_BYTES
    assert int.from_bytes(header[off : off + size], "little") == SEGMENT_HEADER_BYTES
    _, off, size = _field(layout, "reserved")
    assert header[off : off + size] == bytes(size)
    _, off, size = _field(layout, "first LSN")
    assert int.from_bytes(header[off : off + size], "little") == 0x0102030405060708
    text, off, size = _field(layout, "XXH3-64 of bytes")
    m = re.search(r"bytes (\d+)\.\.(\d+)", text)
    assert m
    covered = header[int(m.group(1)) : int(m.group(2))]
    assert int.from_bytes(header[off : off + size], "little") == xxhash.xxh3_64_intdigest(covered)


def test_format_md_frame_header(format_md: dict[str, str]) -> None:
    layout = _layout(format_md["Frame"])
    spans = sorted(layout.values())
    assert spans[0][0] == 0
    for (o1, s1), (o2, _) in itertools.pairwise(spans):
        if s1 >= 0:
            assert o1 + s1 == o2
    payload = b"payload bytes"
    frame = encode_frame(0x1112131415161718, 0x2122232425262728, payload)

    text, off, size = _field(layout, "XXH3-64")
    assert (off, size) == (0, 8)
    assert int.from_bytes(frame[off : off + size], "little") == xxhash.xxh3_64_intdigest(
        frame[off + size :]
    )
    text, off, size = _field(layout, "magic")
    assert _hex_in(text) == FRAME_MAGIC == frame[off : off + size]
    assert off == FRAME_MAGIC_OFFSET
    text, off, size = _field(layout, "frame format version")
    assert _number_in_parens(text) == FRAME_VERSION
    assert int.from_bytes(frame[off : off + size], "little") == FRAME_VERSION
    text, off, size = _field(layout, "flags")
    assert text.endswith(", 0")
    assert frame[off : off + size] == bytes(size)
    text, off, size = _field(layout, "payload size")
    assert int.from_bytes(frame[off : off + size], "little") == len(payload)
    m = re.search(r"at most 2\^(\d+)", text)
    assert m
    assert 2 ** int(m.group(1)) == MAX_PAYLOAD_BYTES
    assert 2 ** (8 * size) > MAX_PAYLOAD_BYTES  # the field can hold the limit
    _, off, size = _field(layout, "LSN")
    assert int.from_bytes(frame[off : off + size], "little") == 0x1112131415161718
    _, off, size = _field(layout, "synced LSN")
    assert int.from_bytes(frame[off : off + size], "little") == 0x2122232425262728
    _, off, size = _field(layout, "payload (CBOR)")
    assert size == -1
    assert off == FRAME_HEADER_BYTES
    assert frame[off:] == payload


def test_format_md_codecs_and_kinds(format_md: dict[str, str]) -> None:
    entry = format_md["Snapshot entry (LMDB)"]
    codec_row = next(row for row in _table(entry) if row[0] == "`codec`")
    assert "0: none" in codec_row[1]
    assert "1: zstd" in codec_row[1]
    assert (CODEC_NONE, CODEC_ZSTD) == (0, 1)
    m = re.search(r"default (\d+)", codec_row[1])
    assert m
    assert int(m.group(1)) == StoreOptions().compress_above_bytes
    assert "by at least an eighth" in codec_row[1]
    payload = format_md["Record payload"]
    assert f"`kind` {record.KIND_LOCAL}, a local commit" in payload
    assert f"`kind` {record.KIND_MERGE}, a merge" in payload
