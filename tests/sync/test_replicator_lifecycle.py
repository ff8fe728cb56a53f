"""The replicator's lifecycle: stop and start are repeatable, and a dead replicator says so.

A replicator stopped (``stop``), stopped by a permanent error, or whose thread ended makes
a ``remote`` commit fail at once with the cause in its message (never after waiting out
its timeout); ``status().running`` says the truth; ``start`` after any of these runs it
again, shipping what was committed meanwhile.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.sync._helpers import server_entry_ids, wait_for, with_port
from tests.sync.test_replicator_retention import _closed_port
from walsync.engine import Store
from walsync.engine.errors import (
    NoReplicatorError,
    NotReplicatedError,
    RemoteSchemaError,
    ReplicatorStoppedError,
    SyncError,
)
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.transport import PushAck

pytestmark = pytest.mark.postgres

OPTIONS = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                            retry_initial_seconds=0.02, retry_max_seconds=0.2)
#: long enough that failing "at once" cannot be mistaken for timing out
TIMEOUT_SECONDS = 30.0
AT_ONCE_SECONDS = 3.0


def _own(dsn: str, node: str) -> list[int]:
    return sorted({lsn for origin, lsn, _ in server_entry_ids(dsn) if origin == node})


def test_replicator_stop_and_start_again_many_times_with_commits_in_between(
        tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    with Store.open(tmp_path / "a", node_id="A",
                    remote_timeout_seconds=TIMEOUT_SECONDS) as store:
        rep = Replicator(store, PostgresTransport(pg_db), OPTIONS)
        try:
            assert not rep.status().running
            for round_ in range(8):
                assert rep.start() is rep
                assert rep.start() is rep  # already running: nothing more
                assert rep.status().running
                assert [t.name for t in threading.enumerate()].count("walsync-replicator") == 1
                # what was committed while it was stopped goes out first
                wait_for(lambda: rep.acked_lsn == store.applied_lsn, what="the backlog shipped")
                result = store.put(f"remote/{round_}", round_, durability="remote")
                assert result.lsn in _own(pg_db, "A")
                rep.stop()
                assert not rep.status().running
                started = time.monotonic()
                with pytest.raises(NoReplicatorError, match="replicator was stopped"):
                    store.put("refused", 0, durability="remote")
                assert time.monotonic() - started < AT_ONCE_SECONDS
                for i in range(3):
                    store.put(f"local/{round_}/{i}", i)
            rep.start()
            wait_for(lambda: rep.acked_lsn == store.applied_lsn, what="the last backlog")
            assert rep.status().running
            assert rep.status().lag_entries == 0
            # nothing refused was written; everything else is on the server
            assert _own(pg_db, "A") == list(range(1, store.applied_lsn + 1))
            assert store.get("refused") is None
        finally:
            rep.close()
        assert not rep.status().running


def test_replicator_stopped_while_a_remote_commit_waits_fails_it_at_once(
        tmp_path: Path, pg_db: str) -> None:
    with Store.open(tmp_path / "a", remote_timeout_seconds=TIMEOUT_SECONDS) as store:
        unreachable = PostgresTransport(with_port(pg_db, _closed_port()),
                                        connect_timeout_seconds=1)
        rep = Replicator(store, unreachable, OPTIONS).start()
        outcome: list[BaseException] = []

        def commit() -> None:
            try:
                store.put("k", 1, durability="remote")
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        waiter = threading.Thread(target=commit)
        waiter.start()
        wait_for(lambda: rep.status().retries > 0 and store.applied_lsn == 1,
                 what="the commit waiting for an unreachable server")
        started = time.monotonic()
        rep.stop()
        waiter.join(AT_ONCE_SECONDS)
        assert not waiter.is_alive()
        assert time.monotonic() - started < AT_ONCE_SECONDS
        rep.close()
        (error,) = outcome
        assert isinstance(error, ReplicatorStoppedError)
        assert isinstance(error, NotReplicatedError)
        assert error.lsn == 1
        assert "durable locally" in str(error)
        assert "the replicator was stopped" in str(error)
        assert error.hint
        assert store.get("k") == 1  # committed here, kept for the next replicator


def test_replicator_stopped_by_a_permanent_error_fails_remote_commits_at_once_then_restarts(
        tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    with Store.open(tmp_path / "a", node_id="A",
                    remote_timeout_seconds=TIMEOUT_SECONDS) as store:
        rep = Replicator(store, PostgresTransport(pg_db), OPTIONS).start()
        try:
            store.put("warm", 0, durability="remote")
            with psycopg.connect(pg_db, autocommit=True) as conn:
                conn.execute("drop schema walsync_api cascade")
            store.put("k1", 1)
            wait_for(lambda: rep.error is not None, what="the replicator to stop")
            assert not rep.status().running
            started = time.monotonic()
            with pytest.raises(ReplicatorStoppedError) as info:
                store.put("k2", 2, durability="remote")
            assert time.monotonic() - started < AT_ONCE_SECONDS
            assert "walsync_api" in str(info.value)  # the cause, by name
            assert "did not acknowledge" not in str(info.value)
            assert isinstance(info.value.__cause__, RemoteSchemaError)

            # the operator repairs the server; the same replicator starts again
            migrate(pg_db)
            rep.start()
            assert rep.status().running
            assert rep.status().stopped_reason is None
            store.put("k3", 3, durability="remote")
            assert _own(pg_db, "A") == [1, 2, 3, 4]
        finally:
            rep.close()


class _FailingTransport(PostgresTransport):
    """A real PostgreSQL transport whose next push raises ``fault`` once it is set:
    a library's or this code's bug, or something that ends a thread outright."""

    fault: BaseException | None = None

    def push(self, node_id: str, through_lsn: int, entries: list[dict[str, Any]]) -> PushAck:
        fault, self.fault = self.fault, None
        if fault is not None:
            raise fault
        return super().push(node_id, through_lsn, entries)


@pytest.mark.parametrize("fault", [RuntimeError("a bug in the push path"), SystemExit(3)],
                         ids=["unexpected-error", "thread-ending"])
def test_replicator_whose_thread_crashed_fails_remote_commits_at_once_naming_the_crash(
        tmp_path: Path, pg_db: str, fault: BaseException) -> None:
    migrate(pg_db)
    with Store.open(tmp_path / "a", node_id="A",
                    remote_timeout_seconds=TIMEOUT_SECONDS) as store:
        transport = _FailingTransport(pg_db)
        rep = Replicator(store, transport, OPTIONS).start()
        try:
            store.put("warm", 0, durability="remote")
            transport.fault = fault
            store.put("k1", 1)
            wait_for(lambda: not rep.status().running, what="the thread to end")
            assert rep.status().stopped_reason is not None
            assert type(fault).__name__ in rep.status().stopped_reason
            started = time.monotonic()
            with pytest.raises(ReplicatorStoppedError) as info:
                store.put("k2", 2, durability="remote")
            assert time.monotonic() - started < AT_ONCE_SECONDS
            assert type(fault).__name__ in str(info.value)
            assert str(fault) in str(info.value)
            assert isinstance(info.value.__cause__, SyncError)

            rep.start()  # the fault was once: it runs again
            store.put("k3", 3, durability="remote")
            assert _own(pg_db, "A") == [1, 2, 3, 4]
        finally:
            rep.close()


def test_replicator_start_while_its_thread_still_finishes_a_call_is_refused_clearly(
        tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    with Store.open(tmp_path / "a") as store:
        entered, release = threading.Event(), threading.Event()

        class Slow(PostgresTransport):
            def push(self, node_id: str, through_lsn: int,
                     entries: list[dict[str, Any]]) -> PushAck:
                entered.set()
                release.wait(30)
                return super().push(node_id, through_lsn, entries)

        rep = Replicator(store, Slow(pg_db), OPTIONS).start()
        try:
            store.put("k", 1)
            assert entered.wait(10)
            rep.stop(timeout_seconds=0.1)  # the call goes on
            assert not rep.status().running
            with pytest.raises(SyncError, match="still in a server call") as info:
                rep.start()
            assert "stop()" in info.value.hint
            release.set()
            rep.stop()  # waits for the call
            rep.start()
            wait_for(lambda: rep.acked_lsn == store.applied_lsn, what="shipped after restart")
        finally:
            release.set()
            rep.close()
