"""Baselines: what the same disk does without walsync.

Each baseline is a small class with ``op(i)`` (one operation, e.g. one durable
commit) and ``close()``, so the runner can interleave it with walsync in
rounds; the module-level functions at the bottom are one-shot conveniences
returning raw latency samples (ns) or a Throughput.

Every durable baseline really is durable on return: fdatasync/fsync for the
raw loops, ``synchronous=FULL`` for SQLite, ``sync=True`` for LMDB.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import lmdb
import xxhash

from .common import KIB, MIB, Throughput, ValuePool, measure_latency, run_threads

__all__ = [
    "IdealGroupCommit",
    "JsonCheckpointer",
    "LmdbGet",
    "LmdbSync",
    "PreallocOverwrite",
    "RawAppend",
    "SqliteFull",
    "frame_scan_rate",
    "ideal_group_commit_throughput",
    "json_checkpoint_latency",
    "lmdb_sync_latency",
    "lmdb_sync_throughput",
    "prealloc_overwrite_latency",
    "raw_append_latency",
    "sqlite_full_latency",
    "sqlite_full_throughput",
]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ---------------------------------------------------------------- 1. raw append


class RawAppend:
    """Append one record and fdatasync, per op: the floor for a WAL commit."""

    def __init__(self, path: Path, values: ValuePool) -> None:
        self.values = values
        self.fd = os.open(path, _FLAGS | os.O_APPEND, 0o600)

    def op(self, i: int) -> None:
        _write_all(self.fd, self.values[i])
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------- 2. preallocated


class PreallocOverwrite:
    """pwrite into a zero-filled, already-synced file, then fdatasync.

    No block allocation and no size change, so fdatasync need not touch
    metadata: the cheapest durable write a file can get. Wraps around when
    ``capacity`` records were written.
    """

    def __init__(self, path: Path, values: ValuePool, capacity: int) -> None:
        self.values = values
        self.record = len(values[0])
        self.capacity = capacity
        self.fd = os.open(path, _FLAGS | os.O_TRUNC, 0o600)
        zeros = bytes(MIB)
        remaining = self.record * capacity
        while remaining > 0:
            chunk = min(remaining, MIB)
            _write_all(self.fd, zeros[:chunk])
            remaining -= chunk
        os.fsync(self.fd)

    def op(self, i: int) -> None:
        os.pwrite(self.fd, self.values[i], (i % self.capacity) * self.record)
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------- 3. ideal group commit


class IdealGroupCommit:
    """Leader/follower group commit: one writev + fdatasync per batch.

    A committer enqueues its record and waits. If no leader is active it
    becomes the leader: it takes every pending record, writes them with one
    os.writev, fdatasyncs, marks them durable and wakes the waiters. With
    ``gather_s > 0`` the leader first waits up to that long for the other
    ``expected`` committers to enqueue (it stops early once all have), trading
    a little latency for bigger batches.
    """

    def __init__(
        self, path: Path, values: ValuePool, gather_s: float = 0.0, expected: int = 8
    ) -> None:
        self.values = values
        self.gather_s = gather_s
        self.expected = expected
        self.fd = os.open(path, _FLAGS | os.O_APPEND, 0o600)
        self.lock = threading.Lock()
        self.durable = threading.Condition(self.lock)
        self.arrival = threading.Condition(self.lock)
        self.pending: list[bytes] = []
        self.enqueued = 0
        self.synced = 0
        self.leader = False
        self.gathering = False
        self.batches = 0
        self.batched_records = 0

    def op(self, i: int) -> None:
        record = self.values[i]
        with self.lock:
            self.pending.append(record)
            self.enqueued += 1
            mine = self.enqueued
            if self.gathering:
                self.arrival.notify()
            while self.leader and self.synced < mine:
                self.durable.wait()
            if self.synced >= mine:
                return
            self.leader = True
            if self.gather_s > 0 and len(self.pending) < self.expected:
                self.gathering = True
                deadline = time.perf_counter() + self.gather_s
                while len(self.pending) < self.expected:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self.arrival.wait(left)
                self.gathering = False
            batch, self.pending = self.pending, []
            upto = self.enqueued
        try:
            os.writev(self.fd, batch)  # <= expected records: never a short write here
            os.fdatasync(self.fd)
        finally:
            with self.lock:
                self.synced = upto
                self.leader = False
                self.batches += 1
                self.batched_records += len(batch)
                self.durable.notify_all()

    @property
    def mean_batch(self) -> float:
        return self.batched_records / self.batches if self.batches else 0.0

    def close(self) -> None:
        os.close(self.fd)


def ideal_group_commit_throughput(
    path: Path, values: ValuePool, threads: int, seconds: float, gather_s: float = 0.0
) -> tuple[Throughput, float]:
    """(commits/s, mean batch size) of IdealGroupCommit under ``threads`` committers."""
    gc_log = IdealGroupCommit(path, values, gather_s=gather_s, expected=threads)
    try:
        result = run_threads(threads, lambda _t: (gc_log.op, _noop), seconds)
        return result, gc_log.mean_batch
    finally:
        gc_log.close()


def _noop() -> None:
    return None


# ---------------------------------------------------------------- 4. SQLite


class SqliteFull:
    """SQLite, WAL journal, synchronous=FULL, autocommit: one INSERT = one commit."""

    def __init__(self, path: Path, values: ValuePool, busy_timeout_ms: int = 30_000) -> None:
        self.values = values
        self.conn = sqlite3.connect(
            path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        self.conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL)")
        self.sql = "INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)"

    def op(self, i: int) -> None:
        self.conn.execute(self.sql, (f"k{i:012d}", self.values[i]))

    def close(self) -> None:
        self.conn.close()


def sqlite_full_throughput(
    path: Path, values: ValuePool, threads: int, seconds: float
) -> Throughput:
    """Commits/s with ``threads`` threads, each with its own connection."""
    SqliteFull(path, values).close()  # create the schema and WAL mode up front

    def setup(_t: int) -> tuple[Callable[[int], None], Callable[[], None]]:
        db = SqliteFull(path, values)
        return db.op, db.close

    return run_threads(threads, setup, seconds)


# ---------------------------------------------------------------- 5. LMDB


def open_lmdb(path: Path, sync: bool = True, map_size: int = 4 << 30) -> Any:
    path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(
        str(path), map_size=map_size, sync=sync, metasync=True, max_dbs=0, lock=True,
        readahead=False,
    )


class LmdbSync:
    """py-lmdb with sync=True (metasync default): one put per write transaction."""

    def __init__(self, path: Path, values: ValuePool) -> None:
        self.values = values
        self.env = open_lmdb(path)

    def op(self, i: int) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(f"k{i:012d}".encode(), self.values[i])

    def close(self) -> None:
        self.env.close()


def lmdb_sync_throughput(
    path: Path, values: ValuePool, threads: int, seconds: float
) -> Throughput:
    """Commits/s with ``threads`` threads sharing one environment (LMDB has one writer)."""
    db = LmdbSync(path, values)
    try:
        return run_threads(threads, lambda _t: (db.op, _noop), seconds)
    finally:
        db.close()


class LmdbGet:
    """A read transaction + get per op, on an LMDB filled with ``n_keys`` values."""

    def __init__(self, path: Path, values: ValuePool, n_keys: int, order: list[int]) -> None:
        self.env = open_lmdb(path, sync=False)
        self.keys = [f"k{i:012d}".encode() for i in range(n_keys)]
        with self.env.begin(write=True) as txn:
            for i, k in enumerate(self.keys):
                txn.put(k, values[i])
        self.env.sync(True)
        self.order = order

    def op(self, i: int) -> None:
        with self.env.begin(buffers=False) as txn:
            if txn.get(self.keys[self.order[i % len(self.order)]]) is None:
                raise KeyError(i)

    def close(self) -> None:
        self.env.close()


# ---------------------------------------------------------------- 7. JSON checkpointer


def make_state(i: int, approx_bytes: int) -> dict[str, Any]:
    """A workflow-like state dict of roughly ``approx_bytes`` as JSON."""
    fields = max(1, approx_bytes // 64)
    return {
        "workflow": "bench",
        "step": i,
        "vars": {f"var_{j:04d}": f"value-{i}-{j:06d}-" + "x" * 32 for j in range(fields)},
    }


def save_json_atomically(state: Any, tmp: Path, target: Path, directory: Path) -> None:
    """The naive checkpointer: json.dump to tmp, fsync, rename over target, fsync the dir."""
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, target)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class JsonCheckpointer:
    """json.dump to a temp file, fsync, rename over the target, fsync the directory."""

    def __init__(self, directory: Path, state_bytes: int = 4 * KIB) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.target = directory / "state.json"
        self.tmp = directory / "state.json.tmp"
        self.states = [make_state(i, state_bytes) for i in range(16)]

    def op(self, i: int) -> None:
        state = self.states[i % len(self.states)]
        state["step"] = i
        save_json_atomically(state, self.tmp, self.target, self.dir)

    def close(self) -> None:
        return None


# ---------------------------------------------------------------- replay floor


_PREFIX = struct.Struct("<2sBBIQQ")
_U64 = struct.Struct("<Q")


def frame_scan_rate(path: Path, n_records: int, value_bytes: int) -> dict[str, float]:
    """Pure-Python floor for WAL replay, records/s.

    Writes ``n_records`` frames shaped like walsync's (32-byte header with an
    xxh3-64 checksum, CBOR payload ``[kind, hlc, [[key, value]]]``), then times
    read + verify + decode + a put of each entry into LMDB in one write
    transaction (synced once at the end), with Python's cyclic GC enabled and
    disabled. Page cache is warm, as it is for the walsync replay case. Not
    walsync's code: a reference for what a straightforward Python loop reaches
    on this machine.
    """
    values = ValuePool(value_bytes)
    xxh3 = xxhash.xxh3_64_intdigest
    with open(path, "wb") as f:
        out = []
        for i in range(n_records):
            payload = cbor2.dumps([0, i, [[f"k{i:012d}", values[i]]]])
            prefix = _PREFIX.pack(b"\xd7\x5a", 1, 0, len(payload), i + 1, i)
            out.append(prefix + _U64.pack(xxh3(prefix + payload)) + payload)
            if len(out) >= 4096:
                f.write(b"".join(out))
                out.clear()
        f.write(b"".join(out))

    def scan(sink: Callable[[str, bytes], None]) -> int:
        with open(path, "rb") as f:
            buf = f.read()
        view = memoryview(buf)
        unpack, u64, loads = _PREFIX.unpack_from, _U64.unpack_from, cbor2.loads
        off, end, count = 0, len(buf), 0
        while off + 32 <= end:
            _magic, _ver, _flags, length, _lsn, _synced = unpack(buf, off)
            start = off + 32
            stop = start + length
            (checksum,) = u64(buf, off + 24)
            if xxh3(bytes(view[off:off + 24]) + bytes(view[start:stop])) != checksum:
                raise ValueError("checksum")
            _kind, _hlc, ops = loads(view[start:stop])
            for key, value in ops:
                sink(key, value)
            count += 1
            off = stop
        return count

    def timed(gc_on: bool) -> float:
        lmdb_path = path.with_name(f"{path.name}-{'gc' if gc_on else 'nogc'}.mdb")
        env = open_lmdb(lmdb_path, sync=False)
        was_enabled = gc.isenabled()
        try:
            if not gc_on:
                gc.disable()
            t0 = time.perf_counter_ns()
            with env.begin(write=True) as txn:
                put = txn.put
                count = scan(lambda k, v: put(k.encode(), v))
            env.sync(True)
            elapsed = (time.perf_counter_ns() - t0) / 1e9
        finally:
            if was_enabled:
                gc.enable()
            env.close()
        return count / elapsed

    return {"gc_per_s": timed(True), "nogc_per_s": timed(False)}


# ---------------------------------------------------------------- one-shot functions


def raw_append_latency(directory: Path, n: int, warmup: int, size: int = KIB) -> list[int]:
    t = RawAppend(directory / "raw.log", ValuePool(size))
    try:
        return measure_latency(t.op, n, warmup)
    finally:
        t.close()


def prealloc_overwrite_latency(directory: Path, n: int, warmup: int, size: int = KIB) -> list[int]:
    t = PreallocOverwrite(directory / "prealloc.log", ValuePool(size), n + warmup)
    try:
        return measure_latency(t.op, n, warmup)
    finally:
        t.close()


def sqlite_full_latency(directory: Path, n: int, warmup: int, size: int = KIB) -> list[int]:
    t = SqliteFull(directory / "full.sqlite", ValuePool(size))
    try:
        return measure_latency(t.op, n, warmup)
    finally:
        t.close()


def lmdb_sync_latency(directory: Path, n: int, warmup: int, size: int = KIB) -> list[int]:
    t = LmdbSync(directory / "lmdb", ValuePool(size))
    try:
        return measure_latency(t.op, n, warmup)
    finally:
        t.close()


def json_checkpoint_latency(
    directory: Path, n: int, warmup: int, state_bytes: int = 4 * KIB
) -> list[int]:
    t = JsonCheckpointer(directory / "json", state_bytes)
    return measure_latency(t.op, n, warmup)
