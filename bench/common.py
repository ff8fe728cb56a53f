"""Shared helpers: statistics, timing drivers, filesystem identification.

Nothing here knows about walsync or any baseline; it only measures callables.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "KIB",
    "MIB",
    "FsInfo",
    "Target",
    "Throughput",
    "ValuePool",
    "fs_info",
    "measure_latency",
    "median",
    "percentile",
    "run_threads",
    "us",
]

KIB = 1024
MIB = 1024 * 1024


class Target(Protocol):
    """Something that performs one operation per call, e.g. one durable commit."""

    def op(self, i: int) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(q / 100.0 * len(ordered))))
    return float(ordered[rank - 1])


def median(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    n = len(ordered)
    if n == 0:
        raise ValueError("no samples")
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def us(ns: float) -> float:
    """Nanoseconds to microseconds, rounded for printing."""
    return round(ns / 1000.0, 1)


# ---------------------------------------------------------------- payloads


class ValuePool:
    """A few random (incompressible) values of one size, handed out in turn.

    Generating fresh random bytes per operation would put os.urandom inside the
    timed region; a small pool keeps payloads distinct enough for any engine
    (none deduplicates across records) at no cost.
    """

    def __init__(self, size: int, count: int = 64, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.values: list[Any] = [rng.randbytes(size) for _ in range(count)]

    @classmethod
    def of(cls, values: list[Any]) -> ValuePool:
        """A pool handing out the given values (e.g. dicts) in turn."""
        pool = cls(0, count=0)
        pool.values = list(values)
        return pool

    def __getitem__(self, i: int) -> Any:
        return self.values[i % len(self.values)]


# ---------------------------------------------------------------- drivers


def measure_latency(op: Callable[[int], None], n: int, warmup: int, start: int = 0) -> list[int]:
    """Call op(start), op(start+1), ...; return the last ``n`` latencies in ns.

    The garbage collector stays enabled (the engine runs with it enabled too),
    but a collection is forced first so every measurement starts from the
    same state.
    """
    clock = time.perf_counter_ns
    for i in range(start, start + warmup):
        op(i)
    gc.collect()
    samples = [0] * n
    base = start + warmup
    for j in range(n):
        t0 = clock()
        op(base + j)
        samples[j] = clock() - t0
    return samples


@dataclass
class Throughput:
    ops: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def run_threads(
    n_threads: int,
    setup: Callable[[int], tuple[Callable[[int], None], Callable[[], None]]],
    seconds: float,
    warmup_seconds: float = 0.1,
) -> Throughput:
    """Run ``n_threads`` threads calling their op in a loop; count ops per second.

    ``setup(thread_index)`` runs in the thread and returns ``(op, close)``;
    op receives a per-thread counter. Only operations completed between the
    end of the warm-up and the end of the measuring window are counted (the
    counters are read at both instants), so start-up and wind-down do not
    dilute the rate.
    """
    counts = [0] * n_threads
    stop = threading.Event()
    ready = threading.Barrier(n_threads + 1)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            op, close = setup(t)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            errors.append(exc)
            ready.abort()
            return
        try:
            ready.wait()
            i = t << 40  # distinct key space per thread
            while not stop.is_set():
                op(i)
                i += 1
                counts[t] += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            errors.append(exc)
        finally:
            close()

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(n_threads)]
    for th in threads:
        th.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    c0 = c1 = 0
    t0 = t1 = 0.0
    if not errors:
        time.sleep(warmup_seconds)
        c0, t0 = sum(counts), time.perf_counter()
        time.sleep(seconds)
        c1, t1 = sum(counts), time.perf_counter()
    stop.set()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return Throughput(c1 - c0, t1 - t0)


# ---------------------------------------------------------------- environment


@dataclass
class FsInfo:
    path: str
    mount_point: str
    fstype: str
    device: str
    rotational: str | None
    free_bytes: int
    block_bytes: int

    @property
    def is_memory(self) -> bool:
        return self.fstype in {"tmpfs", "ramfs", "devtmpfs"}

    def as_dict(self) -> dict[str, object]:
        return {
            "dir": self.path,
            "fs_type": self.fstype,
            "fs_mount": self.mount_point,
            "fs_device": self.device,
            "rotational": self.rotational,
            "fs_free_gib": round(self.free_bytes / (1 << 30), 1),
            "fs_block_bytes": self.block_bytes,
        }


def _unescape_mount(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal
    return (
        field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def fs_info(path: str | os.PathLike[str]) -> FsInfo:
    """Which mount (and filesystem type) a path lives on, from /proc/mounts."""
    real = os.path.realpath(path)
    best = ("/", "unknown", "unknown")
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                dev, mnt, fstype = _unescape_mount(parts[0]), _unescape_mount(parts[1]), parts[2]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                # later entries shadow earlier ones on the same mount point
                if inside and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    st = os.statvfs(real)
    rotational: str | None = None
    dev_name = Path(best[2]).name
    rot = Path("/sys/block") / dev_name / "queue" / "rotational"
    if rot.exists():
        rotational = rot.read_text().strip()
    return FsInfo(
        path=real,
        mount_point=best[0],
        fstype=best[1],
        device=best[2],
        rotational=rotational,
        free_bytes=st.f_bavail * st.f_frsize,
        block_bytes=st.f_bsize,
    )


def machine_info() -> dict[str, object]:
    import sqlite3

    import lmdb

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "sqlite": sqlite3.sqlite_version,
        "lmdb": ".".join(str(p) for p in lmdb.version()),
        "py_lmdb": getattr(lmdb, "__version__", "?"),
    }
