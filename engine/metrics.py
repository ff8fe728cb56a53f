"""In-process statistics of a store: commit latency, group commits, WAL bytes, replay, errors.

Why the engine keeps its own collectors instead of a metrics library's: the
engine has no network side, and the commit path may spend well under a
microsecond on bookkeeping (a durable commit costs about 200 µs; the bench
measures it). A commit adds one histogram observation: a ``bisect`` over fixed
bounds and two additions under a lock nobody holds for longer. The group
commit's counters are written by the WAL-stage leader alone (one thread at a
time), so they need no lock at all.

Histograms have fixed, log-spaced buckets (fourteen a decade, each at most
1.25 times the one below), so p50 and p99 come from the counts with a bounded
error and no sample is ever kept. ``walsync sync --metrics-port`` exposes
these same numbers to Prometheus (sync/metrics.py), read at scrape time.

Threads: every method may be called from any thread; a snapshot is
immutable and consistent per histogram (counts and sum are read together).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from .replay import RecoveryReport

__all__ = [
    "BATCH_RECORDS_BOUNDS",
    "LATENCY_BOUNDS_NS",
    "LATENCY_BOUNDS_SECONDS",
    "Histogram",
    "HistogramSnapshot",
    "StoreMetrics",
    "StoreStats",
]

#: the steps of one decade; consecutive bounds differ by at most 1.25x
_DECADE_STEPS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)


def _log_bounds(lowest_exponent: int, highest_exponent: int) -> tuple[float, ...]:
    """10**lowest_exponent .. 10**highest_exponent in ``_DECADE_STEPS``."""
    bounds = [
        float(f"{step}e{exponent}")
        for exponent in range(lowest_exponent, highest_exponent)
        for step in _DECADE_STEPS
    ]
    bounds.append(float(f"1e{highest_exponent}"))
    return tuple(bounds)


#: latency bucket upper bounds: 1 µs .. 100 s (commits, pushes)
LATENCY_BOUNDS_SECONDS = _log_bounds(-6, 2)
#: the same bounds in nanoseconds, what ``time.perf_counter_ns`` differences are
#: compared with (integers: no float conversion in the commit path)
LATENCY_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BOUNDS_SECONDS)
#: records written by one group commit (one writev, one fdatasync)
BATCH_RECORDS_BOUNDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024,
)


@dataclass(frozen=True)
class HistogramSnapshot:
    """Bucket counts at one moment. ``counts[i]`` holds observations ``v`` with
    ``bounds[i-1] < v <= bounds[i]``; the last count, those above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1), interpolated inside its bucket (as Prometheus's
        ``histogram_quantile`` does); the highest bound if it lies above every
        bound; None with no observations."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is not within 0..1")
        total = self.count
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                if i == len(self.bounds):
                    return self.bounds[-1]
                low = self.bounds[i - 1] if i else 0.0
                high = self.bounds[i]
                return low + (high - low) * max(0.0, rank - seen) / n
            seen += n
        return self.bounds[-1]  # q == 0 with every observation above the bounds

    def cumulative(self, bounds: Sequence[float] | None = None) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` pairs ending with ``(inf, count)``,
        for exposition; ``bounds`` (a subset of this histogram's) merges buckets."""
        keep = set(self.bounds if bounds is None else bounds)
        if not keep <= set(self.bounds):
            raise ValueError("the merged bounds must be a subset of the histogram's bounds")
        out: list[tuple[float, int]] = []
        seen = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            seen += n
            if bound in keep:
                out.append((bound, seen))
        out.append((float("inf"), seen + self.counts[-1]))
        return out


class Histogram:
    """Counts observations into fixed buckets; snapshots report them divided by
    ``divisor`` (1e9: nanoseconds observed, seconds reported; dividing by an exact
    power of ten gives the same floats as the decimal bounds written out)."""

    __slots__ = ("_bounds", "_counts", "_divisor", "_lock", "_sum")

    def __init__(self, bounds: Sequence[float], *, divisor: float = 1.0) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be strictly increasing")
        self._bounds = tuple(bounds)
        self._divisor = divisor
        self._counts = [0] * (len(bounds) + 1)
        self._sum: float = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect_left(self._bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts = tuple(self._counts)
            total = self._sum
        d = self._divisor
        return HistogramSnapshot(tuple(b / d for b in self._bounds), counts, total / d)


@dataclass(frozen=True)
class StoreStats:
    """A store's counters since this process opened it (see :meth:`Store.stats`)."""

    #: seconds per commit that returned, from the call until it was durable (as
    #: asked) and applied, remote acknowledgement included for 'remote'
    commit_duration: HistogramSnapshot
    #: WAL bytes written (frames and segment headers), local and merge records
    wal_bytes_written: int
    #: fdatasync calls the commit path made on the WAL (one per synced group commit)
    wal_syncs: int
    #: records per group commit (one writev each)
    group_commit_batch_size: HistogramSnapshot
    #: records replayed from the WAL when the store was opened, and how long that took
    replay_records: int
    replay_seconds: float
    #: checkpoints done (explicit, background and at close)
    checkpoints: int
    #: commits that raised, by error class name (ConflictError, DiskFullError, ...), and
    #: failed background checkpoints
    errors: Mapping[str, int]
    applied_lsn: int
    #: the store refuses writes since a failed write or fsync
    poisoned: bool

    @property
    def commits(self) -> int:
        return self.commit_duration.count

    @property
    def commit_p50_seconds(self) -> float | None:
        return self.commit_duration.quantile(0.50)

    @property
    def commit_p99_seconds(self) -> float | None:
        return self.commit_duration.quantile(0.99)


class StoreMetrics:
    """The collectors one Store owns. The WAL-stage fields are written only by
    the thread leading the WAL stage (``record_group_commit``, ``record_sync``);
    ``record_checkpoint`` only under the store's checkpoint lock."""

    __slots__ = (
        "_errors", "_errors_lock", "batch_records", "checkpoints", "commit_ns", "wal_bytes",
        "wal_syncs",
    )

    def __init__(self) -> None:
        self.commit_ns = Histogram(LATENCY_BOUNDS_NS, divisor=1e9)
        self.batch_records = Histogram(BATCH_RECORDS_BOUNDS)
        self.wal_bytes = 0
        self.wal_syncs = 0
        self.checkpoints = 0
        self._errors: dict[str, int] = {}
        self._errors_lock = threading.Lock()

    def record_group_commit(self, records: int, wal_bytes: int, synced: bool) -> None:
        self.batch_records.observe(records)
        self.wal_bytes += wal_bytes
        if synced:
            self.wal_syncs += 1

    def record_sync(self) -> None:
        self.wal_syncs += 1

    def record_checkpoint(self) -> None:
        self.checkpoints += 1

    def record_error(self, error: BaseException) -> None:
        kind = type(error).__name__
        with self._errors_lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1

    def snapshot(
        self, recovery: RecoveryReport | None, applied_lsn: int, poisoned: bool
    ) -> StoreStats:
        with self._errors_lock:
            errors = dict(self._errors)
        return StoreStats(
            commit_duration=self.commit_ns.snapshot(),
            wal_bytes_written=self.wal_bytes,
            wal_syncs=self.wal_syncs,
            group_commit_batch_size=self.batch_records.snapshot(),
            replay_records=recovery.replayed_records if recovery else 0,
            replay_seconds=recovery.seconds if recovery else 0.0,
            checkpoints=self.checkpoints,
            errors=MappingProxyType(errors),
            applied_lsn=applied_lsn,
            poisoned=poisoned,
        )
