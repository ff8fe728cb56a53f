"""A lease kept alive from an event loop: renewed off the loop, its loss awaited."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from walsync.engine import Store
from walsync.engine.errors import LeaseLostError
from walsync.engine.workflow import Workflows
from walsync.sync.lease import Leases
from walsync.sync.memory import MemoryServer


def test_aio_lease_keep_alive_renews_then_reports_its_loss_on_the_loop(
        store_path: Path) -> None:
    server = MemoryServer()
    with Store.open(store_path) as store:
        leases = Leases(server.transport(), store=store, ttl_seconds=0.3)

        async def main() -> None:
            lease = leases.acquire("r")
            lost = leases.keep_alive_async(lease)
            async with Workflows(store).arun("w", "r", lease=lease) as run:
                await run.step("a", lambda: 1)
                await asyncio.sleep(0.5)  # past the TTL: renewed meanwhile
                assert not lost.done()
                assert server.calls.get("lease_renew", 0) >= 2
                server.set_lease("r", token=lease.token + 7)  # another host took it
                outcome = await asyncio.wait_for(lost, 5)
                assert isinstance(outcome, LeaseLostError)
                raise outcome  # stop driving the run: nothing more is written

        with pytest.raises(LeaseLostError) as info:
            asyncio.run(main())
        assert info.value.run_id == "r"
        run = Workflows(store).get_run("r")
        assert run.steps["a"].status == "success"
        assert run.status == "running"  # left for the new holder


def test_aio_lease_keep_alive_ends_with_none_on_release(store_path: Path) -> None:
    server = MemoryServer()
    with Store.open(store_path) as store:
        leases = Leases(server.transport(), store=store, ttl_seconds=0.3)

        async def main() -> LeaseLostError | None:
            lease = leases.acquire("r")
            outcome = leases.keep_alive_async(lease)
            await asyncio.sleep(0.15)
            assert leases.release(lease)
            return await asyncio.wait_for(outcome, 5)

        assert asyncio.run(main()) is None
