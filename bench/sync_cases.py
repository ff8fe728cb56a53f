"""Sync cases: shipping to a local PostgreSQL, replication lag, restore, remote commits.

    .venv/bin/python -m bench.run --only sync_push,sync_lag,sync_restore,remote_commit

One throwaway PostgreSQL cluster (tests/pg.py: the installed binaries, a free
loopback port, the test harness's settings: fsync off, its files in memory
where /dev/shm allows) serves every case, walsync and its baselines alike, so
the ratios compare like with like; a durable server on a disk adds its own
commit cost to both sides.

``sync_push``: N local 1 KiB commits are shipped by the replicator
(``Replicator.ship``, postgres transport, batches of 1,000) into a fresh
database; the baseline inserts the same rows (same columns, JSON-decoded) with
a plain batched ``executemany`` of ``INSERT … ON CONFLICT DO NOTHING`` into a
table keyed like the entry log. Goals: >= 20,000 entries/s, >= 0.7x the baseline.

``sync_lag``: a running replicator while one thread commits at 1,000
commits/s (durability ``local``); the lag of a commit is the time from its
return to the moment the replicator's acknowledged LSN covers it. Goal: p99 ≤ 1 s.

``sync_restore``: a server holding K keys (shipped from a store); ``restore``
runs in a child process that reports keys/s and its peak RSS.

``remote_commit``: 1 KiB commits with durability ``remote`` against ``local``,
interleaved, with a running replicator.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .cases import check, fmt, ratio
from .common import median, percentile
from .registry import CaseResult, Context, case, describe

VALUE = {"blob": "x" * 1000}


def _cluster(ctx: Context) -> Any:
    cluster = ctx.shared.get("pg")
    if cluster is None:
        from tests.pg import PostgresCluster

        cluster = PostgresCluster(dbname="walsync_bench")
        cluster.start()
        ctx.shared["pg"] = cluster
        import atexit

        atexit.register(cluster.cleanup)
    return cluster


def _database(ctx: Context, name: str) -> str:
    from walsync.sync.migrate import migrate

    dsn: str = _cluster(ctx).create_database(name)
    migrate(dsn)
    return dsn


def _fill(path: Path, n: int) -> Any:
    from walsync.engine import Store

    store = Store.open(path, durability="none")
    store.set_retain_floor(1)
    for i in range(n):
        store.put(f"bench/{i:07d}", VALUE)
    store.flush()
    return store


@case("sync_push", goal=">= 20,000 entries/s and >= 0.7x a plain executemany")
def sync_push(ctx: Context) -> CaseResult:
    import psycopg

    from walsync.sync.merge import record_to_wire
    from walsync.sync.postgres import PostgresTransport
    from walsync.sync.replicator import Replicator, ReplicatorOptions

    n = ctx.pick(20_000, 2_000)
    errors: dict[str, str] = {}
    fields: dict[str, Any] = {"entries": n}
    store = _fill(ctx.subdir("push"), n)
    try:
        rows: list[tuple[Any, ...]] = []
        reader = store.wal_reader()
        for rec in reader.read(0, store.shippable_lsn, n + 10, 1 << 40):
            for e in record_to_wire(rec.lsn, rec.ops):
                # the baseline's rows as this case has always defined them: the bytes as
                # base64 text (walsync itself now sends them as bytea)
                rows.append((e["lsn"], e["key"], base64.b64encode(e["data"]).decode(),
                             json.dumps(e["vv"]), e["hlc"],
                             e["value_hash"], json.dumps(e["value_json"])))
        rates: dict[str, list[float]] = {"walsync": [], "executemany": []}
        for r in range(ctx.pick(3, 1)):
            dsn = _database(ctx, f"push_{r}")
            store.sync_ledger.set_acked_lsn(0)  # ship it all again
            rep = Replicator(store, PostgresTransport(dsn), ReplicatorOptions(pull=False))
            t = time.perf_counter()
            shipped = rep.ship()
            rates["walsync"].append(shipped / (time.perf_counter() - t))
            rep.transport.close()
            base = _database(ctx, f"plain_{r}")
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(
                    "create table plain (origin text, lsn bigint, key text, data text, vv jsonb,"
                    " hlc bigint, value_hash text, value_json jsonb,"
                    " primary key (origin, lsn, key))")
                t = time.perf_counter()
                for i in range(0, len(rows), 1000):
                    with conn.transaction(), conn.cursor() as cur:
                        cur.executemany(
                            "insert into plain values ('A', %s, %s, %s, %s, %s, %s, %s)"
                            " on conflict do nothing", rows[i:i + 1000])
                rates["executemany"].append(len(rows) / (time.perf_counter() - t))
        w, b = median(rates["walsync"]), median(rates["executemany"])
        fields.update(walsync_entries_per_s=round(w), executemany_rows_per_s=round(b),
                      ratio_vs_executemany=ratio(w, b))
        checks = {">= 20,000/s": check(w, 20_000, at_least=True),
                  ">= 0.7x executemany": check(ratio(w, b), 0.7, at_least=True)}
        return CaseResult(fields, checks, (f"{fmt(w)}/s", f"executemany {fmt(b)}/s"), errors)
    except Exception as exc:  # noqa: BLE001 - a bench reports, it does not crash
        errors["walsync"] = describe(exc)
        return CaseResult(fields, {}, ("-", "-"), errors)
    finally:
        store.close()


@case("sync_lag", goal="replication lag p99 <= 1 s at 1,000 commits/s")
def sync_lag(ctx: Context) -> CaseResult:
    from walsync.engine import Store
    from walsync.sync.postgres import PostgresTransport
    from walsync.sync.replicator import Replicator, ReplicatorOptions

    seconds = ctx.pick(10.0, 3.0)
    errors: dict[str, str] = {}
    dsn = _database(ctx, "lag")
    store = Store.open(ctx.subdir("lag"))
    rep = Replicator(store, PostgresTransport(dsn), ReplicatorOptions(pull=False)).start()
    committed: list[tuple[int, float]] = []
    acked_at: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        last = 0
        while not stop.is_set():
            now = time.perf_counter()
            acked = rep.acked_lsn
            if acked > last:
                for lsn in range(last + 1, acked + 1):
                    acked_at[lsn] = now
                last = acked
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        start = time.perf_counter()
        i = 0
        while time.perf_counter() - start < seconds:
            due = start + i / 1000.0
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            r = store.put(f"lag/{i % 5000}", VALUE)
            committed.append((r.lsn, time.perf_counter()))
            i += 1
        rate = i / (time.perf_counter() - start)
        deadline = time.perf_counter() + 30
        while rep.acked_lsn < committed[-1][0] and time.perf_counter() < deadline:
            time.sleep(0.01)
        time.sleep(0.01)
        lags = [acked_at[lsn] - t for lsn, t in committed if lsn in acked_at]
        missing = len(committed) - len(lags)
        p50, p99 = percentile(lags, 50) * 1000, percentile(lags, 99) * 1000
        fields = {"commits": len(committed), "commits_per_s": round(rate),
                  "lag_p50_ms": round(p50, 1), "lag_p99_ms": round(p99, 1),
                  "never_acked": missing}
        checks = {"p99 <= 1 s": check(p99, 1000.0) if not missing else False}
        return CaseResult(fields, checks, (f"p99 {p99:.0f} ms", f"at {rate:.0f} commits/s"),
                          errors)
    except Exception as exc:  # noqa: BLE001
        errors["walsync"] = describe(exc)
        return CaseResult({}, {}, ("-", "-"), errors)
    finally:
        stop.set()
        rep.close()
        store.close()


_RESTORE_CHILD = """
import json, resource, sys, threading, time
from walsync.sync.postgres import PostgresTransport
from walsync.sync.restore import restore

def rss_mb(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    return 0.0

peak_anon = [0.0]
done = threading.Event()
def sample():
    while not done.wait(0.02):
        peak_anon[0] = max(peak_anon[0], rss_mb("RssAnon"))
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
report = restore(PostgresTransport(sys.argv[1]), sys.argv[2])
seconds = time.perf_counter() - t
done.set()
print(json.dumps({"keys": report.keys, "bytes": report.bytes, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_anon_mb": max(peak_anon[0], rss_mb("RssAnon"))}))
"""


@case("sync_restore", goal="restore of 100,000 keys: keys/s, peak anonymous RSS < 200 MB")
def sync_restore(ctx: Context) -> CaseResult:
    from walsync.sync.postgres import PostgresTransport
    from walsync.sync.replicator import Replicator, ReplicatorOptions

    k = ctx.pick(100_000, 10_000)
    errors: dict[str, str] = {}
    dsn = _database(ctx, "restore")
    store = _fill(ctx.subdir("restore-src"), k)
    try:
        rep = Replicator(store, PostgresTransport(dsn), ReplicatorOptions(pull=False))
        rep.ship()
        rep.transport.close()
    finally:
        store.close()
    try:
        out = subprocess.run([sys.executable, "-c", _RESTORE_CHILD, dsn,
                              str(ctx.subdir("restore-dst") / "store")],
                             capture_output=True, text=True, check=True, timeout=900)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        rate = got["keys"] / got["seconds"]
        fields = {"keys": got["keys"], "bytes": got["bytes"], "seconds": round(got["seconds"], 2),
                  "keys_per_s": round(rate), "peak_rss_mb": round(got["peak_rss_mb"], 1),
                  "peak_anon_rss_mb": round(got["peak_anon_mb"], 1)}
        checks = {"all keys": got["keys"] == k,
                  # LMDB maps its file: pages it touches count in RSS as file-backed,
                  # shared and reclaimable; the bar is on the process's own memory.
                  "peak anonymous RSS < 200 MB": check(got["peak_anon_mb"], 200.0)}
        return CaseResult(fields, checks, (f"{fmt(rate)} keys/s",
                                           f"anon RSS {got['peak_anon_mb']:.0f} MB, "
                                           f"with LMDB's mapped file {got['peak_rss_mb']:.0f} MB"),
                          errors)
    except Exception as exc:  # noqa: BLE001
        errors["walsync"] = describe(exc) + (
            f"; stderr: {exc.stderr[-500:]}" if isinstance(exc, subprocess.CalledProcessError)
            else "")
        return CaseResult({"keys": k}, {}, ("-", "-"), errors)


@case("remote_commit", goal="latency of a 'remote' commit beside a 'local' one")
def remote_commit(ctx: Context) -> CaseResult:
    from walsync.engine import Store
    from walsync.sync.postgres import PostgresTransport
    from walsync.sync.replicator import Replicator, ReplicatorOptions

    n = ctx.pick(1000, 200)
    dsn = _database(ctx, "remote")
    store = Store.open(ctx.subdir("remote"))
    rep = Replicator(store, PostgresTransport(dsn),
                     ReplicatorOptions(pull=False, batch_wait_seconds=0.0)).start()
    samples: dict[str, list[float]] = {"local": [], "remote": []}
    try:
        for i in range(n):
            for level in ("local", "remote") if i % 2 else ("remote", "local"):
                t = time.perf_counter()
                store.put(f"r/{i}", VALUE, durability=level)
                samples[level].append((time.perf_counter() - t) * 1e6)
        lp50, lp99 = percentile(samples["local"], 50), percentile(samples["local"], 99)
        rp50, rp99 = percentile(samples["remote"], 50), percentile(samples["remote"], 99)
        fields = {"commits": n, "local_p50_us": round(lp50), "local_p99_us": round(lp99),
                  "remote_p50_us": round(rp50), "remote_p99_us": round(rp99),
                  "remote_over_local_p50": ratio(rp50, lp50)}
        return CaseResult(fields, {}, (f"remote p50 {rp50 / 1000:.2f} ms",
                                       f"local p50 {lp50 / 1000:.2f} ms"), {})
    finally:
        rep.close()
        store.close()
