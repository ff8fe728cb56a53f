"""Async cases: the awaited commit against the blocking one, and async steps against threads.

    .venv/bin/python -m bench.run --only aio_commit_1k,aio_steps_1k

``aio_commit_1k``: one task awaits durable 1 KiB puts one after the other
(``AsyncStore.put``: the record is queued on the loop's thread, the store's
commit driver writes and fdatasyncs it, the loop's future is resolved from
there) against one thread calling ``Store.put``; each on its own store on the
same disk, in alternating rounds. Each latency is timed around one await on
the loop (or one call), so the loop's own overhead counts. Goal: the async
p50 within 1.1x of the sync p50.

``aio_steps_1k``: 1,000 steps, each one durable commit to start it and one to
complete it (a small output): as 1,000 tasks of one run gathered at once
(``@step`` on an ``async def``), as 8 runs of 125 gathered steps each at
once, and as 8 threads each driving its own run of 125 steps (a run is
driven by one thread at a time). Steps per second, best of the rounds;
reported, with no bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .cases import check, fmt, ratio
from .common import KIB, ValuePool, median, percentile
from .registry import CaseResult, Context, case, describe

STEPS = 1000
THREADS = 8


def _us(ns: float) -> float:
    return round(ns / 1000.0, 1)


# ---------------------------------------------------------------- awaited commit


@case("aio_commit_1k", goal="async durable 1 KiB commit p50 <= 1.1x the sync commit's")
def aio_commit_1k(ctx: Context) -> CaseResult:
    n, rounds, warmup = ctx.pick((2000, 20, 10), (300, 4, 10))
    errors: dict[str, str] = {}
    if not ctx.engine_ok:
        return CaseResult({"n": n}, checks={"p50 <= 1.1x sync": None},
                          errors={"walsync": f"engine did not import ({ctx.engine_error})"})
    from walsync.engine import Store
    from walsync.engine.aio import AsyncStore

    values = ValuePool(KIB)
    samples: dict[str, list[int]] = {"sync": [], "async": []}
    with contextlib.ExitStack() as stack:
        sync_store = Store.open(ctx.subdir("sync") / "store")
        stack.callback(sync_store.close)
        astore = AsyncStore(Store.open(ctx.subdir("async") / "store"))
        stack.callback(astore.close)
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)
        clock = time.perf_counter_ns
        per_round = n // rounds
        sync_i = async_i = 0

        def run_sync(count: int) -> None:
            nonlocal sync_i
            for j in range(warmup + count):
                key = f"k{sync_i:012d}"
                t0 = clock()
                sync_store.put(key, values[sync_i])
                took = clock() - t0
                sync_i += 1
                if j >= warmup:
                    samples["sync"].append(took)

        async def run_async(count: int) -> None:
            nonlocal async_i
            for j in range(warmup + count):
                key = f"k{async_i:012d}"
                t0 = clock()
                await astore.put(key, values[async_i])
                took = clock() - t0
                async_i += 1
                if j >= warmup:
                    samples["async"].append(took)

        try:
            for r in range(rounds):
                order = ["sync", "async"] if r % 2 == 0 else ["async", "sync"]
                for name in order:
                    if name == "sync":
                        run_sync(per_round)
                    else:
                        loop.run_until_complete(run_async(per_round))
        except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
            errors["walsync"] = describe(exc)
    f: dict[str, Any] = {"n": n, "record_bytes": KIB}
    for name in ("sync", "async"):
        got = samples[name]
        f[f"{name}_p50_us"] = _us(median(got)) if got else None
        f[f"{name}_p99_us"] = _us(percentile(got, 99)) if got else None
    f["ratio_async_vs_sync"] = ratio(f["async_p50_us"], f["sync_p50_us"])
    a50, s50 = f["async_p50_us"], f["sync_p50_us"]
    return CaseResult(
        f,
        checks={"p50 <= 1.1x sync": check(a50, s50 and 1.1 * s50)},
        headline=(f"async p50 {fmt(a50)} / p99 {fmt(f['async_p99_us'])} us",
                  f"sync {fmt(s50)}/{fmt(f['sync_p99_us'])}"),
        errors=errors,
    )


# ---------------------------------------------------------------- steps


def _output(i: int) -> dict[str, Any]:
    return {"step": i, "digest": f"{i:08x}" * 4}


def _steps_gathered_one_run(path: Path) -> float:
    from walsync.engine import Store
    from walsync.engine.workflow import Workflows, step

    @step(name="work")
    async def work(i: int) -> dict[str, Any]:
        return _output(i)

    async def main(store: Store) -> float:
        async with Workflows(store).arun("bench", "one") as _run:
            t0 = time.perf_counter()
            await asyncio.gather(*(work(i) for i in range(STEPS)))
            return time.perf_counter() - t0

    with Store.open(path) as store:
        return asyncio.run(main(store))


def _steps_gathered_8_runs(path: Path) -> float:
    from walsync.engine import Store
    from walsync.engine.workflow import Workflows

    async def body(i: int) -> dict[str, Any]:
        return _output(i)

    async def one_run(wf: Workflows, r: int) -> None:
        async with wf.arun("bench", f"run{r}") as run:
            await asyncio.gather(*(run.step(f"s{i}", body, i)
                                   for i in range(r, STEPS, THREADS)))

    async def main(store: Store) -> float:
        wf = Workflows(store)
        t0 = time.perf_counter()
        await asyncio.gather(*(one_run(wf, r) for r in range(THREADS)))
        return time.perf_counter() - t0

    with Store.open(path) as store:
        return asyncio.run(main(store))


def _steps_8_threads(path: Path) -> float:
    from walsync.engine import Store
    from walsync.engine.workflow import Workflows

    errors: list[BaseException] = []
    start = threading.Barrier(THREADS + 1)

    def drive(wf: Workflows, r: int) -> None:
        try:
            run = wf.run("bench", f"run{r}")
            start.wait()
            with run:
                for i in range(r, STEPS, THREADS):
                    run.step(f"s{i}", _output, i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    with Store.open(path) as store:
        wf = Workflows(store)
        threads = [threading.Thread(target=drive, args=(wf, r)) for r in range(THREADS)]
        for th in threads:
            th.start()
        start.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        took = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return took


@case("aio_steps_1k", goal="reference: 1,000 async steps gathered against 8 threads")
def aio_steps_1k(ctx: Context) -> CaseResult:
    rounds = ctx.pick(3, 1)
    errors: dict[str, str] = {}
    if not ctx.engine_ok:
        return CaseResult({"steps": STEPS},
                          errors={"walsync": f"engine did not import ({ctx.engine_error})"})
    runners = {
        "async_one_run": _steps_gathered_one_run,
        "async_8_runs": _steps_gathered_8_runs,
        "threads_8_runs": _steps_8_threads,
    }
    best: dict[str, float] = {}
    for r in range(rounds):
        names = list(runners)
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in errors:
                continue
            path = ctx.subdir(f"{name}-{r}") / "store"
            try:
                took = runners[name](path)
            except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
                errors[name] = describe(exc)
                continue
            finally:
                shutil.rmtree(path, ignore_errors=True)
            best[name] = min(best.get(name, took), took)
    f: dict[str, Any] = {"steps": STEPS, "threads": THREADS}
    for name in runners:
        f[f"{name}_steps_per_s"] = round(STEPS / best[name]) if name in best else None
    f["ratio_async_one_run_vs_threads"] = ratio(f["async_one_run_steps_per_s"],
                                                f["threads_8_runs_steps_per_s"])
    f["ratio_async_8_runs_vs_threads"] = ratio(f["async_8_runs_steps_per_s"],
                                               f["threads_8_runs_steps_per_s"])
    return CaseResult(
        f,
        headline=(f"async {fmt(f['async_one_run_steps_per_s'])} steps/s (one run), "
                  f"{fmt(f['async_8_runs_steps_per_s'])} (8 runs)",
                  f"8 threads {fmt(f['threads_8_runs_steps_per_s'])}"),
        errors=errors,
    )
