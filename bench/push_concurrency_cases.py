"""Server scale: many nodes pushing to one database at once, and a backlog pull.

    .venv/bin/python -m bench.run --only sync_push_nodes,sync_pull_backlog

``sync_push_nodes``: 1, 4 and 16 nodes push at the same time into one local
PostgreSQL (tests/pg.py), each a process of its own with its own connection
(the postgres transport), as hosts would: batches of 100 entries of ~1 KiB,
each entry a new key of the node's, one batch in flight per node (as the
replicator ships). Only the ``push`` call is timed; the batch is built and
encoded before it. Aggregate entries/s over a fixed window, and p99 of one
push; the levels run in rounds, rotating their order, medians reported.
Goals (sync/PROTOCOL.md, "Scaling"): 16 nodes >= 1.5x one node's entries/s,
p99 with 16 nodes <= 4x one node's. Two cores here: the pushing processes
share them with the server, so this measures whether pushes wait on each
other, not the server's throughput on a larger machine. Flat out, a push's
latency grows with the nodes sharing the cores whatever the server does
(Little's law: 16 nodes at an s-fold throughput wait about 16/s times as
long), so the case also reports p99 with 16 nodes that together offer what
one node pushed flat out (each a batch every 16 of its push cycles, from a
random phase): below saturation, only waits on each other remain. Beside
them, the time spent inside ``push`` per entry (``pg_stat_user_functions``:
the server's wall time, waits for a core included), per level.

``sync_pull_backlog``: a node pulls a backlog of entries other nodes pushed
(pages of 1,000, the replicator's default), against a plain ``SELECT`` of the
same rows page by page. Goal: >= 0.7x the SELECT.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from typing import Any

from .cases import check, fmt, ratio
from .common import median, percentile
from .registry import CaseResult, Context, case, describe
from .sync_cases import _database

LEVELS = (1, 4, 16)
BATCH_ENTRIES = 100
VALUE_BYTES = 1000


def _batch(node: str, first_lsn: int, count: int) -> Any:
    from tests.sync._helpers import entry
    from walsync.sync.transport import WireBatch

    blob = "x" * VALUE_BYTES
    return WireBatch(entry(node, lsn, f"bench/{node}/{lsn}", {"blob": blob})
                     for lsn in range(first_lsn, first_lsn + count))


def _pusher(dsn: str, node: str, ready: Any, start: Any, window_seconds: float,
            out: Any, interval_seconds: float = 0.0) -> None:
    """One node: push batches back to back for the window (or one every interval, from
    a random phase); report (entries, latencies)."""
    from walsync.sync.postgres import PostgresTransport

    t = PostgresTransport(dsn)
    lsn = 1
    batch = _batch(node, lsn, BATCH_ENTRIES)
    t.prepare_push(batch)
    t.head()  # connected before the window opens
    ready.put(node)
    start.wait()
    began = time.perf_counter()
    deadline = began + window_seconds
    tick = began + random.random() * interval_seconds
    latencies: list[float] = []
    entries = 0
    try:
        while time.perf_counter() < deadline:
            if interval_seconds:
                time.sleep(max(0.0, tick - time.perf_counter()))
                tick += interval_seconds
            t0 = time.perf_counter()
            ack = t.push(node, lsn + BATCH_ENTRIES - 1, batch)
            latencies.append(time.perf_counter() - t0)
            entries += ack.inserted
            lsn += BATCH_ENTRIES
            batch = _batch(node, lsn, BATCH_ENTRIES)
            t.prepare_push(batch)
        out.put((node, entries, latencies, None))
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        out.put((node, entries, latencies, describe(exc)))
    finally:
        t.close()


def _push_ms(dsn: str) -> float:
    """The time spent in push so far (ms; its callers' statistics are flushed as they
    exit, a moment after)."""
    import psycopg

    time.sleep(0.5)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("select coalesce(sum(total_time), 0) from pg_stat_user_functions"
                           " where funcname = 'push'").fetchone()
    return float(row[0]) if row is not None else 0.0


def _push_round(dsn: str, nodes: int, tag: str, window_seconds: float,
                interval_seconds: float = 0.0) -> tuple[float, float, int]:
    """``nodes`` processes pushing at once: (aggregate entries/s, p99 seconds, entries)."""
    ctx = mp.get_context("fork")  # fast to start; each child opens its own connection
    ready, out, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_pusher, args=(dsn, f"{tag}n{i}", ready, start,
                                               window_seconds, out, interval_seconds),
                         daemon=True)
             for i in range(nodes)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    start.set()
    results = [out.get(timeout=window_seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [r[3] for r in results if r[3]]
    if errors:
        raise RuntimeError(f"{len(errors)} of {nodes} pushers failed: {errors[0]}")
    total = sum(r[1] for r in results)
    latencies = sorted(x for r in results for x in r[2])
    return total / window_seconds, percentile(latencies, 99), total


@case("sync_push_nodes", goal="16 nodes >= 1.5x one node's entries/s; p99 <= 4x one node's")
def sync_push_nodes(ctx: Context) -> CaseResult:
    window = ctx.pick(2.0, 1.0)
    rounds = ctx.pick(3, 1)
    errors: dict[str, str] = {}
    rates: dict[int, list[float]] = {n: [] for n in LEVELS}
    p99s: dict[int, list[float]] = {n: [] for n in LEVELS}
    fields: dict[str, Any] = {"batch_entries": BATCH_ENTRIES, "window_seconds": window,
                              "rounds": rounds}
    try:
        import psycopg

        dsn = _database(ctx, "push_nodes")
        with psycopg.connect(dsn, autocommit=True) as conn:  # the server's time in push
            conn.execute(
                "do $$ begin execute format('alter database %I set track_functions = %L',"
                " current_database(), 'pl'); end $$")
        server_us: dict[int, list[float]] = {n: [] for n in LEVELS}
        for r in range(rounds):
            order = LEVELS[r % len(LEVELS):] + LEVELS[:r % len(LEVELS)]
            for n in order:
                before = _push_ms(dsn)
                rate, p99, entries = _push_round(dsn, n, f"r{r}l{n}", window)
                rates[n].append(rate)
                p99s[n].append(p99)
                server_us[n].append((_push_ms(dsn) - before) * 1000 / max(entries, 1))
        # 16 nodes offering together what one node pushed flat out (each a batch every
        # 16 of one node's push cycles): do pushes wait on each other below saturation?
        cycle = BATCH_ENTRIES / median(rates[1])
        paced = [_push_round(dsn, 16, f"p{r}", window, 16 * cycle)[1] for r in range(rounds)]
        fields["nodes_16_paced_p99_ms"] = round(median(paced) * 1000, 2)
        fields["p99_ratio_16_paced"] = ratio(median(paced), median(p99s[1]))
        for n in LEVELS:  # wall time inside push per entry (waits for a core included)
            fields[f"nodes_{n}_server_us_per_entry"] = round(median(server_us[n]), 1)
        for n in LEVELS:
            fields[f"nodes_{n}_entries_per_s"] = round(median(rates[n]))
            fields[f"nodes_{n}_p99_ms"] = round(median(p99s[n]) * 1000, 2)
            fields[f"nodes_{n}_rounds"] = [round(x) for x in rates[n]]
        one, many = median(rates[1]), median(rates[16])
        p99_one, p99_many = median(p99s[1]), median(p99s[16])
        fields.update(speedup_16=ratio(many, one), p99_ratio_16=ratio(p99_many, p99_one))
        checks = {"16 nodes >= 1.5x one": check(ratio(many, one), 1.5, at_least=True),
                  "p99 16 nodes <= 4x one": check(ratio(p99_many, p99_one), 4.0,
                                                  at_least=False)}
        return CaseResult(fields, checks,
                          (f"1: {fmt(one)}/s, 4: {fmt(median(rates[4]))}/s, "
                           f"16: {fmt(many)}/s",
                           f"p99 1: {p99_one * 1000:.1f} ms, 16: {p99_many * 1000:.1f} ms"),
                          errors)
    except Exception as exc:  # noqa: BLE001 - a bench reports, it does not crash
        errors["walsync"] = describe(exc)
        return CaseResult(fields, {}, ("-", "-"), errors)


@case("sync_pull_backlog", goal="pull of a backlog >= 0.7x a plain SELECT of the rows")
def sync_pull_backlog(ctx: Context) -> CaseResult:
    import psycopg

    from walsync.sync.postgres import PostgresTransport

    n = ctx.pick(100_000, 10_000)
    page = 1000
    errors: dict[str, str] = {}
    fields: dict[str, Any] = {"entries": n, "page": page}
    try:
        dsn = _database(ctx, "pull_backlog")
        pusher = PostgresTransport(dsn)
        for node in range(4):  # four origins, their batches one after the other
            for first in range(1, n // 4 + 1, 1000):
                batch = _batch(f"src{node}", first, min(1000, n // 4 - first + 1))
                pusher.push(f"src{node}", first + len(batch) - 1, batch)
        pusher.close()
        rates: dict[str, list[float]] = {"walsync": [], "select": []}
        for r in range(ctx.pick(3, 1)):
            for target in (("walsync", "select") if r % 2 == 0 else ("select", "walsync")):
                t0 = time.perf_counter()
                got = 0
                if target == "walsync":
                    puller = PostgresTransport(dsn)
                    cursor = 0
                    while True:
                        pg = puller.pull(f"reader{r}", cursor, page)
                        got += len(pg.entries)
                        if pg.next <= cursor:
                            break
                        cursor = pg.next
                    puller.close()
                else:
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        cursor = 0
                        while True:
                            rows = conn.execute(
                                "select pos, origin, lsn, idx, key, deleted, data, codec, vv,"
                                " hlc, fence, value_hash from walsync.entries"
                                " where tenant = '' and pos > %s order by pos limit %s",
                                (cursor, page)).fetchall()
                            if not rows:
                                break
                            got += len(rows)
                            cursor = rows[-1][0]
                if got != n:
                    raise RuntimeError(f"{target} read {got} of {n} entries")
                rates[target].append(got / (time.perf_counter() - t0))
        w, b = median(rates["walsync"]), median(rates["select"])
        fields.update(pull_entries_per_s=round(w), select_rows_per_s=round(b),
                      ratio_vs_select=ratio(w, b))
        return CaseResult(fields, {">= 0.7x SELECT": check(ratio(w, b), 0.7, at_least=True)},
                          (f"{fmt(w)}/s", f"SELECT {fmt(b)}/s"), errors)
    except Exception as exc:  # noqa: BLE001 - a bench reports, it does not crash
        errors["walsync"] = describe(exc)
        return CaseResult(fields, {}, ("-", "-"), errors)
