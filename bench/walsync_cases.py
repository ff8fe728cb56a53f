"""The same measurements through the walsync engine's public API.

Only ``Store.open / put / get / checkpoint / close`` and ``store.recovery`` are
used, so the numbers are what an application sees. The engine is imported
lazily (``load_engine``) so the baselines still run when it does not import.

Run as a module, this file is also the child process that fills a store for
the replay case and then dies without closing it::

    python -m bench.walsync_cases fill PATH RECORDS VALUE_BYTES
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .common import ValuePool

__all__ = [
    "WalsyncGet",
    "WalsyncPut",
    "load_engine",
    "open_after_close_ms",
    "open_store",
    "replay_rate",
]

_engine: Any = None
_engine_error: str | None = None


def load_engine() -> tuple[Any, str | None]:
    """(the engine module, None) or (None, why it did not import)."""
    global _engine, _engine_error
    if _engine is None and _engine_error is None:
        try:
            from walsync import engine

            engine.Store  # noqa: B018 - fail here, not in the first case, if it is missing
            _engine = engine
        except Exception as exc:  # noqa: BLE001 - a half-written engine may raise anything
            _engine_error = f"{type(exc).__name__}: {exc}"
    return _engine, _engine_error


def open_store(path: Path, *, create: bool = True, durability: str | None = None,
               **options: Any) -> Any:
    """Store.open, optionally with a non-default durability ('none', 'local') and
    other StoreOptions fields."""
    engine, error = load_engine()
    if engine is None:
        raise RuntimeError(f"engine did not import: {error}")
    if durability is None:
        return engine.Store.open(path, create=create, **options)
    try:
        return engine.Store.open(path, create=create, durability=durability, **options)
    except TypeError:
        from walsync.engine.options import Durability, StoreOptions

        options = StoreOptions(durability=Durability(durability))
        return engine.Store.open(path, create=create, options=options)


class WalsyncPut:
    """One durable ``store.put`` per op (durability 'local': fdatasync'ed on return)."""

    def __init__(
        self, store: Any, values: ValuePool, prefix: str = "k", key: str | None = None
    ) -> None:
        self.store = store
        self.values = values
        self.prefix = prefix
        self.key = key  # if set, every op overwrites this one key

    def op(self, i: int) -> None:
        self.store.put(self.key or f"{self.prefix}{i:012d}", self.values[i])

    def close(self) -> None:
        return None


class WalsyncGet:
    """``store.get`` of random existing keys (the order is fixed up front)."""

    def __init__(self, store: Any, n_keys: int, order: list[int]) -> None:
        self.store = store
        self.keys = [f"k{i:012d}" for i in range(n_keys)]
        self.order = order

    def op(self, i: int) -> None:
        if self.store.get(self.keys[self.order[i % len(self.order)]]) is None:
            raise KeyError(self.keys[self.order[i % len(self.order)]])

    def close(self) -> None:
        return None


def fill(store: Any, values: ValuePool, n: int, threads: int = 8) -> None:
    """Put keys k0..k(n-1) with ``threads`` threads (so group commit batches them)."""
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(t, n, threads):
                store.put(f"k{i:012d}", values[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller's thread
            errors.append(exc)

    ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- replay


def _base_snapshot(path: Path) -> Path:
    return path.with_name(path.name + ".snapshot-at-open")


def _child_fill(path: Path, records: int, value_bytes: int) -> None:
    """Fill a new store, report, then exit without closing or checkpointing.

    walsync applies every commit to its LMDB snapshot (unsynced) right after
    the WAL write, so after a mere process crash the snapshot is already
    current and open has nothing to replay. What does need replay is a power
    loss: the WAL was synced, the snapshot's unsynced pages are gone, back to
    the last checkpoint. To get that state, the store is created and closed
    (a checkpoint), its snapshot directory copied aside, and only then filled;
    the parent puts the copy back before timing the open.
    """
    values = ValuePool(value_bytes)
    open_store(path).close()
    shutil.copytree(path / "snapshot", _base_snapshot(path))
    t0 = time.perf_counter()
    try:
        # no checkpoint while filling: it would remove the WAL the rewound
        # snapshot needs (a store this large passes checkpoint_every_bytes)
        store = open_store(path, create=False, durability="none",
                           checkpoint_every_bytes=1 << 40)
        method = "durability=none, 1 thread"
    except (TypeError, ValueError):
        store = open_store(path, create=False)
        method = "durability=local, 16 threads"
    if method.startswith("durability=none"):
        for i in range(records):
            store.put(f"k{i:012d}", values[i])
    else:
        fill(store, values, records, threads=16)
    seconds = time.perf_counter() - t0
    print(json.dumps({"written": records, "fill_s": round(seconds, 2), "method": method}),
          flush=True)
    os._exit(0)  # no close, no checkpoint: the WAL keeps every record


def _rewind_snapshot(store_dir: Path, base: Path) -> None:
    """Put back the snapshot as of the last checkpoint (what a power loss leaves)."""
    shutil.rmtree(store_dir / "snapshot")
    shutil.copytree(base, store_dir / "snapshot")


def replay_rate(work: Path, records: int, value_bytes: int, copies: int) -> dict[str, Any]:
    """Records/s of ``Store.open`` replaying a WAL the snapshot has not seen.

    One more copy is opened with Python's cyclic GC disabled: a diagnostic
    (``gc_off_per_s``) showing how much of the replay time the GC takes.

    A child process creates a store, checkpoints it, writes ``records`` puts
    (~100 bytes each) and calls os._exit(0); the snapshot is then rewound to
    its checkpoint (see _child_fill), so open must replay every record. The
    crashed store is copied ``copies - 1`` times (untimed) so open can be timed
    more than once; the page cache is warm (the WAL was just written).
    """
    src = work / "replay-0"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "bench.walsync_cases", "fill", str(src), str(records),
         str(value_bytes)],
        cwd=root, capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"fill child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    wal_bytes = sum(f.stat().st_size for f in (src / "wal").glob("*.wal"))
    dirs = [src]
    for k in range(1, copies + 1):
        dst = work / f"replay-{k}"
        shutil.copytree(src, dst)
        dirs.append(dst)
    rates: list[float] = []
    open_s: list[float] = []
    replayed = 0
    gc_off_rate: float | None = None
    for k, d in enumerate(dirs):
        _rewind_snapshot(d, _base_snapshot(src))
        gc_off = k == len(dirs) - 1
        gc_was_on = gc.isenabled()
        if gc_off:
            gc.disable()
        t0 = time.perf_counter_ns()
        try:
            store = open_store(d, create=False)
        finally:
            elapsed = (time.perf_counter_ns() - t0) / 1e9
            if gc_was_on:
                gc.enable()
        try:
            replayed = int(store.recovery.replayed_records)
            if store.get(f"k{records - 1:012d}") is None:
                raise RuntimeError("the last record written before the crash is missing")
        finally:
            store.close()
        if gc_off:
            gc_off_rate = replayed / elapsed
            continue
        open_s.append(elapsed)
        rates.append(replayed / elapsed)
    return {
        "records_written": child["written"],
        "replayed_records": replayed,
        "wal_bytes": wal_bytes,
        "wal_bytes_per_record": round(wal_bytes / max(1, child["written"]), 1),
        "fill_s": child["fill_s"],
        "fill_method": child["method"],
        "open_s": [round(s, 3) for s in open_s],
        "rate_per_s": statistics.median(rates),
        "gc_off_per_s": round(gc_off_rate) if gc_off_rate else None,
        "store_dirs": [str(d) for d in dirs],  # cleanly closed now
    }


def _child_open(path: Path) -> None:
    """Open (replaying) and close a store, sampling this process's memory: prints
    the records replayed, the seconds, the peak anonymous RSS (the process's own
    memory) and the peak RSS (with the pages of LMDB's mapped file)."""
    import resource

    def rss_mb(name: str) -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) / 1024
        return 0.0

    peak_anon = [rss_mb("RssAnon")]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak_anon[0] = max(peak_anon[0], rss_mb("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    store = open_store(path, create=False)
    seconds = time.perf_counter() - t0
    replayed = int(store.recovery.replayed_records)
    store.close()
    done.set()
    print(json.dumps({"replayed": replayed, "seconds": seconds,
                      "peak_anon_mb": max(peak_anon[0], rss_mb("RssAnon")),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
          flush=True)


def replay_memory(work: Path, records: int, value_bytes: int) -> dict[str, Any]:
    """Peak memory of ``Store.open`` replaying ``records`` records after a power
    loss (the state replay_rate builds), measured in a child process of its own."""
    src = work / "replay-memory"
    root = Path(__file__).resolve().parent.parent
    fill = subprocess.run(
        [sys.executable, "-m", "bench.walsync_cases", "fill", str(src), str(records),
         str(value_bytes)],
        cwd=root, capture_output=True, text=True, timeout=1200, check=False,
    )
    if fill.returncode != 0 or not fill.stdout.strip():
        raise RuntimeError(f"fill child failed ({fill.returncode}): {fill.stderr[-2000:]}")
    _rewind_snapshot(src, _base_snapshot(src))
    opened = subprocess.run(
        [sys.executable, "-m", "bench.walsync_cases", "open", str(src)],
        cwd=root, capture_output=True, text=True, timeout=1200, check=False,
    )
    if opened.returncode != 0 or not opened.stdout.strip():
        raise RuntimeError(f"open child failed ({opened.returncode}): {opened.stderr[-2000:]}")
    got: dict[str, Any] = json.loads(opened.stdout.strip().splitlines()[-1])
    got["wal_bytes"] = sum(f.stat().st_size for f in (src / "wal").glob("*.wal"))
    return got


def open_after_close_ms(path: Path, runs: int) -> list[float]:
    """Store.open of a cleanly closed store, ms per run (close is untimed)."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        store = open_store(path, create=False)
        out.append((time.perf_counter_ns() - t0) / 1e6)
        store.close()
    return out


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "fill":
        _child_fill(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    if len(sys.argv) == 3 and sys.argv[1] == "open":
        _child_open(Path(sys.argv[2]))
        sys.exit(0)
    print("usage: python -m bench.walsync_cases fill PATH RECORDS VALUE_BYTES\n"
          "       python -m bench.walsync_cases open PATH", file=sys.stderr)
    sys.exit(2)
