"""The registered cases: walsync and its baselines, interleaved, one JSON line each.

Field names: ``<target>_<metric>_<unit>``; ratios are walsync / baseline for
latencies and walsync / baseline for rates too (so >1 is slower for latency,
faster for rates). A target that failed is missing and named in ``errors``.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import baselines as bl
from . import walsync_cases as ws
from .common import KIB, MIB, Throughput, ValuePool, median, percentile, run_threads, us
from .registry import (
    CaseResult,
    Context,
    case,
    describe,
    interleaved_latency,
    interleaved_throughput,
)

THREADS = 8


# ---------------------------------------------------------------- helpers


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def p50_p99(samples: dict[str, list[int]], name: str) -> tuple[float | None, float | None]:
    got = samples.get(name)
    if not got:
        return None, None
    return us(percentile(got, 50)), us(percentile(got, 99))


def check(value: float | None, bound: float | None, at_least: bool = False) -> bool | None:
    if value is None or bound is None:
        return None
    return value >= bound if at_least else value <= bound


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}{unit}"
    return f"{x:.3g}{unit}"


def open_walsync(
    ctx: Context, stack: contextlib.ExitStack, errors: dict[str, str], name: str = "walsync",
    path: Path | None = None, durability: str | None = None,
) -> Any:
    """An open store closed by ``stack``, or None (reason in ``errors``)."""
    if not ctx.engine_ok:
        errors[name] = f"skipped: engine did not import ({ctx.engine_error})"
        return None
    try:
        store = ws.open_store(path or ctx.subdir(name), durability=durability)
    except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
        errors[name] = describe(exc)
        return None
    stack.callback(_close_quietly, store, errors, name)
    return store


def _close_quietly(store: Any, errors: dict[str, str], name: str) -> None:
    try:
        store.close()
    except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
        errors.setdefault(name, f"close: {describe(exc)}")


def _noop() -> None:
    return None


# ---------------------------------------------------------------- 1. commit latency


@case("commit_1k", goal="p50 <= 1.3x prealloc overwrite+fdatasync, <= 1.0x raw append+fdatasync "
                        "and <= 0.9x sqlite FULL; p99 <= 2 ms")
def commit_1k(ctx: Context) -> CaseResult:
    n, rounds, warmup = ctx.pick((2000, 4, 25), (200, 2, 10))
    values = ValuePool(KIB)
    errors: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        targets: dict[str, Any] = {
            "raw": bl.RawAppend(ctx.subdir("raw") / "raw.log", values),
            "prealloc": bl.PreallocOverwrite(
                ctx.subdir("prealloc") / "pre.log", values, n + rounds * warmup + 200),
            "sqlite_full": bl.SqliteFull(ctx.subdir("sqlite") / "db.sqlite", values),
            "lmdb_sync": bl.LmdbSync(ctx.subdir("lmdb") / "env", values),
        }
        store = open_walsync(ctx, stack, errors)
        if store is not None:
            targets["walsync"] = ws.WalsyncPut(store, values)
        for t in targets.values():
            stack.callback(t.close)
        samples = interleaved_latency(targets, n, rounds, warmup, errors, initial_warmup=200)
    f: dict[str, Any] = {"n": n, "record_bytes": KIB}
    for name in ("walsync", "raw", "prealloc", "sqlite_full", "lmdb_sync"):
        f[f"{name}_p50_us"], f[f"{name}_p99_us"] = p50_p99(samples, name)
    f["ratio_vs_raw"] = ratio(f["walsync_p50_us"], f["raw_p50_us"])
    f["ratio_vs_sqlite"] = ratio(f["walsync_p50_us"], f["sqlite_full_p50_us"])
    f["ratio_vs_prealloc"] = ratio(f["walsync_p50_us"], f["prealloc_p50_us"])
    w50, w99 = f["walsync_p50_us"], f["walsync_p99_us"]
    return CaseResult(
        f,
        checks={
            "p50 <= 1.3x prealloc": check(w50, f["prealloc_p50_us"] and
                                          1.3 * f["prealloc_p50_us"]),
            "p50 <= 1.0x raw": check(w50, f["raw_p50_us"]),
            "p50 <= 0.9x sqlite FULL": check(w50, f["sqlite_full_p50_us"] and
                                             0.9 * f["sqlite_full_p50_us"]),
            "p99 <= 2 ms": check(w99, 2000.0),
        },
        headline=(
            f"p50 {fmt(w50)} / p99 {fmt(w99)} us ({fmt(f['ratio_vs_prealloc'])}x prealloc)",
            f"raw {fmt(f['raw_p50_us'])}/{fmt(f['raw_p99_us'])}, "
            f"prealloc {fmt(f['prealloc_p50_us'])}, sqlite {fmt(f['sqlite_full_p50_us'])}"
            f"/{fmt(f['sqlite_full_p99_us'])}, lmdb {fmt(f['lmdb_sync_p50_us'])}",
        ),
        errors=errors,
    )


# ---------------------------------------------------------------- 2. 8 threads


@case("commit_1k_8threads",
      goal=">= 0.8x ideal group-commit loop (best variant) and >= 2.5x sqlite FULL, 8 threads")
def commit_1k_8threads(ctx: Context) -> CaseResult:
    seconds, rounds = ctx.pick((0.8, 4), (0.3, 1))
    values = ValuePool(KIB)
    errors: dict[str, str] = {}
    batches: dict[str, list[float]] = {"ideal_gc": [], "ideal_gc_1ms": []}
    gc_dir = ctx.subdir("gc")
    sqlite_path = ctx.subdir("sqlite") / "db.sqlite"
    lmdb_dir = ctx.subdir("lmdb") / "env"

    def ideal(name: str, gather_s: float) -> Callable[[int], Throughput]:
        def run(r: int) -> Throughput:
            result, mean_batch = bl.ideal_group_commit_throughput(
                gc_dir / f"{name}-{r}.log", values, THREADS, seconds, gather_s)
            batches[name].append(mean_batch)
            return result
        return run

    with contextlib.ExitStack() as stack:
        runners: dict[str, Callable[[int], Throughput]] = {
            "ideal_gc": ideal("ideal_gc", 0.0),
            "ideal_gc_1ms": ideal("ideal_gc_1ms", 0.001),
            "sqlite_full": lambda _r: bl.sqlite_full_throughput(
                sqlite_path, values, THREADS, seconds),
            "lmdb_sync": lambda _r: bl.lmdb_sync_throughput(lmdb_dir, values, THREADS, seconds),
        }
        store = open_walsync(ctx, stack, errors)
        if store is not None:
            def walsync(r: int) -> Throughput:
                put = ws.WalsyncPut(store, values, prefix=f"r{r}-")
                return run_threads(THREADS, lambda _t: (put.op, _noop), seconds)
            runners["walsync"] = walsync
        rates = interleaved_throughput(runners, rounds, errors)
    f: dict[str, Any] = {"threads": THREADS, "record_bytes": KIB, "window_s": seconds}
    med: dict[str, float | None] = {}
    for name in ("walsync", "ideal_gc", "ideal_gc_1ms", "sqlite_full", "lmdb_sync"):
        got = rates.get(name)
        med[name] = round(statistics.median(got)) if got else None
        f[f"{name}_commits_per_s"] = med[name]
        f[f"{name}_rounds"] = [round(x) for x in got] if got else None
    for name, sizes in batches.items():
        f[f"{name}_mean_batch"] = round(statistics.mean(sizes), 2) if sizes else None
    ideals = [v for v in (med["ideal_gc"], med["ideal_gc_1ms"]) if v is not None]
    best_ideal = max(ideals) if ideals else None
    f["ratio_vs_ideal"] = ratio(med["walsync"], best_ideal)
    f["ratio_vs_sqlite"] = ratio(med["walsync"], med["sqlite_full"])
    return CaseResult(
        f,
        checks={
            ">= 0.8x ideal": check(med["walsync"], best_ideal and 0.8 * best_ideal, True),
            ">= 2.5x sqlite FULL": check(med["walsync"], med["sqlite_full"] and
                                         2.5 * med["sqlite_full"], True),
        },
        headline=(
            f"{fmt(med['walsync'])}/s",
            f"ideal {fmt(med['ideal_gc'])}/s (1ms: {fmt(med['ideal_gc_1ms'])}), "
            f"sqlite {fmt(med['sqlite_full'])}/s, lmdb {fmt(med['lmdb_sync'])}/s",
        ),
        errors=errors,
    )


# ---------------------------------------------------------------- 3. 10 MiB value


@case("value_10mib", goal="durable 10 MiB put median <= 1.3x raw append+fdatasync of the bytes "
                          "and <= sqlite FULL")
def value_10mib(ctx: Context) -> CaseResult:
    runs = ctx.pick(10, 3)
    values = ValuePool(10 * MIB, count=2)
    errors: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        targets: dict[str, Any] = {
            "raw": bl.RawAppend(ctx.subdir("raw") / "raw.log", values),
            "sqlite_full": bl.SqliteFull(ctx.subdir("sqlite") / "db.sqlite", values),
        }
        store = open_walsync(ctx, stack, errors)
        if store is not None:
            targets["walsync"] = ws.WalsyncPut(store, values, prefix="big-")
        for t in targets.values():
            stack.callback(t.close)
        samples = interleaved_latency(targets, runs, runs, 0, errors, initial_warmup=1)
    f: dict[str, Any] = {"runs": runs, "value_bytes": 10 * MIB}
    med: dict[str, float | None] = {}
    for name in ("walsync", "raw", "sqlite_full"):
        got = samples.get(name)
        med[name] = round(median(got) / 1e6, 2) if got else None
        f[f"{name}_median_ms"] = med[name]
        m = med[name]
        f[f"{name}_mb_per_s"] = round(10 * MIB / 1e6 / (m / 1e3), 1) if m else None
    f["ratio_vs_raw"] = ratio(med["walsync"], med["raw"])
    f["ratio_vs_sqlite"] = ratio(med["walsync"], med["sqlite_full"])
    return CaseResult(
        f,
        checks={"<= 1.3x raw": check(med["walsync"], med["raw"] and 1.3 * med["raw"]),
                "<= sqlite FULL": check(med["walsync"], med["sqlite_full"])},
        headline=(f"{fmt(med['walsync'])} ms",
                  f"raw {fmt(med['raw'])} ms, sqlite {fmt(med['sqlite_full'])} ms"),
        errors=errors,
    )


# ---------------------------------------------------------------- 4. get


@case("get_1k", goal="get p50 <= 20 us (worst of: just written, checkpointed, reopened)")
def get_1k(ctx: Context) -> CaseResult:
    n_keys, n_gets, rounds = ctx.pick((10_000, 10_000, 4), (1_000, 2_000, 2))
    values = ValuePool(KIB)
    rng = random.Random(7)
    order = [rng.randrange(n_keys) for _ in range(4 * n_gets)]
    errors: dict[str, str] = {}
    samples: dict[str, list[int]] = {}
    fill_s: float | None = None
    path = ctx.subdir("walsync")
    store: Any = None
    lmdb = bl.LmdbGet(ctx.subdir("lmdb") / "env", values, n_keys, order)
    try:
        if not ctx.engine_ok:
            errors["walsync"] = f"skipped: engine did not import ({ctx.engine_error})"
        else:
            try:
                store = ws.open_store(path)
                t0 = time.perf_counter()
                ws.fill(store, values, n_keys, threads=THREADS)
                fill_s = round(time.perf_counter() - t0, 2)
            except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
                errors["walsync"] = f"open+fill: {describe(exc)}"
        for state in ("hot", "checkpointed", "reopened"):
            targets: dict[str, Any] = {"lmdb": lmdb}
            if store is not None and "walsync" not in errors:
                try:
                    if state == "checkpointed":
                        store.checkpoint()
                    elif state == "reopened":
                        old, store = store, None
                        old.close()
                        store = ws.open_store(path, create=False)
                    targets[f"walsync_{state}"] = ws.WalsyncGet(store, n_keys, order)
                except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
                    errors["walsync"] = f"{state}: {describe(exc)}"
            got = interleaved_latency(
                targets, n_gets if state == "hot" else n_gets // 2, rounds, 200, errors)
            for name, s in got.items():
                samples.setdefault(name, []).extend(s)
    finally:
        lmdb.close()
        if store is not None:
            _close_quietly(store, errors, "walsync")
    f: dict[str, Any] = {"keys": n_keys, "gets": n_gets, "value_bytes": KIB,
                         "walsync_fill_8threads_s": fill_s}
    worst: float | None = None
    for state in ("hot", "checkpointed", "reopened"):
        p50, p99 = p50_p99(samples, f"walsync_{state}")
        f[f"walsync_{state}_p50_us"], f[f"walsync_{state}_p99_us"] = p50, p99
        if p50 is not None:
            worst = p50 if worst is None else max(worst, p50)
    f["walsync_p50_us"] = worst
    f["lmdb_get_p50_us"], f["lmdb_get_p99_us"] = p50_p99(samples, "lmdb")
    f["ratio_vs_lmdb"] = ratio(worst, f["lmdb_get_p50_us"])
    return CaseResult(
        f,
        checks={"p50 <= 20 us": check(worst, 20.0)},
        headline=(
            f"p50 {fmt(f['walsync_hot_p50_us'])}/{fmt(f['walsync_checkpointed_p50_us'])}/"
            f"{fmt(f['walsync_reopened_p50_us'])} us",
            f"lmdb txn+get {fmt(f['lmdb_get_p50_us'])} us",
        ),
        errors=errors,
    )


# ---------------------------------------------------------------- 5. replay


@case("replay", goal=">= 600,000 small records/s replayed by Store.open after a crash")
def replay(ctx: Context) -> CaseResult:
    records, copies = ctx.pick((300_000, 3), (20_000, 1))
    value_bytes = 90  # + a 13-character key: ~100-byte records
    errors: dict[str, str] = {}
    f: dict[str, Any] = {"records": records, "value_bytes": value_bytes}
    floor = bl.frame_scan_rate(ctx.subdir("scan") / "scan.wal", records, value_bytes)
    f["py_scan_per_s"] = round(floor["gc_per_s"])
    f["py_scan_gc_off_per_s"] = round(floor["nogc_per_s"])
    rate: float | None = None
    if not ctx.engine_ok:
        errors["walsync"] = f"skipped: engine did not import ({ctx.engine_error})"
    else:
        try:
            got = ws.replay_rate(ctx.subdir("replay"), records, value_bytes, copies)
            ctx.shared["closed_store"] = Path(got.pop("store_dirs")[0])
            rate = round(got.pop("rate_per_s"))
            f.update({f"walsync_{k}": v for k, v in got.items()})
        except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
            errors["walsync"] = describe(exc)
    f["walsync_replay_per_s"] = rate
    f["ratio_vs_py_scan"] = ratio(rate, f["py_scan_per_s"])
    return CaseResult(
        f,
        checks={">= 600k records/s": check(rate, 600_000.0, True)},
        headline=(f"{fmt(rate)}/s",
                  f"py scan+lmdb {fmt(f['py_scan_per_s'])}/s "
                  f"(gc off {fmt(f['py_scan_gc_off_per_s'])}/s); walsync gc off "
                  f"{fmt(f.get('walsync_gc_off_per_s'))}/s"),
        errors=errors,
    )


@case("replay_1m_memory",
      goal="Store.open replaying 1,000,000 small records after a crash: peak anonymous "
           "RSS < 200 MB")
def replay_1m_memory(ctx: Context) -> CaseResult:
    records = ctx.pick(1_000_000, 100_000)
    errors: dict[str, str] = {}
    f: dict[str, Any] = {"records": records, "value_bytes": 90}
    if not ctx.engine_ok:
        errors["walsync"] = f"skipped: engine did not import ({ctx.engine_error})"
        return CaseResult(f, {}, ("-", "-"), errors)
    try:
        got = ws.replay_memory(ctx.subdir("replay-memory"), records, 90)
    except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
        errors["walsync"] = describe(exc)
        return CaseResult(f, {}, ("-", "-"), errors)
    rate = got["replayed"] / got["seconds"]
    f.update({"replayed_records": got["replayed"], "open_s": round(got["seconds"], 2),
              "replay_per_s": round(rate), "wal_bytes": got["wal_bytes"],
              "peak_anon_rss_mb": round(got["peak_anon_mb"], 1),
              "peak_rss_mb": round(got["peak_rss_mb"], 1)})
    return CaseResult(
        f,
        checks={"all records replayed": got["replayed"] >= records,
                # LMDB maps its file: the pages it touches count in RSS as file-backed,
                # shared and reclaimable; the bar is on the process's own memory
                "peak anonymous RSS < 200 MB": check(got["peak_anon_mb"], 200.0)},
        headline=(f"anon RSS {got['peak_anon_mb']:.0f} MB",
                  f"with LMDB's mapped file {got['peak_rss_mb']:.0f} MB; "
                  f"{fmt(rate)} records/s"),
        errors=errors,
    )


# ---------------------------------------------------------------- 6. open


@case("open_clean", goal="Store.open after a clean close <= 50 ms (median)")
def open_clean(ctx: Context) -> CaseResult:
    runs = ctx.pick(7, 3)
    errors: dict[str, str] = {}
    f: dict[str, Any] = {"runs": runs}
    path: Path | None = ctx.shared.get("closed_store")
    records = None
    if path is None and ctx.engine_ok:
        # --only open_clean: make a store of small records first (untimed)
        records = ctx.pick(100_000, 10_000)
        path = ctx.subdir("walsync")
        try:
            with contextlib.ExitStack() as stack:
                store = open_walsync(ctx, stack, errors, path=path, durability="none")
                if store is not None:
                    values = ValuePool(90)
                    for i in range(records):
                        store.put(f"k{i:012d}", values[i])
        except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
            errors["walsync"] = f"fill: {describe(exc)}"
    lmdb_dir = ctx.subdir("lmdb") / "env"
    bl.LmdbGet(lmdb_dir, ValuePool(90), records or 100_000, [0]).close()
    walsync_ms: list[float] = []
    lmdb_ms: list[float] = []
    for _ in range(runs):
        if path is not None and "walsync" not in errors and ctx.engine_ok:
            try:
                walsync_ms.extend(ws.open_after_close_ms(path, 1))
            except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
                errors["walsync"] = describe(exc)
        t0 = time.perf_counter_ns()
        env = bl.open_lmdb(lmdb_dir)
        env.stat()
        lmdb_ms.append((time.perf_counter_ns() - t0) / 1e6)
        env.close()
    if not ctx.engine_ok:
        errors["walsync"] = f"skipped: engine did not import ({ctx.engine_error})"
    w = round(median(walsync_ms), 2) if walsync_ms else None
    if path is not None and path.exists():
        f["store_bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    f["walsync_open_ms"] = w
    f["walsync_open_max_ms"] = round(max(walsync_ms), 2) if walsync_ms else None
    f["lmdb_open_ms"] = round(median(lmdb_ms), 3)
    return CaseResult(
        f,
        checks={"<= 50 ms": check(w, 50.0)},
        headline=(f"{fmt(w)} ms", f"lmdb.open {fmt(f['lmdb_open_ms'])} ms"),
        errors=errors,
    )


# ---------------------------------------------------------------- 7. JSON checkpointer


@case("json_checkpoint", goal="reference only: per-checkpoint latency of a 4 KiB state")
def json_checkpoint(ctx: Context) -> CaseResult:
    n, rounds = ctx.pick((500, 2), (100, 1))
    errors: dict[str, str] = {}
    states = ValuePool.of([bl.make_state(i, 4 * KIB) for i in range(16)])
    with contextlib.ExitStack() as stack:
        targets: dict[str, Any] = {"json": bl.JsonCheckpointer(ctx.subdir("json"))}
        store = open_walsync(ctx, stack, errors)
        if store is not None:
            targets["walsync"] = ws.WalsyncPut(store, states, key="workflow/state")
        samples = interleaved_latency(targets, n, rounds, 20, errors)
    f: dict[str, Any] = {"n": n, "state_json_bytes": len(json.dumps(states[0]))}
    f["json_p50_us"], f["json_p99_us"] = p50_p99(samples, "json")
    f["walsync_p50_us"], f["walsync_p99_us"] = p50_p99(samples, "walsync")
    f["ratio_vs_json"] = ratio(f["walsync_p50_us"], f["json_p50_us"])
    return CaseResult(
        f,
        headline=(f"put(state) p50 {fmt(f['walsync_p50_us'])} us",
                  f"json+fsync+rename+dirfsync p50 {fmt(f['json_p50_us'])} us"),
        errors=errors,
    )
