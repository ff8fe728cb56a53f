"""Fuzz target: ``decode_payload``, ``decode_entry`` and ``decode_value`` of engine.record.

Contract: each returns a clean result or raises a ``WalsyncError``; any other
exception (a cbor2 or zstandard error, a TypeError from a wrongly shaped
item, MemoryError from a length field believed blindly, ...) is a bug in the
decoder. Each input is decoded as a record payload, as a snapshot entry and
as a value under both codecs, and what decodes is followed the way the
engine follows it: payload -> each op's entry -> each sibling's value.

A clean result must have the documented shape: a payload is
``(kind in {0, 1}, int hlc, [(str key, bytes entry), ...])``; an entry is a
list of Siblings whose fields have their wire types.

Run: ``python fuzz/fuzz_payload.py -max_total_time=600 /tmp/payload-corpus fuzz/corpus/payload``
"""

from __future__ import annotations

from typing import Any

from _harness import engine_imports, run

with engine_imports(__name__ == "__main__"):
    from walsync.engine.errors import WalsyncError
    from walsync.engine.record import (
        CODEC_NONE,
        CODEC_ZSTD,
        KIND_LOCAL,
        KIND_MERGE,
        decode_entry,
        decode_payload,
        decode_value,
    )
    from walsync.engine.versions import Sibling


def value(codec: int, data: bytes) -> Any:
    try:
        return decode_value(codec, data)
    except WalsyncError:
        return None


def entry(raw: bytes) -> list[Sibling] | None:
    try:
        siblings = decode_entry(raw)
    except WalsyncError:
        return None
    assert isinstance(siblings, list)
    for s in siblings:
        assert isinstance(s, Sibling)
        v = s.version
        assert s.data is None or isinstance(s.data, bytes)
        assert s.deleted == (s.data is None) == v.deleted
        assert isinstance(s.codec, int)
        assert isinstance(v.origin, str)
        assert all(isinstance(k, str) and isinstance(n, int) for k, n in v.vv.items())
        assert isinstance(v.hlc, int)
        assert isinstance(v.lsn, int)
        assert isinstance(v.fence, int)
        if s.data is not None:
            value(s.codec, s.data)
    return siblings


def payload(raw: bytes) -> None:
    try:
        kind, hlc, ops = decode_payload(raw, "fuzz.wal", 32, 1)
    except WalsyncError:
        return
    assert kind in (KIND_LOCAL, KIND_MERGE)
    assert isinstance(hlc, int)
    assert isinstance(ops, list)
    for op in ops:
        key, raw_entry = op
        assert isinstance(key, str)
        assert isinstance(raw_entry, bytes)
        entry(raw_entry)


def test_one_input(data: bytes) -> None:
    payload(data)
    entry(data)
    value(CODEC_NONE, data)
    value(CODEC_ZSTD, data)
    if data:
        value(data[0], data[1:])  # unknown codecs too


if __name__ == "__main__":
    run(test_one_input)
