"""Scoped pull case: a store pulls a backlog of another store's entries by its scope.

    .venv/bin/python -m bench.run --only sync_pull_scoped

``sync_pull_scoped``: the server holds N entries (1 KiB values) of another node under
``app/`` and as many of an unrelated node under ``other/``; a store whose scope is
``app/`` pulls them: the server's pages alone (``Transport.pull`` with the scope, pages
of 1,000, as the replicator asks), and the whole pull into a fresh store
(``Replicator.pull``: each page merged through the store's WAL). The baseline is a
plain SELECT of the same rows (the entry log's columns, under ``app/``, in position
order), page by page as the pull reads them (1,000 rows after the last position),
fetched by psycopg, as ``sync_pull_backlog`` measures an unscoped pull. Goal: the
scoped pages >= 0.7x the baseline's rows/s; the pull into the store is reported
beside it.
(``sync_pull_backlog``, in push_concurrency_cases.py, pulls without a scope.)
"""

from __future__ import annotations

import time
from typing import Any

from .cases import check, fmt, ratio
from .common import median
from .registry import CaseResult, Context, case, describe
from .sync_cases import VALUE, _database


def _load(dsn: str, n: int) -> None:
    from tests.sync._helpers import entry
    from walsync.sync.postgres import PostgresTransport

    t = PostgresTransport(dsn, timeout_seconds=120)
    try:
        batch = 2000
        for origin, prefix in (("A", "app"), ("Z", "other")):
            for first in range(1, n + 1, batch):
                last = min(first + batch - 1, n)
                t.push(origin, last, [entry(origin, i, f"{prefix}/{i:07d}", VALUE)
                                      for i in range(first, last + 1)])
    finally:
        t.close()


@case("sync_pull_scoped", goal="scoped pull of a 100,000-entry backlog >= 0.7x a plain SELECT")
def sync_pull_scoped(ctx: Context) -> CaseResult:
    import psycopg

    from walsync.engine import Store
    from walsync.sync.postgres import PostgresTransport
    from walsync.sync.replicator import Replicator, ReplicatorOptions
    from walsync.sync.scope import Scope

    n = ctx.pick(100_000, 5_000)
    errors: dict[str, str] = {}
    fields: dict[str, Any] = {"entries": n, "out_of_scope": n}
    try:
        dsn = _database(ctx, "pull_scoped")
        _load(dsn, n)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("vacuum analyze walsync.entries")
        rates: dict[str, list[float]] = {"pages": [], "store": [], "select": []}
        def select() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                t = time.perf_counter()
                cursor, seen = 0, 0
                while True:
                    rows = conn.execute(
                        "select pos, origin, lsn, idx, key, deleted, data, codec, vv, hlc,"
                        " fence, value_hash from walsync.entries"
                        " where tenant = '' and key like 'app/%%' and pos > %s"
                        " order by pos limit 1000", (cursor,)).fetchall()
                    if not rows:
                        break
                    seen += len(rows)
                    cursor = rows[-1][0]
                rates["select"].append(seen / (time.perf_counter() - t))

        def pages(r: int) -> int:
            puller = PostgresTransport(dsn, timeout_seconds=120)
            t = time.perf_counter()
            cursor, got = 0, 0
            while True:
                page = puller.pull(f"reader{r}", cursor, 1000, prefixes=["app/"])
                got += len(page.entries)
                if page.next <= cursor or page.next >= page.head:
                    break
                cursor = page.next
            rates["pages"].append(got / (time.perf_counter() - t))
            puller.close()
            return got

        for r in range(ctx.pick(3, 1)):
            # the two sides by turns, so that a load that changes over the run weighs on both
            if r % 2 == 0:
                select()
                got = pages(r)
            else:
                got = pages(r)
                select()
            store = Store.open(ctx.subdir(f"pull_{r}"), node_id=f"B{r}", durability="none")
            try:
                rep = Replicator(store, PostgresTransport(dsn, timeout_seconds=120),
                                 ReplicatorOptions(), scope=Scope(prefixes=("app/",)))
                t = time.perf_counter()
                pulled = rep.pull()
                rates["store"].append(pulled / (time.perf_counter() - t))
                rep.transport.close()
            finally:
                store.close()
            if (got, pulled) != (n, n):
                errors["walsync"] = f"pulled {got} and {pulled} entries, not {n}"
        w, s, b = median(rates["pages"]), median(rates["store"]), median(rates["select"])
        fields.update(pull_entries_per_s=round(w), into_store_entries_per_s=round(s),
                      select_rows_per_s=round(b), ratio_vs_select=ratio(w, b),
                      into_store_ratio_vs_select=ratio(s, b))
        checks = {">= 0.7x SELECT": check(ratio(w, b), 0.7, at_least=True)}
        return CaseResult(fields, checks,
                          (f"{fmt(w)}/s (into a store {fmt(s)}/s)", f"SELECT {fmt(b)}/s"),
                          errors)
    except Exception as exc:  # noqa: BLE001 - a bench reports, it does not crash
        errors["walsync"] = describe(exc)
        return CaseResult(fields, {}, ("-", "-"), errors)
