"""Behaviour of the public Store API (README: quickstart, guarantees)."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import cbor2
import pytest

from walsync.engine import (
    ANY,
    CapacityError,
    ConflictError,
    CorruptionError,
    Delete,
    Durability,
    InvalidKeyError,
    InvalidValueError,
    NoReplicatorError,
    Put,
    ReadOnlyStoreError,
    Store,
    StoreClosedError,
    StoreLockedError,
    StoreNotFoundError,
    StoreStateError,
    ValueTooLargeError,
    Version,
)
from walsync.engine import versions as versions_mod
from walsync.engine.layout import StoreLayout
from walsync.engine.record import (
    CODEC_NONE,
    CODEC_ZSTD,
    SEGMENT_HEADER_BYTES,
    FrameStatus,
    decode_entry,
    decode_frame,
    decode_payload,
    encode_entry,
)
from walsync.engine.snapshot.bulk import write_raw
from walsync.engine.versions import Sibling

MiB = 1 << 20

OpenFn = Callable[..., Store]


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def open_store(store_path: Path) -> Iterator[OpenFn]:
    """Open the test store (small segments); every handle is closed at teardown."""
    opened: list[Store] = []

    def _open(**kw: Any) -> Store:
        kw.setdefault("segment_bytes", 16384)
        s = Store.open(store_path, **kw)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


def _wal_records(path: Path) -> list[tuple[int, list[tuple[str, bytes]]]]:
    """Every (LSN, ops) still in the WAL, read frame by frame from the files."""
    out = []
    for _first, seg in StoreLayout(path).list_segments():
        data = seg.read_bytes()
        offset = SEGMENT_HEADER_BYTES
        while offset < len(data):
            if not any(data[offset:]):
                break  # preallocated space, not written yet
            status, frame = decode_frame(data, offset, str(seg))
            assert status == FrameStatus.OK
            assert frame is not None
            _kind, _hlc, ops = decode_payload(frame.payload)
            out.append((frame.lsn, ops))
            offset += frame.size
    return out


def _raw_siblings(store: Store, key: str) -> list[Sibling]:
    raw = store._snapshot.get_entry(key.encode())
    assert raw is not None
    return decode_entry(raw)


# -- put / get / delete ---------------------------------------------------------


def test_store_put_then_get_returns_value(open_store: OpenFn) -> None:
    s = open_store()
    r = s.put("runs/1", {"status": "running"})
    assert r.lsn == 1
    assert r.durability is Durability.LOCAL
    assert s.get("runs/1") == {"status": "running"}
    assert s.get("runs/missing") is None
    assert s.get("runs/missing", "dflt") == "dflt"
    r2 = s.put("runs/1", {"status": "done"})
    assert r2.lsn == 2
    assert s.get("runs/1") == {"status": "done"}
    assert s.next_lsn == 3
    assert s.applied_lsn == 2


def test_store_get_version_describes_the_write(open_store: OpenFn) -> None:
    s = open_store()
    r = s.put("k", 1, fence=3)
    v = s.get_version("k")
    assert v is not None
    assert (v.origin, v.lsn, v.hlc, v.fence, v.deleted) == (s.node_id, r.lsn, r.hlc, 3, False)
    assert dict(v.vv) == {s.node_id: r.lsn}
    assert s.get_version("absent") is None


def test_store_get_versions_lists_the_single_sibling(open_store: OpenFn) -> None:
    s = open_store()
    assert s.get_versions("k") == []
    s.put("k", "v1")
    r = s.put("k", "v2")
    vs = s.get_versions("k")
    assert len(vs) == 1
    assert vs[0].value == "v2"
    assert vs[0].version.lsn == r.lsn


def test_store_delete_hides_key_and_is_versioned(open_store: OpenFn) -> None:
    s = open_store()
    s.put("k", 1)
    r = s.delete("k")
    assert s.get("k") is None
    assert s.get_version("k") is None
    tomb = s.get_versions("k")
    assert len(tomb) == 1
    assert tomb[0].value is None
    assert tomb[0].version.deleted
    assert tomb[0].version.lsn == r.lsn
    assert dict(tomb[0].version.vv) == {s.node_id: r.lsn}
    s.put("k", 2)
    assert s.get("k") == 2


def test_store_delete_of_absent_key_commits_a_tombstone(open_store: OpenFn) -> None:
    s = open_store()
    r = s.delete("never")
    assert r.lsn == 1
    assert s.get("never") is None
    assert list(s.scan()) == []


def test_store_commit_of_nothing_is_refused(open_store: OpenFn) -> None:
    s = open_store()
    with pytest.raises(ValueError, match="at least one"):
        s.commit([])
    assert s.next_lsn == 1


# -- batches ----------------------------------------------------------------------


def test_batch_commits_every_op_in_one_record(open_store: OpenFn, store_path: Path) -> None:
    s = open_store()
    s.put("old", 0)
    with s.batch() as b:
        b.put("a", 1)
        b.put("b", 2)
        b.delete("old")
        b.put("a", 3)  # a later op on the same key wins
    assert b.result is not None
    assert b.result.lsn == 2
    assert s.next_lsn == 3
    assert (s.get("a"), s.get("b"), s.get("old")) == (3, 2, None)
    va, vb = s.get_version("a"), s.get_version("b")
    assert va is not None
    assert vb is not None
    assert va.lsn == vb.lsn == 2
    assert va.hlc == vb.hlc == b.result.hlc
    records = _wal_records(store_path)
    assert [lsn for lsn, _ in records] == [1, 2]
    assert [k for k, _ in records[1][1]] == ["a", "b", "old", "a"]
    s.close()
    s2 = open_store()
    assert (s2.get("a"), s2.get("b"), s2.get("old")) == (3, 2, None)


def test_batch_discards_everything_on_exception(open_store: OpenFn) -> None:
    s = open_store()
    s.put("a", "before")
    b = s.batch()

    def fail_inside() -> None:
        with b:
            b.put("a", "after")
            b.put("b", 1)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert b.ops  # the operations were collected, then discarded
    assert b.result is None
    assert s.get("a") == "before"
    assert s.get("b") is None
    assert s.next_lsn == 2


def test_batch_empty_commits_nothing(open_store: OpenFn) -> None:
    s = open_store()
    with s.batch() as b:
        pass
    assert b.result is None
    assert s.next_lsn == 1


def test_batch_with_one_bad_op_writes_nothing(open_store: OpenFn) -> None:
    s = open_store()
    s.put("a", 1)
    v = s.get_version("a")
    bad_batches: list[list[Put | Delete]] = [
        [Put("a", 2), Put("b", object())],
        [Put("a", 2), Delete("")],
        [Put("a", 2), Put("a", 3, expect=None)],
        [Put("a", 2, expect=v), Put("c", 1, expect=v)],
    ]
    for bad in bad_batches:
        with pytest.raises((InvalidValueError, InvalidKeyError, ConflictError)):
            s.commit(bad)
        assert s.next_lsn == 2
        assert s.get("a") == 1
        assert s.get("b") is None
        assert s.get("c") is None


def test_batch_commit_with_explicit_ops_list(open_store: OpenFn) -> None:
    s = open_store()
    r = s.commit([Put("x", 1), Put("y", 2), Delete("x")], durability="none")
    assert r.durability is Durability.NONE
    assert s.get("x") is None
    assert s.get("y") == 2


# -- scans --------------------------------------------------------------------------


def _fill(s: Store, keys: list[str]) -> None:
    with s.batch() as b:
        for k in keys:
            b.put(k, k.upper())


def test_scan_prefix_returns_sorted_live_items(open_store: OpenFn) -> None:
    s = open_store()
    _fill(s, ["runs/2/b", "runs/1/a", "runs/10", "runx", "run", "steps/1", "runs/1/c"])
    s.delete("runs/1/c")
    assert list(s.scan("runs/")) == [
        ("runs/1/a", "RUNS/1/A"), ("runs/10", "RUNS/10"), ("runs/2/b", "RUNS/2/B"),
    ]
    assert [k for k, _ in s.scan()] == ["run", "runs/1/a", "runs/10", "runs/2/b", "runx",
                                        "steps/1"]
    assert s.keys("runs/1") == ["runs/1/a", "runs/10"]
    assert list(s.scan("nope/")) == []


def test_scan_range_start_end_reverse_limit(open_store: OpenFn) -> None:
    s = open_store()
    keys = [f"k{i:02d}" for i in range(20)]
    _fill(s, keys)
    s.delete("k05")
    live = [k for k in keys if k != "k05"]
    assert [k for k, _ in s.scan(start="k03", end="k08")] == ["k03", "k04", "k06", "k07"]
    assert [k for k, _ in s.scan(start="k03", end="k08", reverse=True)] == [
        "k07", "k06", "k04", "k03",
    ]
    assert [k for k, _ in s.scan(reverse=True)] == live[::-1]
    assert [k for k, _ in s.scan(limit=3)] == ["k00", "k01", "k02"]
    assert [k for k, _ in s.scan(reverse=True, limit=2)] == ["k19", "k18"]
    assert [k for k, _ in s.scan(start="k04", limit=2)] == ["k04", "k06"]
    assert [k for k, _ in s.scan("k1", start="k0", end="k15")] == [f"k1{i}" for i in range(5)]
    assert [k for k, _ in s.scan("k1", start="k17", reverse=True)] == ["k19", "k18", "k17"]
    assert [k for k, _ in s.scan(start="k09x", end="k03")] == []
    assert [k for k, _ in s.scan(start="k09x", end="k03", reverse=True)] == []
    assert [k for k, _ in s.scan(end="k00")] == []
    assert [k for k, _ in s.scan(start="zzz", reverse=True)] == []
    assert [k for k, _ in s.scan(end="k015", reverse=True)] == ["k01", "k00"]


def test_scan_limit_zero_returns_nothing(open_store: OpenFn) -> None:
    s = open_store()
    _fill(s, ["a", "b"])
    assert list(s.scan(limit=0)) == []
    assert s.keys(limit=0) == []


def test_scan_prefix_with_high_trailing_characters(open_store: OpenFn) -> None:
    s = open_store()
    keys = ["a\xff", "a\xffb", "a\xff\xff", "a\u00ff\U0010ffff", "b", "a\U0010ffff",
            "a\U0010ffffz", "a\U0010fffe", "a\ufffd", "a"]
    _fill(s, keys)
    assert [k for k, _ in s.scan("a\xff")] == sorted(
        (k for k in keys if k.startswith("a\xff")), key=lambda k: k.encode()
    )
    assert [k for k, _ in s.scan("a\U0010ffff")] == ["a\U0010ffff", "a\U0010ffffz"]
    assert [k for k, _ in s.scan("a\U0010ffff", reverse=True)] == ["a\U0010ffffz", "a\U0010ffff"]
    assert [k for k, _ in s.scan("a")] == sorted(
        (k for k in keys if k.startswith("a")), key=lambda k: k.encode()
    )


def test_scan_orders_unicode_keys_by_utf8_bytes(open_store: OpenFn) -> None:
    s = open_store()
    keys = ["z", "Z", "é", "e\u0301", "日本", "日", "\U0001f600", "\uffff", "\u00e9a", "a",
            "\x7f", "\x01", "ß", "ẞ", "a\x01b", "\x01\x01"]
    _fill(s, keys)
    expected = sorted(keys, key=lambda k: k.encode("utf-8"))
    assert [k for k, _ in s.scan()] == expected
    assert [k for k, _ in s.scan(reverse=True)] == expected[::-1]
    assert s.get("日本") == "日本".upper()
    assert [k for k, _ in s.scan("日")] == ["日", "日本"]


def test_scan_with_invalid_prefix_raises_invalid_key(open_store: OpenFn) -> None:
    s = open_store()
    s.put("a", 1)
    with pytest.raises(InvalidKeyError):
        list(s.scan("\ud800"))
    with pytest.raises(InvalidKeyError):
        list(s.scan(start="\udfff"))


# -- expect= (optimistic concurrency) ------------------------------------------------


def test_expect_any_is_the_default(open_store: OpenFn) -> None:
    s = open_store()
    s.put("k", 1, expect=ANY)
    s.put("k", 2)
    assert s.get("k") == 2


def test_expect_none_requires_absence(open_store: OpenFn) -> None:
    s = open_store()
    s.put("k", 1, expect=None)
    before = s.next_lsn
    with pytest.raises(ConflictError) as info:
        s.put("k", 2, expect=None)
    assert info.value.key == "k"
    assert "'k'" in str(info.value)
    assert info.value.retryable
    assert s.next_lsn == before
    assert s.get("k") == 1
    s.delete("k")
    s.put("k", 3, expect=None)  # a deleted key counts as absent
    assert s.get("k") == 3
    with pytest.raises(ConflictError):
        s.delete("k", expect=None)
    assert s.get("k") == 3


def test_expect_version_matches_current(open_store: OpenFn) -> None:
    s = open_store()
    s.put("k", 1)
    v1 = s.get_version("k")
    assert v1 is not None
    s.put("k", 2, expect=v1)
    v2 = s.get_version("k")
    assert v2 is not None
    before = s.next_lsn
    with pytest.raises(ConflictError) as info:
        s.put("k", 3, expect=v1)  # stale
    assert info.value.key == "k"
    assert info.value.expected == v1
    assert info.value.actual == v2
    assert "conflict on key 'k'" in str(info.value)
    assert s.next_lsn == before
    assert s.get("k") == 2
    s.delete("k", expect=v2)
    with pytest.raises(ConflictError):
        s.put("k", 4, expect=v2)  # deleted since
    assert s.get("k") is None
    with pytest.raises(ConflictError):
        s.put("other", 1, expect=v2)  # never existed


def test_expect_failure_in_batch_names_the_key_and_writes_nothing(open_store: OpenFn) -> None:
    s = open_store()
    s.put("a", 1)
    s.put("b", 1)
    stale = s.get_version("b")
    s.put("b", 2)
    before = s.next_lsn
    b = s.batch()
    b.put("a", 99)
    b.put("b", 99, expect=stale)
    with pytest.raises(ConflictError) as info:
        b.__exit__(None, None, None)
    assert info.value.key == "b"
    assert s.next_lsn == before
    assert (s.get("a"), s.get("b")) == (1, 2)


def test_expect_rejects_other_types(open_store: OpenFn) -> None:
    s = open_store()
    s.put("k", 1)
    with pytest.raises(TypeError):
        s.put("k", 2, expect=1)
    assert s.get("k") == 1
    assert s.next_lsn == 2


# -- durability ------------------------------------------------------------------------


def test_durability_per_store_and_per_commit(open_store: OpenFn) -> None:
    s = open_store(durability="none")
    assert s.put("a", 1).durability is Durability.NONE
    assert s.put("b", 1, durability="local").durability is Durability.LOCAL
    assert s.delete("b", durability=Durability.LOCAL).durability is Durability.LOCAL
    with s.batch(durability="local") as b:
        b.put("c", 1)
    assert b.result is not None
    assert b.result.durability is Durability.LOCAL
    s.close()
    s2 = open_store()
    assert s2.get("a") == 1
    assert s2.get("c") == 1
    assert s2.put("d", 1).durability is Durability.LOCAL
    assert s2.put("e", 1, durability="none").durability is Durability.NONE


def test_durability_remote_without_replicator_writes_nothing(open_store: OpenFn) -> None:
    s = open_store()
    s.put("a", 1)
    with pytest.raises(NoReplicatorError) as info:
        s.put("a", 2, durability="remote")
    assert info.value.hint
    with pytest.raises(NoReplicatorError), s.batch(durability=Durability.REMOTE) as b:
        b.put("b", 1)
    with pytest.raises(NoReplicatorError):
        s.delete("a", durability="remote")
    assert s.next_lsn == 2
    assert s.get("a") == 1
    assert s.get("b") is None


def test_durability_remote_as_store_default_is_refused(store_path: Path) -> None:
    with pytest.raises(NoReplicatorError):
        Store.open(store_path, durability="remote")
    assert not store_path.exists()


def test_durability_unknown_level_is_refused(open_store: OpenFn) -> None:
    s = open_store()
    with pytest.raises(ValueError, match="eventually"):
        s.put("a", 1, durability="eventually")
    assert s.next_lsn == 1


# -- invalid keys and values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (123, "not a string"),
        (b"bytes", "not a string"),
        (None, "not a string"),
        ("", "empty"),
        ("bad\ud800key", "UTF-8"),
        ("x" * 512, "above the limit"),
        ("é" * 256, "above the limit"),  # 512 bytes, 256 characters
    ],
)
def test_invalid_key_is_refused_with_reason(open_store: OpenFn, key: Any, reason: str) -> None:
    s = open_store()
    writes: list[Callable[[], object]] = [
        lambda: s.put(key, 1),
        lambda: s.delete(key),
        lambda: s.commit([Put("ok", 1), Put(key, 2)]),
    ]
    for write in writes:
        with pytest.raises(InvalidKeyError) as info:
            write()
        assert isinstance(info.value, ValueError)
        msg = str(info.value)
        assert reason in msg
        if key != "":
            assert repr(key)[:20] in msg
        else:
            assert "key" in msg
    assert s.next_lsn == 1
    assert s.get("ok") is None


def test_key_at_the_size_limit_is_accepted(open_store: OpenFn) -> None:
    s = open_store()
    s.put("k" * 511, "default limit")  # LMDB's own key limit
    assert s.get("k" * 511) == "default limit"
    assert s.keys("kkk") == ["k" * 511]
    s.close()
    s = open_store(max_key_bytes=64)
    s.put("k" * 64, 1)
    assert s.get("k" * 64) == 1
    with pytest.raises(InvalidKeyError):
        s.put("k" * 65, 1)


@pytest.mark.parametrize("key", [123, "", "bad\ud800"])
def test_invalid_key_on_read_raises_invalid_key(open_store: OpenFn, key: Any) -> None:
    s = open_store()
    s.put("a", 1)
    for read in (s.get, s.get_version, s.get_versions):
        with pytest.raises(InvalidKeyError):
            read(key)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (object(), "value is of type builtins.object"),
        (dt.datetime(2024, 1, 1, 12, 0), "naive datetime"),
        ({"nested": [1, {"deep": {1, 2, object()}}]}, "value['nested'][1]['deep'] is a set"),
        (lambda: 1, "of type builtins.function"),
    ],
)
def test_unencodable_value_is_refused_naming_key(
    open_store: OpenFn, value: Any, why: str
) -> None:
    with pytest.raises(cbor2.CBOREncodeError):
        cbor2.dumps(value)  # premise: cbor2 refuses it
    s = open_store()
    with pytest.raises(InvalidValueError) as info:
        s.put("runs/7", value)
    assert isinstance(info.value, ValueError)
    assert "'runs/7'" in str(info.value)
    assert why in str(info.value)
    assert s.next_lsn == 1
    assert s.get("runs/7") is None


def _nest(depth: int, leaf: Any, wrap: Callable[[Any], Any] = lambda x: [x]) -> Any:
    value = leaf
    for _ in range(depth - 1):
        value = wrap(value)
    return value


def test_value_nested_at_the_depth_limit_round_trips(open_store: OpenFn) -> None:
    s = open_store()
    cases = {
        "lists": _nest(128, [1, "x"]),
        "dicts": _nest(128, {"leaf": True}, lambda x: {"d": x}),
        # tagged scalars take two CBOR levels each: still readable
        "decimals": _nest(128, [Decimal("1.5")], lambda x: [x, Decimal("-2.25")]),
        "dates": _nest(128, [dt.datetime(2024, 1, 1, tzinfo=dt.UTC), dt.date(2024, 1, 2)],
                       lambda x: {"d": x}),
    }
    for name, value in cases.items():
        s.put(name, value)
    s.close()
    s2 = open_store()
    for name, value in cases.items():
        assert s2.get(name) == value, name


@pytest.mark.parametrize("depth", [129, 401, 1000])
def test_value_nested_too_deep_is_refused_before_writing(open_store: OpenFn, depth: int) -> None:
    # cbor2 encodes 401 levels, but cannot decode them: such a value must not be stored
    s = open_store()
    with pytest.raises(InvalidValueError) as info:
        s.put("deep", _nest(depth, []))
    assert "'deep'" in str(info.value)
    assert "nested deeper" in str(info.value)
    with pytest.raises(InvalidValueError):
        s.put("deep", {"ok": 1, "bad": _nest(depth, 0, lambda x: {"k": x})})
    assert s.next_lsn == 1
    assert s.get("deep") is None


def test_value_cyclic_is_refused(open_store: OpenFn) -> None:
    s = open_store()
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    with pytest.raises(InvalidValueError, match="'loop'"):
        s.put("loop", cyclic)
    mapping: dict[str, Any] = {}
    mapping["self"] = mapping
    with pytest.raises(InvalidValueError, match="'loop'"):
        s.put("loop", mapping)
    assert s.next_lsn == 1


def test_value_nested_extremely_deep_does_not_crash_the_process(store_path: Path) -> None:
    # cbor2's C encoder overflows the stack on such values: the put must refuse it first
    code = (
        "import sys\n"
        "from walsync.engine import Store, InvalidValueError\n"
        "x = []\n"
        "for _ in range(200000): x = [x]\n"
        "s = Store.open(sys.argv[1])\n"
        "try:\n"
        "    s.put('deep', x)\n"
        "except InvalidValueError:\n"
        "    print('refused')\n"
        "s.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", code, str(store_path)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "refused"


def test_value_too_large_is_refused_before_writing(open_store: OpenFn) -> None:
    s = open_store(max_value_bytes=1000)
    at_limit = b"x" * (1000 - len(cbor2.dumps(b"x" * 1000)) + 1000)
    assert len(cbor2.dumps(at_limit)) == 1000
    s.put("ok", at_limit)
    assert s.get("ok") == at_limit
    before = s.next_lsn
    with pytest.raises(ValueTooLargeError) as info:
        s.put("big", at_limit + b"y")
    err = info.value
    assert isinstance(err, CapacityError)
    assert isinstance(err, ValueError)
    assert (err.key, err.size_bytes, err.max_bytes) == ("big", 1001, 1000)
    assert "'big'" in str(err)
    assert "1000" in str(err)
    with pytest.raises(ValueTooLargeError):
        s.commit([Put("small", 1), Put("big", at_limit + b"y")])
    assert s.next_lsn == before
    assert s.get("small") is None


def _segment_entry(store_path: Path, key: str) -> Sibling:
    entries = [e for _lsn, ops in _wal_records(store_path) for k, e in ops if k == key]
    assert entries
    (sib,) = decode_entry(entries[-1])
    return sib


def test_large_compressible_value_round_trips_with_zstd(
    open_store: OpenFn, store_path: Path
) -> None:
    s = open_store(segment_bytes=65536)
    value = (b"walsync compressible payload line " * 400_000)[: 10 * MiB]
    assert len(value) == 10 * MiB
    s.put("big", value)
    assert s.get("big") == value
    (sib,) = _raw_siblings(s, "big")
    assert sib.codec == CODEC_ZSTD
    assert sib.data is not None
    assert len(sib.data) < MiB
    wal_sib = _segment_entry(store_path, "big")
    assert wal_sib.codec == CODEC_ZSTD
    assert wal_sib.data == sib.data
    s.close()
    s2 = open_store(segment_bytes=65536)
    assert s2.get("big") == value


def test_large_random_value_round_trips_uncompressed(
    open_store: OpenFn, store_path: Path
) -> None:
    s = open_store(segment_bytes=65536)
    value = random.Random(7).randbytes(10 * MiB)
    s.put("rnd", value)
    assert s.get("rnd") == value
    (sib,) = _raw_siblings(s, "rnd")
    assert sib.codec == CODEC_NONE
    assert _segment_entry(store_path, "rnd").codec == CODEC_NONE
    s.put("after", 1)  # the next record goes on after the oversized frame
    s.close()
    s2 = open_store(segment_bytes=65536)
    assert s2.get("rnd") == value
    assert s2.get("after") == 1


def test_small_values_are_not_compressed(open_store: OpenFn) -> None:
    s = open_store(compress_above_bytes=4096)
    s.put("small", "a" * 1000)
    s.put("medium", "a" * 8000)
    assert _raw_siblings(s, "small")[0].codec == CODEC_NONE
    assert _raw_siblings(s, "medium")[0].codec == CODEC_ZSTD
    assert s.get("medium") == "a" * 8000


_CBOR_VALUES: dict[str, Any] = {
    "dict": {"a": 1, "nested": {"b": [1, 2, {"c": None}]}},
    "list": [1, "two", 3.0, [4], {"five": 5}],
    "str": "héllo wörld \U0001f600",
    "empty_str": "",
    "bytes": b"\x00\x01\xff" * 10,
    "int": 42,
    "negative": -17,
    "big_int": 2**200 + 1,
    "big_negative": -(2**130),
    "u64_edge": 2**64,
    "float": 3.141592653589793,
    "inf": float("inf"),
    "bool_true": True,
    "bool_false": False,
    "none": None,
    "datetime_utc": dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC),
    "datetime_offset": dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=5))),
    "big_dict": {f"field{i}": i for i in range(600)},  # compressed
}


def test_cbor_values_round_trip_and_survive_reopen(open_store: OpenFn) -> None:
    s = open_store()
    for name, value in _CBOR_VALUES.items():
        s.put(f"v/{name}", value)
    for name, value in _CBOR_VALUES.items():
        got = s.get(f"v/{name}")
        assert got == value
        assert type(got) is type(value)
    s.close()
    s2 = open_store()
    for name, value in _CBOR_VALUES.items():
        got = s2.get(f"v/{name}")
        assert got == value, name
        assert type(got) is type(value)
    assert dict(s2.scan("v/")) == {f"v/{n}": v for n, v in _CBOR_VALUES.items()}
    nan = s2.put("nan", float("nan"))
    assert nan.lsn > 0
    assert s2.get("nan") != s2.get("nan")  # NaN survives as NaN


# -- lifecycle: closed, reopen, locks, read-only ------------------------------------------------


def test_closed_store_raises_store_closed(open_store: OpenFn) -> None:
    s = open_store()
    s.put("a", 1)
    s.close()
    s.close()  # idempotent
    calls: list[Callable[[], object]] = [
        lambda: s.put("a", 2),
        lambda: s.delete("a"),
        lambda: s.get("a"),
        lambda: s.get_version("a"),
        lambda: s.get_versions("a"),
        lambda: list(s.scan()),
        lambda: s.keys(),
        lambda: s.checkpoint(),
        lambda: s.info(),
        lambda: s.commit([Put("a", 1)]),
    ]
    for call in calls:
        with pytest.raises(StoreClosedError):
            call()
    with pytest.raises(StoreClosedError), s.batch() as b:
        b.put("x", 1)


def test_store_context_manager_closes(store_path: Path) -> None:
    with Store.open(store_path, segment_bytes=4096) as s:
        s.put("a", 1)
    with pytest.raises(StoreClosedError):
        s.get("a")
    with Store.open(store_path, segment_bytes=4096) as s2:
        assert s2.get("a") == 1


def test_reopen_keeps_node_id(open_store: OpenFn, store_path: Path) -> None:
    s = open_store()
    node = s.node_id
    assert node
    s.put("a", 1)
    s.close()
    s2 = open_store()
    assert s2.node_id == node
    assert s2.put("b", 1).lsn == 2  # LSNs continue, never reused
    v = s2.get_version("b")
    assert v is not None
    assert v.origin == node
    s2.close()
    with pytest.raises(ValueError, match="node id"):
        Store.open(store_path, node_id="someone-else")
    s3 = open_store(node_id=node)
    assert s3.get("a") == 1


def test_node_id_can_be_named_at_creation(tmp_path: Path) -> None:
    with Store.open(tmp_path / "named", node_id="host-a.1") as s:
        assert s.node_id == "host-a.1"
        s.put("k", 1)
        v = s.get_version("k")
        assert v is not None
        assert dict(v.vv) == {"host-a.1": 1}
    with pytest.raises(ValueError, match="node id"):
        Store.open(tmp_path / "bad", node_id="no spaces/allowed")


def test_two_stores_get_distinct_node_ids(tmp_path: Path) -> None:
    with Store.open(tmp_path / "a") as a, Store.open(tmp_path / "b") as b:
        assert a.node_id != b.node_id


def test_second_open_in_same_process_is_locked(open_store: OpenFn, store_path: Path) -> None:
    s = open_store()
    s.put("a", 1)
    with pytest.raises(StoreLockedError) as info:
        Store.open(store_path)
    assert info.value.pid == os.getpid()
    assert f"pid {os.getpid()}" in str(info.value)
    assert info.value.retryable
    s.put("b", 2)  # the holder is unaffected
    s.close()
    with Store.open(store_path) as again:
        assert again.get("b") == 2


def test_readonly_open_reads_and_refuses_writes(open_store: OpenFn, store_path: Path) -> None:
    s = open_store()
    s.put("a", {"x": 1})
    s.put("b", 2)
    s.delete("b")
    s.close()
    ro = Store.open(store_path, readonly=True)
    try:
        assert ro.readonly
        assert ro.get("a") == {"x": 1}
        assert ro.get("b") is None
        assert list(ro.scan()) == [("a", {"x": 1})]
        assert ro.applied_lsn == 3
        writes: list[Callable[[], object]] = [
            lambda: ro.put("c", 1),
            lambda: ro.delete("a"),
            lambda: ro.commit([Put("c", 1)]),
            lambda: ro.checkpoint(),
            lambda: ro.set_retain_floor(1),
        ]
        for w in writes:
            with pytest.raises(ReadOnlyStoreError):
                w()
        with pytest.raises(ReadOnlyStoreError), ro.batch() as b:
            b.put("c", 1)
        # a second handle on the same snapshot in one process is a state error, not
        # "corruption" (LMDB allows one per process); other processes are tested elsewhere
        with pytest.raises(StoreStateError, match="already open in this process") as info:
            Store.open(store_path)
        assert not isinstance(info.value, CorruptionError)
    finally:
        ro.close()
    # the failed writer released the writer lock
    writer = open_store()
    assert writer.put("c", 3).lsn == 4


def test_open_missing_store_without_create(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        Store.open(tmp_path / "nope", create=False)
    with pytest.raises(StoreNotFoundError):
        Store.open(tmp_path / "nope", readonly=True)
    assert not (tmp_path / "nope").exists()


def test_open_refuses_non_store_directory(tmp_path: Path) -> None:
    d = tmp_path / "other"
    d.mkdir()
    (d / "file.txt").write_text("not mine")
    with pytest.raises(StoreNotFoundError):
        Store.open(d)
    assert (d / "file.txt").read_text() == "not mine"


def test_store_files_are_private(open_store: OpenFn, store_path: Path) -> None:
    s = open_store()
    s.put("a", 1)
    s.checkpoint()
    for p in [store_path, *store_path.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{p} has mode {oct(mode)}"


# -- LMDB map growth ----------------------------------------------------------------------


def test_map_growth_is_invisible_to_the_user(open_store: OpenFn) -> None:
    s = open_store(map_size_bytes=1 << 20, segment_bytes=65536, durability="none")
    rng = random.Random(3)
    values = {f"blob/{i:03d}": rng.randbytes(128 * 1024) for i in range(64)}  # 8 MiB
    stop = threading.Event()
    reader_errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                for k, v in list(values.items())[:4]:
                    got = s.get(k)
                    assert got is None or got == v
                list(s.scan("blob/", limit=2))
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            reader_errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k, v in values.items():
            s.put(k, v)
    finally:
        stop.set()
        t.join()
    assert reader_errors == []
    assert s.info().snapshot_bytes > 8 * MiB
    for k, v in values.items():
        assert s.get(k) == v
    s.close()
    s2 = open_store(map_size_bytes=1 << 20, segment_bytes=65536)
    assert s2.recovery is not None
    assert s2.recovery.replayed_records == 0
    for k, v in values.items():
        assert s2.get(k) == v
    s2.put("blob/more", rng.randbytes(2 * MiB))
    assert len(s2.get("blob/more")) == 2 * MiB


def test_map_growth_during_replay(open_store: OpenFn, store_path: Path) -> None:
    # records reach only the WAL (the snapshot is emptied), so replay must grow the map
    s = open_store(map_size_bytes=1 << 20, segment_bytes=65536, durability="none")
    rng = random.Random(5)
    values = {f"r/{i}": rng.randbytes(200_000) for i in range(20)}
    for k, v in values.items():
        s.put(k, v)
    s.set_retain_floor(1)
    s.close()
    for name in ("data.mdb", "lock.mdb"):
        (store_path / "snapshot" / name).unlink()
    s2 = open_store(map_size_bytes=1 << 20, segment_bytes=65536)
    assert s2.recovery is not None
    assert s2.recovery.replayed_records == 20
    for k, v in values.items():
        assert s2.get(k) == v


# -- version vectors and HLC ----------------------------------------------------------------


def test_local_write_vv_is_node_lsn_over_joined_siblings(open_store: OpenFn) -> None:
    s = open_store(node_id="me")
    r1 = s.put("k", 1)
    r2 = s.put("k", 2)
    v = s.get_version("k")
    assert v is not None
    assert dict(v.vv) == {"me": r2.lsn}
    assert r2.lsn == r1.lsn + 1
    # plant two concurrent siblings from other nodes (as a merge would leave them)
    sib_a = Sibling(Version("other-a", 7, 1, {"other-a": 7, "me": 1}, 0, False), 0,
                    cbor2.dumps("from a"))
    sib_b = Sibling(Version("other-b", 3, 2, {"other-b": 3, "me": 2}, 0, False), 0,
                    cbor2.dumps("from b"))
    def plant(txn: Any) -> None:
        txn.put(b"k", encode_entry([sib_a, sib_b]))

    write_raw(s._snapshot, plant)
    assert [x.value for x in s.get_versions("k")] == ["from a", "from b"]
    assert s.get("k") == "from b"  # highest HLC wins
    r3 = s.put("k", 3)
    v3 = s.get_version("k")
    assert v3 is not None
    assert dict(v3.vv) == {"other-a": 7, "other-b": 3, "me": r3.lsn}
    assert len(s.get_versions("k")) == 1  # the write dominates both siblings
    r4 = s.delete("k")
    (tomb,) = s.get_versions("k")
    assert dict(tomb.version.vv) == {"other-a": 7, "other-b": 3, "me": r4.lsn}
    # a fresh key starts from nothing
    r5 = s.put("fresh", 1)
    v5 = s.get_version("fresh")
    assert v5 is not None
    assert dict(v5.vv) == {"me": r5.lsn}


def test_hlc_strictly_increases_across_commits_and_reopen(
    open_store: OpenFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_store()
    hlcs = [s.put(f"k{i}", i).hlc for i in range(5)]
    with s.batch() as b:
        b.put("x", 1)
    assert b.result is not None
    hlcs.append(b.result.hlc)
    # the wall clock jumps an hour back
    real = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: real - 3600 * 10**9)
    hlcs += [s.put("k", i).hlc for i in range(3)]
    hlcs.append(s.delete("k").hlc)
    s.close()
    s2 = open_store()
    # and further back while the store is closed
    monkeypatch.setattr(time, "time_ns", lambda: real - 7200 * 10**9)
    hlcs += [s2.put("k", i).hlc for i in range(3)]
    assert all(b > a for a, b in itertools.pairwise(hlcs)), hlcs
    v = s2.get_version("k")
    assert v is not None
    assert v.hlc == hlcs[-1]


def test_hlc_follows_wall_clock(open_store: OpenFn) -> None:
    s = open_store()
    before_ms = time.time_ns() // 1_000_000
    r = s.put("k", 1)
    after_ms = time.time_ns() // 1_000_000
    assert before_ms <= r.hlc >> versions_mod.HLC_LOGICAL_BITS <= after_ms


# -- threads ------------------------------------------------------------------------------


def _run_threads(n: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_threads_putting_distinct_keys_all_commit(open_store: OpenFn) -> None:
    s = open_store(segment_bytes=65536)
    lsns: list[list[int]] = [[] for _ in range(8)]

    def work(i: int) -> None:
        for j in range(200):
            lsns[i].append(s.put(f"t{i}/{j:03d}", {"t": i, "j": j}).lsn)

    _run_threads(8, work)
    everything = sorted(x for per in lsns for x in per)
    assert everything == list(range(1, 1601))
    for per in lsns:
        assert per == sorted(per)
    assert len(s.keys("t")) == 1600
    for i in range(8):
        assert s.get(f"t{i}/199") == {"t": i, "j": 199}
    s.close()
    s2 = open_store(segment_bytes=65536)
    assert len(s2.keys("t")) == 1600
    assert s2.next_lsn == 1601


def test_threads_cas_increments_never_lose_an_update(open_store: OpenFn) -> None:
    s = open_store(durability="none")
    s.put("counter", 0)
    successes = [0] * 8
    conflict_keys: set[str] = set()

    def work(i: int) -> None:
        while successes[i] < 40:
            (current,) = s.get_versions("counter")
            try:
                s.put("counter", current.value + 1, expect=current.version)
            except ConflictError as exc:
                conflict_keys.add(exc.key)
                continue
            successes[i] += 1

    _run_threads(8, work)
    assert s.get("counter") == sum(successes) == 320
    assert conflict_keys <= {"counter"}
    s.close()
    s2 = open_store()
    assert s2.get("counter") == 320


def test_threads_mixed_readers_see_consistent_values(open_store: OpenFn) -> None:
    s = open_store(durability="none")
    big = {"pad": "p" * 10_000}  # compressed: readers decompress concurrently
    for i in range(8):
        s.put(f"m/{i}", {**big, "i": i, "gen": 0})

    def work(i: int) -> None:
        if i < 4:
            for gen in range(1, 60):
                s.put(f"m/{i}", {**big, "i": i, "gen": gen})
        else:
            for _ in range(300):
                for k in range(8):
                    got = s.get(f"m/{k}")
                    assert got["i"] == k
                    assert got["pad"] == big["pad"]

    _run_threads(8, work)


# -- checkpoints and the retain floor -------------------------------------------------------


def _segments(path: Path) -> list[tuple[int, Path]]:
    return StoreLayout(path).list_segments()


def test_checkpoint_removes_sealed_segments_below_applied(
    open_store: OpenFn, store_path: Path
) -> None:
    s = open_store(segment_bytes=4096)
    for i in range(200):
        s.put(f"k{i}", "v" * 200)
    before = len(_segments(store_path))
    assert before > 5
    result = s.checkpoint()
    assert result.lsn == s.applied_lsn == 200
    assert result.segments_removed == before - 1
    assert result.bytes_removed > 0
    remaining = _segments(store_path)
    assert len(remaining) == 1  # the active segment stays
    assert s.info().segments == 1
    assert s.info().checkpoint_lsn == 200
    # nothing is lost: the snapshot holds it all, and writing goes on
    s.put("after", 1)
    assert s.get("k0") == "v" * 200
    assert _wal_records(store_path)[-1][0] == 201
    again = s.checkpoint()
    assert again.segments_removed == 0
    s.close()
    s2 = open_store(segment_bytes=4096)
    assert s2.get("k199") == "v" * 200
    assert s2.get("after") == 1


def test_checkpoint_keeps_wal_bounded_under_steady_load(
    open_store: OpenFn, store_path: Path
) -> None:
    s = open_store(segment_bytes=16384, durability="none")
    peak = 0
    for i in range(5000):
        s.put(f"run/{i % 300}", {"step": i, "pad": "x" * 100})
        if i % 250 == 249:
            s.checkpoint()
            wal = s.info().wal_bytes
            peak = max(peak, wal)
            assert wal <= 2 * 16384
    # 5,000 records of ~150 bytes: well over 40 segments written in all
    assert peak <= 2 * 16384
    assert s.info().next_lsn == 5001
    s.close()
    s2 = open_store(segment_bytes=16384)
    assert s2.get("run/299") == {"step": 4799, "pad": "x" * 100}


def test_background_checkpoint_keeps_wal_bounded(open_store: OpenFn, store_path: Path) -> None:
    s = open_store(segment_bytes=8192, checkpoint_every_bytes=32768, durability="none")
    for i in range(3000):
        s.put(f"k{i % 50}", "y" * 100)
    deadline = time.monotonic() + 10
    while len(_segments(store_path)) > 8 and time.monotonic() < deadline:
        s.put("tick", 1)  # the checkpointer wakes on commits
        time.sleep(0.01)
    assert len(_segments(store_path)) <= 8


def test_checkpoint_concurrent_with_writers_and_info(
    open_store: OpenFn, store_path: Path
) -> None:
    s = open_store(segment_bytes=4096, checkpoint_every_bytes=8192, durability="none")
    stop = threading.Event()
    lock = threading.Lock()
    running = [4]

    def background(i: int) -> None:
        if i == 4:
            while not stop.is_set():
                s.checkpoint()
        elif i == 5:
            while not stop.is_set():
                info = s.info()  # lists segments a checkpoint may be removing
                assert info.wal_bytes >= 0
        else:
            try:
                for j in range(600):
                    s.put(f"w{i}/{j}", "x" * 100)
            finally:
                with lock:
                    running[0] -= 1
                    if running[0] == 0:
                        stop.set()

    _run_threads(6, background)
    s.close()
    s2 = open_store(segment_bytes=4096)
    assert len(s2.keys("w")) == 4 * 600
    assert s2.next_lsn == 2401


def test_retain_floor_keeps_segments_through_checkpoint_and_close(
    open_store: OpenFn, store_path: Path
) -> None:
    s = open_store(segment_bytes=4096)
    assert s.retain_floor is None
    for i in range(100):
        s.put(f"k{i}", "v" * 200)
    s.set_retain_floor(60)
    assert s.retain_floor == 60
    for i in range(100, 200):
        s.put(f"k{i}", "v" * 200)
    result = s.checkpoint()
    assert result.segments_removed > 0
    lsns = [lsn for lsn, _ in _wal_records(store_path)]
    assert lsns == list(range(lsns[0], 201))
    assert lsns[0] <= 60
    first_segments = [first for first, _ in _segments(store_path)]
    assert first_segments[0] <= 60
    assert len(first_segments) < 2 or first_segments[1] > 60  # only what is needed is kept
    assert s.info().retain_floor == 60
    s.close()
    lsns_closed = [lsn for lsn, _ in _wal_records(store_path)]
    assert lsns_closed[0] <= 60
    assert lsns_closed[-1] == 200
    s2 = open_store(segment_bytes=4096)
    assert s2.retain_floor == 60
    assert s2.recovery is not None
    assert s2.recovery.replayed_records == 0
    # lifting the floor lets the next checkpoint remove them
    s2.set_retain_floor(None)
    assert s2.retain_floor is None
    s2.put("z", 1)
    s2.checkpoint()
    assert all(lsn > 60 for lsn, _ in _wal_records(store_path))


def test_retain_floor_above_applied_does_not_remove_unapplied(
    open_store: OpenFn, store_path: Path
) -> None:
    s = open_store(segment_bytes=4096)
    s.set_retain_floor(10_000)
    for i in range(100):
        s.put(f"k{i}", "v" * 200)
    s.checkpoint()
    assert len(_segments(store_path)) == 1
    assert s.get("k99") == "v" * 200


def test_clean_close_then_reopen_replays_nothing(open_store: OpenFn) -> None:
    s = open_store(segment_bytes=4096, durability="none")
    for i in range(300):
        s.put(f"k{i}", i)
    s.close()
    s2 = open_store(segment_bytes=4096)
    assert s2.recovery is not None
    assert s2.recovery.replayed_records == 0
    assert s2.recovery.torn_tail is None
    assert s2.get("k299") == 299
    assert s2.next_lsn == 301
    assert s2.put("new", 1).lsn == 301
    s2.close()
    s3 = open_store(segment_bytes=4096)
    assert s3.recovery is not None
    assert s3.recovery.replayed_records == 0
    assert s3.get("new") == 1


def test_info_reports_counts(open_store: OpenFn, store_path: Path) -> None:
    s = open_store()
    s.put("a", 1)
    s.put("b", 2)
    info = s.info()
    assert info.path == str(store_path)
    assert info.node_id == s.node_id
    assert info.applied_lsn == 2
    assert info.next_lsn == 3
    assert info.segments == 1
    assert info.wal_bytes > 0
    assert info.keys == 2
