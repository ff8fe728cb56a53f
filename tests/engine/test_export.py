"""Export and import (engine/export.py): exact round trips, damage refused, imports atomic.

* export -> import reproduces every stored sibling exactly (values and versions:
  vector, HLC, origin, LSN, fence), concurrent siblings and tombstones included,
  and merges by the pull rules (importing twice changes nothing);
* every single-byte change and every truncation of a small export is refused with
  ExportFormatError naming the file and an offset at or before the damage, and the
  target store is left unchanged (sampled on a larger file);
* an import SIGKILLed at named failpoints, at random moments, or with its WAL frame
  torn mid-write leaves the target as it was or with the whole import;
* EXPORT.md documents the constants the code uses.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import xxhash

import walsync.engine.assign as assign_module
import walsync.engine.export as export_module
import walsync.engine.record as record_module
from walsync.engine import Store, _failpoints
from walsync.engine.errors import (
    CapacityError,
    CorruptionError,
    ExportFormatError,
    RunNotFoundError,
    WalsyncError,
)
from walsync.engine.export import (
    EXPORT_MAGIC,
    EXPORT_VERSION,
    FRAME_HEADER_BYTES,
    HEADER_PREFIX_BYTES,
    KIND_RECORD,
    KIND_TRAILER,
    MAX_HEADER_BODY_BYTES,
    TRAILER_PAYLOAD_BYTES,
    ExportHeader,
    ExportReader,
    ExportWriter,
    export_file,
    import_file,
    verify_export_file,
)
from walsync.engine.layout import StoreLayout
from walsync.engine.record import (
    CODEC_NONE,
    CODEC_ZSTD,
    encode_frame,
    encode_payload,
    encode_segment_header,
)
from walsync.engine.versions import Sibling, Version
from walsync.engine.wal import scan_segment
from walsync.engine.workflow import Workflows, export_run, keys

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPORT_MD = Path(export_module.__file__).with_name("EXPORT.md")
HLC = 1_700_000_000_000 << 16
_U64 = struct.Struct("<Q")

Dump = list[tuple[str, list[list[Any]]]]


def dump(store: Store) -> Dump:
    """Every key with every stored sibling in wire form: value bytes, codec, vv, hlc,
    origin, lsn, fence (a tombstone has data None)."""
    return [(key, [s.to_wire() for s in sibs]) for key, sibs in store.iter_siblings()]


def remote(node: str, lsn: int, value: Any, vv: dict[str, int] | None = None,
           fence: int = 0) -> Sibling:
    data = None if value is None else cbor2.dumps(value)
    version = Version(node, lsn, HLC + lsn, vv or {node: lsn}, fence, data is None)
    return Sibling(version, CODEC_NONE, data)


def fill_source(store: Store) -> None:
    """Local puts (one large enough to be zstd-compressed, one fenced), a local
    delete, and concurrent versions from two fake nodes, values and tombstones."""
    store.put("a/1", {"step": "fetch", "n": 1})
    store.put("a/2", "walsync " * 2000)
    store.put("a/3", [1, 2, 3])
    store.delete("a/3")
    store.put("a/4", {"leased": True}, fence=7)
    store.apply_remote([
        ("c/1", remote("node-x", 4, "left")),
        ("c/1", remote("node-y", 9, "right", fence=2)),
        ("c/2", remote("node-x", 5, {"kept": 1})),
        ("c/2", remote("node-y", 10, None)),
        ("c/3", remote("node-x", 6, None)),
    ])


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Store]:
    store = Store.open(tmp_path / "source", node_id="src")
    fill_source(store)
    yield store
    store.close()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Store]:
    store = Store.open(tmp_path / "target", node_id="dst")
    yield store
    store.close()


def test_export_import_round_trips_siblings_and_tombstones_exactly(
    source: Store, target: Store, tmp_path: Path
) -> None:
    original = dump(source)
    by_key = dict(original)
    # the source really holds what the test is about
    assert len(by_key["c/1"]) == 2
    assert len(by_key["c/2"]) == 2
    assert by_key["a/3"][0][0] is None
    assert by_key["c/3"][0][0] is None
    assert any(s[0] is None for s in by_key["c/2"])
    assert any(s[0] for s in by_key["c/2"])
    assert by_key["a/2"][0][1] == CODEC_ZSTD
    assert by_key["a/4"][0][6] == 7
    assert by_key["c/1"][1][6] == 2

    path = tmp_path / "all.wsx"
    exporting: list[tuple[int, int]] = []
    summary = export_file(source, path, progress=lambda *a: exporting.append(a))
    assert exporting[-1] == (len(original), len(original))
    assert (summary.keys, summary.records) == (len(original), sum(len(s) for _, s in original))
    assert summary.header.node_id == "src"
    assert summary.header.scope == "store"
    assert summary == verify_export_file(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    importing: list[tuple[int, int]] = []
    report = import_file(target, path, progress=lambda *a: importing.append(a))
    assert importing[-1] == (2 * summary.file_bytes, 2 * summary.file_bytes)
    assert [done for done, _ in importing] == sorted(done for done, _ in importing)
    assert report.lsn is not None
    assert report.source_node == "src"
    assert dump(target) == original
    for key, _ in original:
        assert target.get_versions(key) == source.get_versions(key)
        assert target.get(key) == source.get(key)
    # durable: a reopened target (replaying the WAL) holds the same
    target.close()
    with Store.open(target.path) as again:
        assert dump(again) == original


def test_import_twice_changes_nothing(source: Store, target: Store, tmp_path: Path) -> None:
    path = tmp_path / "all.wsx"
    export_file(source, path)
    first = import_file(target, path)
    state, next_lsn = dump(target), target.next_lsn
    second = import_file(target, path)
    assert first.lsn is not None
    assert second.lsn is None
    assert (dump(target), target.next_lsn) == (state, next_lsn)


def test_import_merges_by_version_vector_rules(
    source: Store, target: Store, tmp_path: Path
) -> None:
    # a version of the target's own, concurrent with the imported ones: kept beside them
    target.put("c/1", "target's own")
    path = tmp_path / "all.wsx"
    export_file(source, path)
    import_file(target, path)
    origins = sorted(s.version.origin for s in dict(target.iter_siblings("c/1"))["c/1"])
    assert origins == ["dst", "node-x", "node-y"]

    # a local write dominates the imported version it read: a re-import is ignored
    target.put("a/1", "rewritten on the target")
    assert import_file(target, path).lsn is None
    assert target.get("a/1") == "rewritten on the target"
    assert [s.version.origin for s in dict(target.iter_siblings("a/1"))["a/1"]] == ["dst"]

    # a pull delivering the same versions (as sync would) changes nothing either
    pulled = [(k, s) for k, sibs in source.iter_siblings() for s in sibs]
    assert target.apply_remote(pulled) is None

    # a newer source write dominates what was imported from it, and is concurrent
    # with the target's own write: both are kept
    source.put("a/1", "newer on the source")
    source.put("a/4", "replaced on the source")
    newer = tmp_path / "newer.wsx"
    export_file(source, newer)
    assert import_file(target, newer).lsn is not None
    a1 = {s.version.origin: s for s in dict(target.iter_siblings("a/1"))["a/1"]}
    assert set(a1) == {"dst", "src"}
    assert a1["src"].version.lsn == source.get_version("a/1").lsn  # type: ignore[union-attr]
    assert target.get("a/4") == "replaced on the source"
    assert len(dict(target.iter_siblings("a/4"))["a/4"]) == 1


def _make_run(store: Store, run_id: str, steps: int) -> None:
    run = Workflows(store).run("invoice", run_id, inputs={"id": run_id})
    run.start()
    for i in range(steps):
        run.step(f"s{i}", lambda i=i: {"done": i, "blob": "x" * (20000 if i == 1 else 10)})
    run.checkpoint("half")


def test_export_run_holds_exactly_that_run_and_imports_it(
    source: Store, target: Store, tmp_path: Path
) -> None:
    _make_run(source, "r1", 3)
    _make_run(source, "r10", 2)  # its keys begin with keys.run("r1")
    path = tmp_path / "r1.wsx"
    summary = export_run(source, path, "r1")
    assert summary.header.scope == "run"
    assert summary.header.scope_value == "r1"
    stream = path.open("rb")
    with stream:
        reader = ExportReader(stream, name=str(path), size=path.stat().st_size)
        exported = sorted({key for key, _ in reader.records()})
    expected = sorted(k for k, _ in source.iter_siblings()
                      if k in (keys.run("r1"), keys.index("r1"))
                      or k.startswith(keys.all_of_run("r1")))
    assert exported == expected
    assert any("/outputs/" in k for k in exported)
    assert any("/checkpoints/" in k for k in exported)

    import_file(target, path)
    theirs = Workflows(source).get_run("r1")
    mine = Workflows(target).get_run("r1")
    assert mine.ordered_steps() == theirs.ordered_steps()
    assert mine.output("s1") == theirs.output("s1")
    assert [c.name for c in mine.checkpoints()] == ["half"]
    with pytest.raises(RunNotFoundError):
        Workflows(target).get_run("r10")
    assert target.get("a/1") is None


def test_export_prefix_holds_the_keys_under_it(
    source: Store, target: Store, tmp_path: Path
) -> None:
    path = tmp_path / "c.wsx"
    summary = export_file(source, path, prefix="c/")
    assert (summary.header.scope, summary.keys) == ("prefix", 3)
    import_file(target, path)
    assert dump(target) == [(k, s) for k, s in dump(source) if k.startswith("c/")]


def test_large_values_round_trip(target: Store, tmp_path: Path) -> None:
    """Values above the writer's 1 MiB buffer are written as they are."""
    big = random.Random(3).randbytes(3 << 20)
    with Store.open(tmp_path / "big", node_id="big") as store:
        store.put("blob/a", big)
        store.put("blob/b", {"small": True})
        export_file(store, tmp_path / "big.wsx")
        expected = dump(store)
    import_file(target, tmp_path / "big.wsx")
    assert dump(target) == expected
    assert target.get("blob/a") == big


def test_export_of_a_missing_run_writes_nothing(source: Store, tmp_path: Path) -> None:
    path = tmp_path / "none.wsx"
    with pytest.raises(RunNotFoundError, match="'nope'"):
        export_run(source, path, "nope")
    assert list(tmp_path.glob("*.wsx*")) == []
    assert list(tmp_path.glob(".*")) == []


def test_export_keeps_an_existing_file_unless_asked(source: Store, tmp_path: Path) -> None:
    path = tmp_path / "x.wsx"
    path.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError):
        export_file(source, path)
    assert path.read_bytes() == b"someone else's file"
    export_file(source, path, overwrite=True)
    assert verify_export_file(path).keys == len(dump(source))


def test_export_interrupted_before_rename_leaves_no_file(source: Store, tmp_path: Path) -> None:
    path = tmp_path / "x.wsx"
    _failpoints.enable("export.before_rename", "raise")
    try:
        with pytest.raises(_failpoints.FailpointHit):
            export_file(source, path)
    finally:
        _failpoints.disable()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


# -- damage -------------------------------------------------------------------------


def _refused(target: Store, data: bytes, path: Path, fd: int) -> ExportFormatError:
    """Import ``data`` from ``path`` (rewritten in place through ``fd``: cheaper than a
    new file per case); the error it raises."""
    os.ftruncate(fd, len(data))
    os.pwrite(fd, data, 0)
    try:
        import_file(target, path)
    except ExportFormatError as exc:
        return exc
    raise AssertionError(f"{len(data)} bytes imported without an error")


def _check_refusals(target: Store, good: bytes, tmp_path: Path, flips: list[int],
                    cuts: list[int]) -> None:
    """Each position in ``flips`` changed (three ways) and each length in ``cuts`` is
    refused naming the file and an offset at or before the damage; the target is
    unchanged."""
    before, next_lsn = dump(target), target.next_lsn
    path = tmp_path / "damaged.wsx"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    failures = []
    try:
        for i in flips:
            for mask in (0x01, 0x80, 0xFF):
                data = bytearray(good)
                data[i] ^= mask
                exc = _refused(target, bytes(data), path, fd)
                if exc.path != str(path) or exc.offset is None or not 0 <= exc.offset <= i \
                        or str(path) not in str(exc) or f"offset {exc.offset}" not in str(exc):
                    failures.append((i, mask, str(exc)))
        for n in cuts:
            exc = _refused(target, good[:n], path, fd)
            if exc.path != str(path) or exc.offset is None or exc.offset > n \
                    or "truncated" not in str(exc):
                failures.append((n, "cut", str(exc)))
    finally:
        os.close(fd)
    assert not failures, failures[:5]
    assert (dump(target), target.next_lsn) == (before, next_lsn)


def test_every_byte_flip_and_truncation_of_a_small_export_is_refused(
    tmp_path: Path, target: Store
) -> None:
    with Store.open(tmp_path / "small", node_id="small") as small:
        small.put("k", "v")
        small.delete("gone")
        small.apply_remote([("k", remote("node-x", 3, 42)), ("z", remote("node-y", 1, b"\x00"))])
        export_file(small, tmp_path / "small.wsx")
    good = (tmp_path / "small.wsx").read_bytes()
    assert verify_export_file(tmp_path / "small.wsx").records == 4
    assert len(good) < 1024
    target.put("k", "the target's own")
    _check_refusals(target, good, tmp_path, list(range(len(good))), list(range(len(good))))


def test_sampled_flips_and_truncations_of_a_larger_export_are_refused(
    tmp_path: Path, target: Store
) -> None:
    rng = random.Random(20240611)
    with Store.open(tmp_path / "large", node_id="large") as large, large.batch() as batch:
        for i in range(110):
            batch.put(f"k/{i:04d}", {"i": i, "pad": rng.randbytes(rng.randint(200, 1800))})
        batch.put("z/big", "compressible " * 3000)
    with Store.open(tmp_path / "large", node_id="large") as large:
        export_file(large, tmp_path / "large.wsx")
    good = (tmp_path / "large.wsx").read_bytes()
    assert len(good) > 100_000
    flips = sorted(rng.sample(range(len(good)), 150) + list(range(len(good) - 64, len(good))))
    cuts = sorted([*rng.sample(range(len(good)), 100), 0, 1, len(good) - 1])
    _check_refusals(target, good, tmp_path, flips, cuts)


def _frames(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(header bytes, [(kind, payload), ...]) of a valid export, trailer included."""
    (body_bytes,) = struct.unpack_from("<I", data, 12)
    header_end = pos = HEADER_PREFIX_BYTES + body_bytes + 8
    out = []
    while pos < len(data) - 8:
        _sum, kind, _flags, _reserved, length = struct.unpack_from("<QBBHI", data, pos)
        out.append((kind, data[pos + FRAME_HEADER_BYTES : pos + FRAME_HEADER_BYTES + length]))
        pos += FRAME_HEADER_BYTES + length
    return data[:header_end], out


def _assemble(header: bytes, frames: list[tuple[int, bytes]]) -> bytes:
    """A file with every frame checksum and the whole-file checksum made right."""
    out = bytearray(header)
    for kind, payload in frames:
        fields = struct.pack("<BBHI", kind, 0, 0, len(payload))
        out += _U64.pack(xxhash.xxh3_64_intdigest(fields + payload)) + fields + payload
    return bytes(out) + _U64.pack(xxhash.xxh3_64_intdigest(bytes(out)))


def _trailer(records: int, keys: int, value_bytes: int) -> tuple[int, bytes]:
    return KIND_TRAILER, struct.pack("<QQQ", records, keys, value_bytes)


@pytest.fixture
def small_export(tmp_path: Path) -> bytes:
    with Store.open(tmp_path / "s", node_id="s") as s:
        s.put("a", 1)
        s.apply_remote([("b", remote("node-x", 2, "x")), ("b", remote("node-y", 3, "y"))])
        s.put("c", 3)
        export_file(s, tmp_path / "s.wsx")
    return (tmp_path / "s.wsx").read_bytes()


def _refusal(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "crafted.wsx"
    path.write_bytes(data)
    with pytest.raises(ExportFormatError) as info:
        verify_export_file(path)
    assert info.value.path == str(path)
    return str(info.value)


def test_records_dropped_duplicated_or_moved_are_refused(
    small_export: bytes, tmp_path: Path
) -> None:
    header, frames = _frames(small_export)
    records, trailer = frames[:-1], frames[-1]
    assert [k for k, _ in frames] == [KIND_RECORD] * 4 + [KIND_TRAILER]
    # the untouched frames reassemble to the very file: the helpers are faithful
    assert _assemble(header, frames) == small_export
    # counts that no longer match the trailer
    assert "trailer says 4 records" in _refusal(
        _assemble(header, records[:2] + records[3:] + [trailer]), tmp_path)
    assert "trailer says 4 records" in _refusal(
        _assemble(header, records + records[3:] + [trailer]), tmp_path)
    # keys out of order
    assert "out of order" in _refusal(
        _assemble(header, [records[3], *records[:3], trailer]), tmp_path)
    # the two siblings of "b" swapped, or one dropped with the trailer rewritten to
    # match: every frame is intact, only the whole-file checksum tells
    swapped = _assemble(header, [records[0], records[2], records[1], records[3], trailer])
    data = bytearray(swapped)
    data[-8:] = small_export[-8:]
    assert "checksum of the whole file" in _refusal(bytes(data), tmp_path)
    values = sum(len(cbor2.loads(p)[1][0] or b"") for _, p in records)
    dropped = _assemble(header, [records[0], records[1], records[3],
                                 _trailer(3, 3, values - len(cbor2.loads(records[2][1])[1][0]))])
    data = bytearray(dropped)
    data[-8:] = small_export[-8:]
    assert "checksum of the whole file" in _refusal(bytes(data), tmp_path)


def test_crafted_files_are_refused_with_the_projects_error(
    small_export: bytes, tmp_path: Path
) -> None:
    header, frames = _frames(small_export)
    records, trailer = frames[:-1], frames[-1]
    # another format version, every checksum right: named with both versions
    prefix = header[:8] + struct.pack("<H", 2) + header[10:-8]
    v2 = prefix + _U64.pack(xxhash.xxh3_64_intdigest(prefix))
    message = _refusal(_assemble(v2, frames), tmp_path)
    assert "version 2" in message
    assert f"version {EXPORT_VERSION}" in message
    assert "damaged" not in message
    # a version field changed by damage (the header checksum disagrees) is called so
    flipped = bytearray(small_export)
    flipped[8] = 2
    message = _refusal(bytes(flipped), tmp_path)
    assert "version 2" in message
    assert "damaged" in message
    # not an export at all: a WAL segment, an empty file, text
    segment = encode_segment_header(1) + encode_frame(1, 0, encode_payload(0, HLC, []))
    assert "bad magic" in _refusal(segment, tmp_path)
    assert "truncated" in _refusal(b"", tmp_path)
    assert "bad magic" in _refusal(b"hello, world\n" * 4, tmp_path)
    # bytes after the end
    assert "after its end" in _refusal(small_export + b"\x00", tmp_path)
    # checksum-valid frames whose content is wrong
    bad_records = [
        (KIND_RECORD, b"\xff\xff"),  # not CBOR
        (KIND_RECORD, cbor2.dumps(["k"])),  # wrong shape
        (KIND_RECORD, cbor2.dumps(["", [b"x", 0, {"n": 1}, 1, "n", 1, 0]])),  # empty key
        (KIND_RECORD, cbor2.dumps(["k", [b"x", 9, {"n": 1}, 1, "n", 1, 0]])),  # codec 9
        (KIND_RECORD, cbor2.dumps(["k", [b"x", 0, {"n": -1}, 1, "n", 1, 0]])),  # negative
        (KIND_RECORD, cbor2.dumps(["k", [b"x", 0, {"n": 1}, True, "n", 1, 0]])),  # bool hlc
        (KIND_RECORD, cbor2.dumps(["k", [b"x", 0, {"n": 1}, 1, "n", 2**63, 0]])),  # too big
        (KIND_RECORD, cbor2.dumps(["k" * 600, [b"x", 0, {"n": 1}, 1, "n", 1, 0]])),  # long key
        (KIND_RECORD, cbor2.dumps(["k", [b"\xff", 0, {"n": 1}, 1, "n", 1, 0]])),  # bad value
        (KIND_RECORD, cbor2.dumps(["k", [b"junk", 1, {"n": 1}, 1, "n", 1, 0]])),  # bad zstd
        (7, cbor2.dumps(1)),  # unknown kind
    ]
    for frame in bad_records:
        message = _refusal(_assemble(header, [frame, _trailer(1, 1, 1)]), tmp_path)
        assert "offset" in message, message
    # a trailer of the wrong size, a header that is not a map
    assert "trailer holds" in _refusal(
        _assemble(header, [*records, (KIND_TRAILER, trailer[1] + b"\x00")]), tmp_path)
    body = cbor2.dumps([1, 2])
    prefix = struct.pack("<8sHHI", EXPORT_MAGIC, EXPORT_VERSION, 0, len(body)) + body
    odd = prefix + _U64.pack(xxhash.xxh3_64_intdigest(prefix))
    assert "header does not decode" in _refusal(_assemble(odd, frames), tmp_path)


def test_oversized_import_is_refused_before_anything_is_written(
    monkeypatch: pytest.MonkeyPatch, source: Store, target: Store, tmp_path: Path
) -> None:
    path = tmp_path / "all.wsx"
    summary = export_file(source, path)
    before, next_lsn = dump(target), target.next_lsn
    monkeypatch.setattr(export_module, "MAX_PAYLOAD_BYTES", summary.record_bytes - 1)
    with pytest.raises(CapacityError, match="one WAL record") as info:
        import_file(target, path)
    assert "--run" in info.value.hint
    assert (dump(target), target.next_lsn, target.poisoned) == (before, next_lsn, None)


def test_oversized_merge_is_refused_without_poisoning_the_store(
    monkeypatch: pytest.MonkeyPatch, target: Store
) -> None:
    """Regression: apply_remote used to hand an over-large merge record to the WAL,
    whose refusal poisoned the store; now it is refused before the WAL."""
    monkeypatch.setattr(assign_module, "MAX_PAYLOAD_BYTES", 512)
    monkeypatch.setattr(record_module, "MAX_PAYLOAD_BYTES", 512)
    next_lsn = target.next_lsn
    with pytest.raises(CapacityError, match="one record may hold"):
        target.apply_remote([("big", remote("node-x", 1, "x" * 2000))])
    assert target.poisoned is None
    assert target.next_lsn == next_lsn
    assert target.get("big") is None
    target.put("small", 1)  # the store still takes writes
    assert target.get("small") == 1


# -- SIGKILL during an import ----------------------------------------------------------


def _spawn(store: Path, path: Path, failpoint: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("WALSYNC_FAILPOINTS", None)
    if failpoint is not None:
        env["WALSYNC_FAILPOINTS"] = f"{failpoint}=kill"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.engine._export_child", str(store), str(path)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _state(path: Path) -> Dump:
    with Store.open(path, create=False) as store:
        return dump(store)


@pytest.mark.crash
def test_import_killed_anywhere_is_all_or_nothing(tmp_path: Path) -> None:
    rng = random.Random(7)
    with Store.open(tmp_path / "src", node_id="src") as src:
        for i in range(24):  # incompressible: the import's one WAL frame is ~2.4 MB
            src.put(f"blob/{i:02d}", rng.randbytes(100_000))
        fill_source(src)
        export_file(src, tmp_path / "x.wsx")
    export = tmp_path / "x.wsx"
    pristine = tmp_path / "pristine"
    with Store.open(pristine, node_id="dst") as dst:
        dst.put("c/1", "the target's own")  # concurrent with imported versions
        dst.put("mine", [1, 2])
    before = _state(pristine)
    done = tmp_path / "done"
    shutil.copytree(pristine, done)
    with Store.open(done) as store:
        started = time.perf_counter()
        import_file(store, export)
        import_seconds = time.perf_counter() - started
        after = dump(store)
    assert after != before

    def kill_and_check(name: str, failpoint: str | None, delay: float | None) -> Dump:
        """Import in a child killed at ``failpoint`` or after ``delay``; the reopened
        state. The killed directory is kept as ``<name>-raw`` (opening replays and
        checkpoints)."""
        work = tmp_path / name
        shutil.copytree(pristine, work)
        child = _spawn(work, export, failpoint)
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"S\n", (line, child.stderr.read() if child.stderr else b"")
        if delay is not None:
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
        rest, _err = child.communicate(timeout=60)
        if delay is None:
            assert child.returncode == -signal.SIGKILL, (failpoint, child.returncode, rest)
        shutil.copytree(work, tmp_path / f"{name}-raw")
        state = _state(work)
        assert state in (before, after), (name, "half an import")
        return state

    # named failpoints: before the WAL write nothing is there; once the frame is
    # written (synced or not) the process's death does not lose it
    for failpoint, expected in [
        ("export.import_verified", before),
        ("export.import_loaded", before),
        ("wal.before_write", before),
        ("wal.after_write", after),
        ("wal.after_sync", after),
    ]:
        assert kill_and_check(failpoint, failpoint, None) == expected, failpoint

    # torn mid-write: the import's frame cut short or zeroed at several points
    raw = tmp_path / "wal.after_write-raw"
    first_lsn, segment = StoreLayout(raw).list_segments()[-1]
    frame = scan_segment(segment, first_lsn, is_last=True).frames[-1]
    assert frame.size > 2_000_000  # the import's record
    for n, cut in enumerate([1, 20, 32, 33, frame.size // 2, frame.size - 16, frame.size - 1]):
        work = tmp_path / f"torn-{n}"
        shutil.copytree(raw, work)
        data = bytearray(segment.read_bytes())
        if n % 2:  # the rest still the preallocated zeros (and some of it was not zero)
            lost = slice(frame.offset + cut, frame.offset + frame.size)
            assert any(data[lost]), cut
            data[lost] = bytes(frame.size - cut)
        else:
            del data[frame.offset + cut :]
        (work / "wal" / segment.name).write_bytes(bytes(data))
        assert _state(work) == before, ("torn", cut)

    # SIGKILL at random moments of the import (kill_and_check asserts the outcome)
    for n in range(6):
        kill_and_check(f"timed-{n}", None, rng.uniform(0, import_seconds * 1.5))


# -- the format document ----------------------------------------------------------------


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    return {p.split("\n", 1)[0].strip(): p.split("\n", 1)[1] for p in parts[1:]}


def _layout(section: str) -> list[tuple[str, int, int]]:
    """(field, offset, size) rows of the first offset/size/field table; sizes ``n``
    are -1, offsets like ``16+n`` are -1."""
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| offset") or "---" in line:
            if rows:
                break
            continue
        offset, size, field = (c.strip() for c in line.strip().strip("|").split("|"))
        rows.append((field, int(offset) if offset.isdigit() else -1,
                     int(size) if size.isdigit() else -1))
    return rows


def test_export_md_matches_the_code() -> None:
    text = EXPORT_MD.read_text()
    sections = _sections(text)
    assert f"**export {EXPORT_VERSION}**" in text
    header = _layout(sections["Header"])
    assert header[0][1:] == (0, 8)
    magic = re.search(r"`((?:[0-9a-f]{2} )*[0-9a-f]{2})`", header[0][0])
    assert magic
    assert bytes.fromhex(magic.group(1)) == EXPORT_MAGIC
    assert header[1][1:] == (8, 2)
    assert f"({EXPORT_VERSION})" in header[1][0]
    assert header[3][1:] == (12, 4)
    assert f"at most {MAX_HEADER_BODY_BYTES}" in header[3][0]
    assert header[4][1] == HEADER_PREFIX_BYTES
    frame = _layout(sections["Frame"])
    assert [(o, s) for _, o, s in frame] == [(0, 8), (8, 1), (9, 1), (10, 2), (12, 4),
                                             (FRAME_HEADER_BYTES, -1)]
    assert f"{KIND_RECORD} record, {KIND_TRAILER} trailer" in frame[1][0]
    trailer = _layout(sections["Trailer"])
    assert sum(s for _, _, s in trailer) == TRAILER_PAYLOAD_BYTES
    assert f"{TRAILER_PAYLOAD_BYTES}-byte payload" in sections["Trailer"]
    fmt = EXPORT_MD.with_name("FORMAT.md").read_text()
    assert "EXPORT.md" in fmt


def test_reader_and_writer_agree_on_arbitrary_headers(tmp_path: Path) -> None:
    header = ExportHeader("n-1", "prefix", "päth/ü", 123, 456)
    chunks: list[bytes] = []
    writer = ExportWriter(chunks.append, header)
    sibling = remote("node-x", 1, {"v": 1})
    writer.add("päth/ü/1", sibling)
    writer.finish()
    data = b"".join(chunks)
    path = tmp_path / "h.wsx"
    path.write_bytes(data)
    summary = verify_export_file(path)
    assert summary.header == header
    assert summary.records == 1
    assert summary.checksum == writer.checksum == _U64.unpack(data[-8:])[0]
    with pytest.raises(ValueError, match="in order"):
        writer.add("a", sibling)
    assert issubclass(ExportFormatError, CorruptionError)
    assert issubclass(ExportFormatError, WalsyncError)
