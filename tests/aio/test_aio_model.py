"""Awaited commits from concurrent tasks, held to a model (hypothesis): the store ends as
the successful commits applied in LSN order, each whole, each with the LSN it was given."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walsync.engine import Store
from walsync.engine.aio import AsyncStore
from walsync.engine.errors import ConflictError
from walsync.engine.ops import Delete, Put

KEYS = ["a", "b", "c", "d"]

#: one commit: (key, value or None for a delete, whether it must not exist yet)
_op = st.tuples(st.sampled_from(KEYS), st.one_of(st.none(), st.integers(0, 99)), st.booleans())
_commit = st.lists(_op, min_size=1, max_size=3, unique_by=lambda o: o[0])
#: per task: its commits, and whether it yields to the loop between them
_task = st.tuples(st.lists(_commit, min_size=1, max_size=6), st.booleans())

_runs = itertools.count()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tasks=st.lists(_task, min_size=1, max_size=6))
def test_aio_concurrent_commits_match_the_model(tmp_path: Path,
                                                tasks: list[tuple[list[Any], bool]]) -> None:
    path = tmp_path / f"s{next(_runs)}"
    astore = AsyncStore.open(path, durability="none")
    committed: list[tuple[int, list[tuple[str, int | None, bool]]]] = []

    async def run_task(commits: list[Any], yields: bool) -> None:
        for commit in commits:
            ops = [Delete(k, expect=None) if v is None and fresh else
                   Delete(k) if v is None else
                   Put(k, v, expect=None) if fresh else Put(k, v)
                   for k, v, fresh in commit]
            try:
                result = await astore.commit(ops)
            except ConflictError:
                continue
            committed.append((result.lsn, list(commit)))
            if yields:
                await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(run_task(c, y) for c, y in tasks))

    try:
        asyncio.run(main())
        model: dict[str, int] = {}
        lsns = [lsn for lsn, _ in committed]
        assert len(set(lsns)) == len(lsns)
        for lsn, ops in sorted(committed):
            for key, value, fresh in ops:
                # an expect=None that passed: the key did not exist at that LSN
                assert not (fresh and key in model), (lsn, key)
                if value is None:
                    model.pop(key, None)
                else:
                    model[key] = value
        assert {k: astore.get(k) for k in KEYS if astore.get(k) is not None} == model
    finally:
        astore.close()
    with Store.open(path) as reopened:
        assert {k: reopened.get(k) for k in KEYS if reopened.get(k) is not None} == model
        assert reopened.next_lsn == (max(lsns) + 1 if lsns else 1)
