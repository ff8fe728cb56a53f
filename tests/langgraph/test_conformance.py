"""LangGraph's own checkpointer conformance suite against WalsyncSaver.

``validate`` creates a fresh saver (a fresh store) per capability and runs
every spec test of that capability; the extended capabilities are detected
because WalsyncSaver overrides their async methods.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator

from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES

from walsync.engine import Store
from walsync.engine.integrations.langgraph import WalsyncSaver


@checkpointer_test(name="WalsyncSaver")
async def walsync_checkpointer() -> AsyncIterator[WalsyncSaver]:
    path = tempfile.mkdtemp(prefix="walsync-conformance-")
    store = Store.open(path + "/store")
    try:
        yield WalsyncSaver(store)
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


def test_conformance_every_capability_passes() -> None:
    report = asyncio.run(validate(walsync_checkpointer))
    summary = {name: (r.detected, r.passed, r.tests_passed, r.tests_failed, r.failures)
               for name, r in report.results.items()}
    assert {c.value for c in ALL_CAPABILITIES} <= report.results.keys(), summary
    for name, result in report.results.items():
        assert result.detected, f"{name} not detected: {summary}"
        assert result.passed is True, f"{name}: {result.failures}"
        assert result.tests_passed > 0, summary
        assert result.tests_failed == 0, summary
    assert report.passed_all_base()
    assert report.conformance_level() == "FULL"
