"""Byte flips and truncations sampled over a large WAL (the small one is swept exhaustively
in test_corruption_wal.py): detection must not depend on the log being small.

The store holds about 4 MiB of WAL in four 1 MiB segments (several thousand
frames, some of them zstd-compressed), kept whole by a retain floor. Each
case damages one working copy in place, runs the read-only ``verify`` and
restores the bytes. A flip is accepted only as a torn tail inside the last
frame of the last segment; every cut of a sealed segment is damage.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from walsync import engine
from walsync.engine import CorruptionError, Store

SEGMENT_BYTES = 1 << 20
FLIPS = 400
CUTS = 120


@pytest.fixture(scope="module")
def large_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("large") / "s"
    rng = random.Random(7)
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        store.set_retain_floor(1)
        for i in range(3600):
            if i % 50 == 0:  # compressible: stored zstd-compressed
                store.put(f"big/{i}", "walsync " * 1200, durability="none")
            else:
                store.put(f"k/{i % 700}", rng.randbytes(rng.randrange(200, 1400)),
                          durability="none")
    assert len(list((path / "wal").glob("*.wal"))) >= 4
    return path


def _segments(path: Path) -> list[Path]:
    return sorted((path / "wal").glob("*.wal"))


@pytest.mark.parametrize("writer", ["died", "closed"])
def test_sampled_byte_flips_in_a_large_wal_are_all_detected(large_store: Path,
                                                           tmp_path: Path, writer: str) -> None:
    """A writer that died leaves its OPEN marker: damage no later frame vouches
    for may then be a torn tail (its commits were made with durability 'none',
    so nothing vouches for most of the last segment). After a clean close the
    whole WAL was synced, so every flip is damage."""
    work = tmp_path / "work"
    shutil.copytree(large_store, work)
    if writer == "died":
        (work / "OPEN").write_text('{"boot_id": null, "pid": 1}')
    segments = _segments(work)
    assert sum(s.stat().st_size for s in segments) >= 3 * SEGMENT_BYTES
    assert engine.verify(work).ok
    rng = random.Random(int(os.environ.get("WALSYNC_CRASH_SEED", "0") or 0) or 11)
    torn = 0
    for _ in range(FLIPS):
        seg = rng.choice(segments)
        data = seg.read_bytes()
        offset = rng.randrange(len(data))
        mask = rng.randrange(1, 256)
        where = f"flip ^{mask:#04x} at {seg.name}+{offset}"
        fd = os.open(seg, os.O_RDWR)
        try:
            os.pwrite(fd, bytes([data[offset] ^ mask]), offset)
            report = engine.verify(work)
            if report.ok:
                tail = report.torn_tail
                assert tail is not None, f"{where}: not detected at all"
                assert seg == segments[-1], f"{where}: a torn tail in a sealed segment"
                assert offset >= tail.offset, f"{where}: damage before the cut: {tail}"
                torn += 1
            else:
                assert report.damage[0].path == str(seg), f"{where}: {report.damage}"
        finally:
            os.pwrite(fd, data[offset:offset + 1], offset)
            os.close(fd)
    if writer == "closed":
        assert torn == 0, "a cleanly closed WAL has no torn tail to cut"
    else:
        assert 0 < torn < FLIPS // 2
    assert engine.verify(work).ok


def test_sampled_truncations_of_large_sealed_segments_are_all_detected(
    large_store: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    shutil.copytree(large_store, work)
    sealed = _segments(work)[:-1]
    rng = random.Random(13)
    for _ in range(CUTS):
        seg = rng.choice(sealed)
        data = seg.read_bytes()
        cut = rng.randrange(len(data))
        fd = os.open(seg, os.O_RDWR)
        try:
            os.ftruncate(fd, cut)
            report = engine.verify(work)
            assert not report.ok, f"{seg.name} cut at {cut} of {len(data)} not detected"
        finally:
            os.pwrite(fd, data[cut:], cut)
            os.close(fd)
    assert engine.verify(work).ok


def test_open_refuses_a_damaged_last_record_of_a_cleanly_closed_store(tmp_path: Path) -> None:
    """After a clean close every record was synced and acknowledged: a flipped byte in
    the last one is corruption for open as for verify, never a torn tail to cut."""
    path = tmp_path / "s"
    with Store.open(path) as store:
        for i in range(5):
            store.put(f"k{i}", {"i": i, "pad": "x" * 100})
    assert not (path / "OPEN").exists()
    seg = _segments(path)[-1]
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0x40  # inside the last frame's payload
    seg.write_bytes(bytes(data))
    assert not engine.verify(path).ok
    with pytest.raises(CorruptionError, match="synced in full"):
        Store.open(path)
    assert seg.read_bytes() == bytes(data), "open changed the damaged segment"
