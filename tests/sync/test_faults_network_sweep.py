"""The network-fault sweep: over a hundred seeded rounds of tests/sync/netfaults.py, each
fault kind against both transports, zero violations (README: guarantees; dropped connections, torn
messages, delays, refusals, latency spikes past the client's timeout, half-open
connections and database restarts lose nothing and duplicate nothing, and the replicas
converge).

A case's id names its transport, fault kind and seed. A failing case prints its seed and
the command that replays it; ``WALSYNC_CRASH_SEED=<n>`` runs a case with another seed.
The rounds share one database (each round's nodes and keys carry their own prefix).
"""

from __future__ import annotations

import os
import random
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crash.summary import KillSummary
from tests.pg import PostgresCluster
from tests.sync.netfaults import FAULT_KINDS, TRANSPORTS, run_round
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.transport import PushAck

pytestmark = pytest.mark.postgres

SEED_ENV = "WALSYNC_CRASH_SEED"
#: rounds per transport and kind: the kinds that sit out a timeout or restart the
#: server cost about a second each, the others a few tenths
ROUNDS = {"spike": 3, "half_open": 3, "restart": 3}
DEFAULT_ROUNDS = 7
BASE_SEED = 20261123


def _cases() -> list[tuple[str, str, int]]:
    cases = []
    for t, transport in enumerate(TRANSPORTS):
        for k, fault in enumerate(FAULT_KINDS):
            for i in range(ROUNDS.get(fault, DEFAULT_ROUNDS)):
                cases.append((transport, fault, BASE_SEED + 1000 * t + 50 * k + i))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def sweep_db(pg_cluster: PostgresCluster) -> Iterator[str]:
    """One migrated database for every round of the module."""
    name = f"walsync_netsweep_{os.getpid()}"
    dsn = pg_cluster.create_database(name)
    migrate(dsn)
    try:
        yield dsn
    finally:
        if not pg_cluster.running:
            pg_cluster.start()
        pg_cluster.drop_database(name)


def test_faults_network_sweep_covers_every_kind_on_both_transports() -> None:
    assert len(CASES) >= 100
    assert {(t, f) for t, f, _ in CASES} == {(t, f) for t in TRANSPORTS for f in FAULT_KINDS}
    assert len({seed for _, _, seed in CASES}) == len(CASES)


@pytest.mark.parametrize(("transport", "fault", "seed"), CASES,
                         ids=[f"{t}-{f}-{s}" for t, f, s in CASES])
def test_faults_network_round(transport: str, fault: str, seed: int, tmp_path: Path,
                              sweep_db: str, pg_cluster: PostgresCluster,
                              request: pytest.FixtureRequest,
                              fault_summary: KillSummary) -> None:
    seed = int(os.environ.get(SEED_ENV) or seed)
    replay = f"{SEED_ENV}={seed} .venv/bin/python -m pytest '{request.node.nodeid}'"
    try:
        result = run_round(random.Random(seed), tmp_path, sweep_db, pg_cluster,
                           transport=transport, fault=fault)
    except Exception as exc:  # noqa: BLE001 - failed with the seed and the replay line
        pytest.fail(f"seed {seed}: the round raised {exc!r}\n  replay: {replay}\n"
                    f"{traceback.format_exc()}")
    assert result.ok, (f"seed {seed}: {len(result.violations)} violations\n  replay: {replay}\n"
                       f"  {result.summary()}\n  " + "\n  ".join(result.violations))
    assert result.faults_injected >= 1, f"seed {seed}: no fault fired ({replay})"
    assert result.commits_acknowledged > 0, f"seed {seed}: the workload committed nothing"
    fault_summary.add(f"network-fault rounds, {transport}/{fault}", 1, 1)


def test_faults_network_round_reports_a_transport_that_loses_entries(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sweep_db: str,
        pg_cluster: PostgresCluster) -> None:
    """The checker is no rubber stamp: a push that silently drops the first entry of each
    batch while the server acknowledges the batch is reported as loss."""
    real_push = PostgresTransport.push

    def lossy(self: PostgresTransport, node_id: str, through_lsn: int,
              entries: list[dict[str, object]]) -> PushAck:
        return real_push(self, node_id, through_lsn, entries[1:])

    monkeypatch.setattr(PostgresTransport, "push", lossy)
    result = run_round(random.Random(5), tmp_path, sweep_db, pg_cluster, transport="postgres",
                       fault="delay")
    assert any(v.startswith("lost: ") for v in result.violations), result.violations
    assert any("as acknowledged but the server lacks" in v for v in result.violations)
    assert any("covers entries the server lacks" in v for v in result.violations)
    # the crash suites' shared checker sees it too
    assert any(" on the server: key " in v and "expected the acknowledged write" in v
               for v in result.violations), result.violations
    assert not result.ok
