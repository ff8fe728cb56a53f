"""engine/record.py's decoders on damaged input: only CorruptionError escapes.

Regression tests for what fuzz/fuzz_payload.py found: decode_entry and
decode_value let cbor2 / zstandard errors (and a MemoryError from a zstd
header's content size) escape, and decode_payload accepted operations that
were not ``[key, entry]`` arrays.
"""

from __future__ import annotations

import struct

import cbor2
import pytest
import zstandard

from walsync.engine.errors import CorruptionError
from walsync.engine.record import (
    CODEC_NONE,
    CODEC_ZSTD,
    KIND_LOCAL,
    KIND_MERGE,
    compress_value,
    decode_entry,
    decode_payload,
    decode_value,
    encode_entry,
    encode_payload,
)
from walsync.engine.versions import Sibling, Version

SIB = Sibling(Version("n1", 3, 5 << 16, {"n1": 3}, 0), CODEC_NONE, cbor2.dumps({"a": 1}))
TOMB = Sibling(Version("n1", 4, 6 << 16, {"n1": 4}, 2, True), CODEC_NONE, None)


def _zstd_header_claiming(size: int) -> bytes:
    """A zstd frame header (magic, descriptor with an 8-byte content size) and no blocks."""
    return bytes.fromhex("28b52ffd") + bytes([0xE0]) + struct.pack("<Q", size)


# -- round trips ----------------------------------------------------------------------


def test_payload_round_trip() -> None:
    ops = [["k1", encode_entry([SIB])], ["k2", encode_entry([TOMB])]]
    for kind in (KIND_LOCAL, KIND_MERGE):
        assert decode_payload(encode_payload(kind, 77, ops)) == (kind, 77, ops)
    assert decode_payload(encode_payload(KIND_LOCAL, 0, [])) == (KIND_LOCAL, 0, [])


def test_entry_round_trip() -> None:
    assert decode_entry(encode_entry([SIB, TOMB])) == [SIB, TOMB]
    assert decode_entry(encode_entry([])) == []


def test_value_round_trip_both_codecs() -> None:
    value = {"log": ["line"] * 2000}
    encoded = cbor2.dumps(value)
    assert decode_value(CODEC_NONE, encoded) == value
    codec, packed = compress_value(encoded, 3)
    assert codec == CODEC_ZSTD
    assert decode_value(codec, packed) == value


# -- decode_payload -------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        [0, 1, {("k", b"entry"): 1}],  # ops a map (whose key is a [key, entry] pair)
        [0, 1, [{"k": 1, b"e": 2}]],  # an op that is a two-key map
        [0, 1, [["k", b"e", b"extra"]]],
        [0, 1, [["k", "not bytes"]]],
        [0, 1, [[1, b"e"]]],
        [2, 1, []],
        [0, "hlc", []],
        [0, 1],
        {0: 1, 1: 2, 2: 3},  # a 3-key map unpacks like an array
        "abc",
        None,
    ],
)
def test_decode_payload_rejects_wrong_shapes(obj: object) -> None:
    with pytest.raises(CorruptionError, match="record payload does not decode") as info:
        decode_payload(cbor2.dumps(obj), "x.wal", 64, 9)
    assert (info.value.path, info.value.offset, info.value.lsn) == ("x.wal", 64, 9)


@pytest.mark.parametrize(
    "raw", [b"", b"\xff", b"\x9b" + b"\xff" * 8, b"\x81" * 5000, bytes.fromhex("d81e820100")]
)
def test_decode_payload_rejects_bad_cbor(raw: bytes) -> None:
    with pytest.raises(CorruptionError):
        decode_payload(raw)


# -- decode_entry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # cbor2.CBORDecodeEOF escaped
        b"\xff",  # CBORDecodeError escaped
        cbor2.dumps(5),  # TypeError: not iterable
        cbor2.dumps([[1, 2]]),  # ValueError: not enough values to unpack
        cbor2.dumps({"a": 1}),
        cbor2.dumps([[b"d", 0, {"n": 1}, 1, "n", 1]]),  # 6 fields
        cbor2.dumps([[b"d", 0, {"n": 1}, 1, "n", 1, 0, 0]]),  # 8 fields
        cbor2.dumps([[7, 0, {"n": 1}, 1, "n", 1, 0]]),  # data neither bytes nor None
        cbor2.dumps([[b"d", "zstd", {"n": 1}, 1, "n", 1, 0]]),
        cbor2.dumps([[b"d", 0, [1], 1, "n", 1, 0]]),  # vv not a map
        cbor2.dumps([[b"d", 0, {"n": "1"}, 1, "n", 1, 0]]),
        cbor2.dumps([[b"d", 0, {1: 1}, 1, "n", 1, 0]]),
        cbor2.dumps([[b"d", 0, {"n": 1}, 1.5, "n", 1, 0]]),
        cbor2.dumps([[b"d", 0, {"n": 1}, 1, b"n", 1, 0]]),  # origin bytes
        cbor2.dumps([[b"d", 0, {"n": 1}, 1, "n", None, 0]]),
        cbor2.dumps([[b"d", 0, {"n": 1}, 1, "n", 1, "0"]]),
    ],
)
def test_decode_entry_damage_is_corruption(raw: bytes) -> None:
    with pytest.raises(CorruptionError, match="snapshot entry does not decode"):
        decode_entry(raw)


# -- decode_value ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "raw"),
    [
        (CODEC_NONE, b"\xff"),  # CBORDecodeError escaped
        (CODEC_NONE, b""),
        (CODEC_ZSTD, b"garbage"),  # zstandard.ZstdError escaped
        (CODEC_ZSTD, b""),
        (CODEC_ZSTD, zstandard.ZstdCompressor(write_content_size=False).compress(b"\x01")),
        (CODEC_ZSTD, zstandard.ZstdCompressor().compress(b"\xff")),  # zstd fine, CBOR bad
        (CODEC_ZSTD, zstandard.ZstdCompressor().compress(cbor2.dumps("x" * 100))[:-4]),
        (9, cbor2.dumps(1)),
    ],
)
def test_decode_value_damage_is_corruption(codec: int, raw: bytes) -> None:
    with pytest.raises(CorruptionError, match="stored value does not decode"):
        decode_value(codec, raw)


@pytest.mark.parametrize("size", [2**31 + 1, 2**40, 2**60, 2**64 - 1])
def test_decode_value_does_not_believe_a_huge_zstd_content_size(size: int) -> None:
    """Before the fix, decompress allocated what the header claimed: MemoryError."""
    with pytest.raises(CorruptionError, match="content size"):
        decode_value(CODEC_ZSTD, _zstd_header_claiming(size))


def test_decode_value_moderate_content_size_lie_is_corruption() -> None:
    with pytest.raises(CorruptionError):
        decode_value(CODEC_ZSTD, _zstd_header_claiming(1 << 20))
