"""Conflicts listed locally agree with the server's `conflicts` once every store synced.

Random histories of writes and deletes on two or three stores, synced at random points
through a real PostgreSQL, then fully: each store's ``Store.conflicts`` (what `walsync
conflicts list` prints) names the keys the server's ``conflicts`` function names, with
as many distinct versions. A write that lost to a concurrent delete is a conflict too.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway import PostgrestGateway
from tests.sync._helpers import supabase_transport
from walsync.engine import Store
from walsync.sync.cli import main
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.transport import Transport

pytestmark = pytest.mark.postgres

#: every run_once pulls (no pull interval): two rounds of all stores sync fully
OPTIONS = ReplicatorOptions(pull_interval_seconds=0.0, retry_initial_seconds=0.02,
                            retry_max_seconds=0.2)
KEYS = ["k0", "k1", "k2", "k3/a", "k3/b"]
VALUES = [1, 2, "two", None]  # None: a delete


def _server_conflicts(transport: Transport, prefix: str) -> dict[str, int]:
    return {c.key: c.versions for c in transport.conflicts(prefix, 10_000)}


def _local_conflicts(store: Store, prefix: str) -> dict[str, int]:
    return {key: len(versions) for key, versions in store.conflicts(prefix)}


def _sync_fully(replicators: list[Replicator]) -> None:
    """Every store ships everything, then pulls everything the others shipped."""
    for _ in range(2):
        for rep in replicators:
            rep.run_once()
    for rep in replicators:
        assert rep.acked_lsn == rep.store.applied_lsn


@pytest.fixture
def make_transport(pg_db: str, pg_gateway: Callable[..., PostgrestGateway],
                   request: pytest.FixtureRequest) -> Callable[[], Transport]:
    migrate(pg_db)
    if request.param == "postgres":
        return lambda: PostgresTransport(pg_db)
    gateway = pg_gateway(schemas=("walsync_api",))
    return lambda: supabase_transport(gateway)


@pytest.mark.parametrize("make_transport", ["postgres", "supabase"], indirect=True)
def test_conflict_whose_winner_is_a_delete_is_listed_locally_by_the_cli_and_on_the_server(
        tmp_path: Path, make_transport: Callable[[], Transport]) -> None:
    a = Store.open(tmp_path / "a", node_id="A")
    b = Store.open(tmp_path / "b", node_id="B")
    replicators = [Replicator(s, make_transport(), OPTIONS) for s in (a, b)]
    try:
        a.put("k", 1)
        _sync_fully(replicators)
        b.put("k", 2)
        time.sleep(0.01)  # a later millisecond: the delete's HLC is the higher, it wins
        a.delete("k")
        _sync_fully(replicators)
        for store in (a, b):
            assert store.get("k") is None
            assert [(v.value, v.version.deleted) for v in store.get_versions("k")] == [
                (2, False), (None, True)]
            assert _local_conflicts(store, "") == {"k": 2}
        assert _server_conflicts(replicators[0].transport, "") == {"k": 2}
    finally:
        for rep in replicators:
            rep.close()
        a.close()
        b.close()

    out = CliRunner().invoke(main, ["conflicts", "list", "--store", str(tmp_path / "a"),
                                    "--json"])
    assert out.exit_code == 0, out.output
    (doc,) = [json.loads(line) for line in out.output.splitlines()]
    assert doc["key"] == "k"
    assert [(s["value"], s["version"]["deleted"], s["version"]["origin"])
            for s in doc["siblings"]] == [(2, False, "B"), (None, True, "A")]
    text = CliRunner().invoke(main, ["conflicts", "list", "--store", str(tmp_path / "b")])
    assert text.exit_code == 0, text.output
    key, lost, won = text.output.splitlines()
    assert key == "k"
    assert lost.startswith("  B:")
    assert lost.endswith("  2")
    assert won.startswith("  A:")
    assert won.endswith("  (deleted)")


_examples = itertools.count()

#: one step of a history: (store index, key, value or None for a delete, sync after it)
steps = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(KEYS), st.sampled_from(VALUES),
              st.booleans()),
    min_size=1, max_size=30,
)


@given(stores=st.integers(2, 3), history=steps)
@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_conflicts_after_random_histories_agree_with_the_server(
        pg_db: str, stores: int, history: list[tuple[int, str, Any, bool]]) -> None:
    # every example in one database: its own key prefix and node ids keep it apart
    migrate(pg_db)
    n = next(_examples)
    prefix = f"ex{n}/"
    root = Path(tempfile.mkdtemp(prefix="walsync-conflicts-"))
    opened = [Store.open(root / str(i), node_id=f"e{n}n{i}") for i in range(stores)]
    replicators = [Replicator(s, PostgresTransport(pg_db), OPTIONS) for s in opened]
    try:
        for index, key, value, sync in history:
            i = index % stores
            if value is None:
                opened[i].delete(prefix + key)
            else:
                opened[i].put(prefix + key, value)
            if sync:
                replicators[i].run_once()
        _sync_fully(replicators)
        server = _server_conflicts(replicators[0].transport, prefix)
        for store in opened:
            assert _local_conflicts(store, prefix) == server
            for sub in (prefix + "k3/", prefix + "k1"):
                assert _local_conflicts(store, sub) == {
                    k: v for k, v in server.items() if k.startswith(sub)}
    finally:
        for rep in replicators:
            rep.close()
        for store in opened:
            store.close()
        shutil.rmtree(root, ignore_errors=True)
