"""In-process statistics (engine/metrics.py, Store.stats()).

Counters move with commits and match what the WAL holds; percentiles come from
the histogram within one bucket's width of the exact ones; concurrent
committers are counted exactly once each, in group commits no larger than the
number of committers; replay at open is reported; failures injected through
the file-layer seam are counted by error class.
"""

from __future__ import annotations

import errno
import itertools
import math
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from walsync.engine import ConflictError, Put, Store, StorePoisonedError, _fs
from walsync.engine.metrics import (
    BATCH_RECORDS_BOUNDS,
    LATENCY_BOUNDS_NS,
    LATENCY_BOUNDS_SECONDS,
    Histogram,
    HistogramSnapshot,
)
from walsync.engine.record import SEGMENT_HEADER_BYTES

#: consecutive latency bounds differ by at most this factor
BUCKET_RATIO = 1.25


def frame_bytes(store: Store) -> int:
    """Bytes of every frame the WAL holds, read back by the WAL reader."""
    return sum(r.size_bytes for r in store.wal_reader().read(0, store.applied_lsn, 1 << 20))


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def test_bounds_are_log_spaced_and_the_nanosecond_bounds_match() -> None:
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BOUNDS_SECONDS)]
    assert max(ratios) <= BUCKET_RATIO * (1 + 1e-12)
    assert min(ratios) > 1.0
    assert (LATENCY_BOUNDS_SECONDS[0], LATENCY_BOUNDS_SECONDS[-1]) == (1e-6, 100.0)
    assert Histogram(LATENCY_BOUNDS_NS, divisor=1e9).snapshot().bounds == LATENCY_BOUNDS_SECONDS


def test_stats_move_with_commits(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        before = store.stats()
        assert (before.commits, before.wal_bytes_written, before.wal_syncs) == (0, 0, 0)
        assert before.commit_p50_seconds is None
        assert before.group_commit_batch_size.count == 0

        for i in range(3):
            store.put(f"k{i}", {"i": i, "pad": "x" * 100})
        with store.batch() as b:
            b.put("a", 1)
            b.delete("k0")
        store.put("lazy", "v", durability="none")
        s = store.stats()
        assert s.commits == 5
        assert s.commit_duration.count == 5
        # one record per group commit: each commit waited for its own
        assert s.group_commit_batch_size.count == 5
        assert s.group_commit_batch_size.sum == 5
        assert s.wal_bytes_written == frame_bytes(store) + SEGMENT_HEADER_BYTES
        assert s.wal_syncs == 4  # the 'none' commit was not synced
        assert s.applied_lsn == store.applied_lsn == 5
        p50, p99 = s.commit_p50_seconds, s.commit_p99_seconds
        assert p50 is not None
        assert p99 is not None
        assert 0 < p50 <= p99 < 10
        assert 0 < s.commit_duration.sum < 10

        store.flush()  # syncs the 'none' commit
        store.flush()  # nothing left to sync
        assert store.stats().wal_syncs == 5

        with pytest.raises(ConflictError):
            store.put("a", 2, expect=None)
        store.checkpoint()
        after = store.stats()
        assert after.commits == 5  # a refused commit is an error, not a commit
        assert dict(after.errors) == {"ConflictError": 1}
        assert after.checkpoints == s.checkpoints + 1
        assert not after.poisoned
    # the snapshot is immutable and earlier ones do not change
    assert s.commits == 5
    with pytest.raises(TypeError):
        after.errors["ConflictError"] = 0  # type: ignore[index]


def test_commit_latency_matches_what_callers_measured(tmp_path: Path) -> None:
    """The store's p50/p99 agree, within a bucket, with the latencies seen around put()."""
    seen: list[float] = []
    with Store.open(tmp_path / "s") as store:
        for i in range(60):
            started = time.perf_counter()
            store.put(f"k{i % 7}", "v" * 1000)
            seen.append(time.perf_counter() - started)
        s = store.stats()
    assert s.commits == 60
    assert s.commit_duration.sum <= sum(seen)  # measured inside the caller's interval
    for q in (0.5, 0.99):
        got = s.commit_duration.quantile(q)
        exact = exact_quantile(seen, q)
        # within the bucket of the store's own (slightly shorter) measurement
        assert got is not None
        assert exact / (BUCKET_RATIO * 1.05) <= got <= exact * BUCKET_RATIO, (q, got, exact)


def test_quantiles_from_known_latencies() -> None:
    rng = random.Random(7)
    # a commit-like distribution: mostly ~200 µs, a tail into tens of milliseconds
    values_ns = [int(rng.lognormvariate(math.log(200_000), 0.4)) for _ in range(5000)]
    values_ns += [int(rng.uniform(5e6, 50e6)) for _ in range(60)]
    hist = Histogram(LATENCY_BOUNDS_NS, divisor=1e9)
    for v in values_ns:
        hist.observe(v)
    snap = hist.snapshot()
    seconds = [v / 1e9 for v in values_ns]
    assert snap.count == len(values_ns)
    assert snap.sum == pytest.approx(sum(seconds))
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = exact_quantile(seconds, q)
        got = snap.quantile(q)
        assert got is not None
        # the estimate lies in the bucket that holds the exact value
        i = next(i for i, b in enumerate(snap.bounds) if exact <= b)
        low = snap.bounds[i - 1] if i else 0.0
        assert low <= got <= snap.bounds[i], (q, exact, got)
        assert exact / BUCKET_RATIO <= got <= exact * BUCKET_RATIO


def test_histogram_buckets_edges_and_merging() -> None:
    hist = Histogram((1, 2, 4, 8))
    for v in (1, 1, 2, 3, 8, 9, 100):
        hist.observe(v)
    snap = hist.snapshot()
    # a value equal to a bound falls in that bound's bucket (Prometheus 'le')
    assert snap.counts == (2, 1, 1, 1, 2)
    assert snap.cumulative() == [(1, 2), (2, 3), (4, 4), (8, 5), (math.inf, 7)]
    assert snap.cumulative((2, 8)) == [(2, 3), (8, 5), (math.inf, 7)]
    with pytest.raises(ValueError, match="subset"):
        snap.cumulative((3,))
    assert snap.quantile(0.25) == pytest.approx(1 * 1.75 / 2)  # rank 1.75 of 2 in (0, 1]
    assert snap.quantile(1.0) == 8  # above every bound: the highest bound
    with pytest.raises(ValueError, match="quantile"):
        snap.quantile(1.5)
    assert HistogramSnapshot((1.0,), (0, 0), 0.0).quantile(0.5) is None
    with pytest.raises(ValueError, match="increasing"):
        Histogram((2, 1))


def test_batch_sizes_under_concurrent_committers(tmp_path: Path) -> None:
    threads, each = 8, 25
    with Store.open(tmp_path / "s", group_wait_seconds=0.002) as store:
        start = threading.Barrier(threads)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                start.wait()
                for i in range(each):
                    store.put(f"t{t}/{i}", "v" * 200)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        assert not errors
        s = store.stats()
        batches = s.group_commit_batch_size
        assert s.commits == threads * each  # every commit counted once, none lost
        assert batches.sum == threads * each  # every record in exactly one group commit
        assert batches.count == s.wal_syncs  # one fdatasync per group commit
        assert batches.count < threads * each  # committers shared group commits
        # a group commit never holds more records than there are committers
        assert sum(n for b, n in zip(BATCH_RECORDS_BOUNDS, batches.counts, strict=False)
                   if b > threads) + batches.counts[-1] == 0
        assert s.wal_bytes_written == frame_bytes(store) + SEGMENT_HEADER_BYTES


def test_replay_stats_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path) as store:
        for i in range(40):
            store.put(f"k{i}", i)
        store.set_retain_floor(1)  # keep the WAL, so that it alone can rebuild the state
        assert store.stats().replay_records == 0
    shutil.rmtree(path / "snapshot")
    with Store.open(path) as store:
        report = store.recovery
        assert report is not None
        s = store.stats()
        assert s.replay_records == report.replayed_records > 0
        assert report.applied_lsn_before + report.replayed_records == 40
        assert s.replay_seconds == report.seconds > 0
        assert s.commits == 0  # counters are per process, per open
        assert s.applied_lsn == 40


class Failing:
    """Stands in for an ``engine._fs`` function: raises OSError(code) from its first call."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        raise OSError(self.code, "injected")


@pytest.mark.parametrize(("target", "code", "kind"), [
    ("fdatasync", errno.EIO, "StorePoisonedError"),
    ("writev", errno.ENOSPC, "DiskFullError"),
])
def test_error_counts_after_an_injected_fault(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, code: int, kind: str
) -> None:
    with Store.open(tmp_path / "s") as store:
        store.put("ok", 1)
        good = store.stats()
        failing = Failing(code)
        monkeypatch.setattr(_fs, target, failing)
        with pytest.raises(StorePoisonedError) as first:
            store.commit([Put("bad", 2)])
        assert type(first.value).__name__ == kind
        with pytest.raises(StorePoisonedError) as refused:
            store.put("refused", 3)  # refused without touching the file
        # the refusal is of the failure's own kind (a full disk stays DiskFullError)
        assert type(refused.value).__name__ == kind
        assert str(first.value) in str(refused.value)  # it says why
        monkeypatch.undo()
        s = store.stats()
        assert failing.calls == 1
        assert s.poisoned
        assert Counter(s.errors) == Counter({kind: 2})
        assert s.commits == good.commits == 1
        assert s.wal_syncs == good.wal_syncs  # the failed sync is not counted as done
    # stats stay readable after close
    assert store.stats().errors == s.errors


def test_wal_end_bytes_excludes_preallocated_space(tmp_path: Path) -> None:
    """What replication lag in bytes is measured against: written frames and segment
    headers, across rotations, not the active segment's zero-filled reserve."""
    with Store.open(tmp_path / "s", segment_bytes=8192) as store:
        assert store.wal_end_bytes == 0
        for i in range(30):
            store.put(f"k{i}", "v" * 700)
        segments = store.info().segments
        assert segments > 2  # rotated
        assert store.wal_end_bytes == frame_bytes(store) + segments * SEGMENT_HEADER_BYTES
        assert store.wal_end_bytes == store.stats().wal_bytes_written
        assert store.info().wal_bytes > store.wal_end_bytes  # the file holds preallocated zeros
