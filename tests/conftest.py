"""Top-level fixtures shared by every suite.

PostgreSQL (tests/pg.py, tests/gateway.py): nothing here runs unless a test asks for it.

* ``pg_cluster`` (session): one throwaway cluster for the whole run, started by the first
  test that needs it, removed at the end. Missing server binaries fail the test with an
  install hint; they never skip it.
* ``pg_db``: a fresh database per test (``CREATE DATABASE ... TEMPLATE``, ~40 ms), yielded
  as its superuser DSN and dropped after; the cluster is restarted first if the test left
  it stopped (e.g. after ``pg_cluster.kill()``).
* ``zygote`` (module), ``kill_summary`` and ``fault_summary`` (module): the crash suites'
  fork server and the per-module counts of kills and fault cases (tests/crash/).
* ``pg_gateway``: a factory ``pg_gateway(schemas=[...], **options)`` for PostgREST-compatible
  gateways on ``pg_db``, stopped after the test.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from tests.crash.children import Zygote
from tests.crash.summary import KillSummary, kill_summary_fixture
from tests.pg import PostgresCluster, PostgresError

if TYPE_CHECKING:
    from tests.gateway import PostgrestGateway

_db_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
    except PostgresError as exc:
        cluster.cleanup()
        pytest.fail(f"PostgreSQL test cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def pg_db(pg_cluster: PostgresCluster) -> Iterator[str]:
    name = f"walsync_t{os.getpid()}_{next(_db_numbers)}"
    dsn = pg_cluster.create_database(name)
    try:
        yield dsn
    finally:
        if not pg_cluster.running:
            pg_cluster.start()
        pg_cluster.drop_database(name)


@pytest.fixture
def pg_gateway(pg_db: str) -> Iterator[Callable[..., PostgrestGateway]]:
    from tests.gateway import PostgrestGateway

    started: list[PostgrestGateway] = []

    def make(schemas: Sequence[str] = ("public",), **options: Any) -> PostgrestGateway:
        gateway = PostgrestGateway(pg_db, schemas=schemas, **options).start()
        started.append(gateway)
        return gateway

    try:
        yield make
    finally:
        for gateway in started:
            gateway.stop()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    with Zygote(tmp_path_factory.mktemp("zygote")) as z:
        yield z


@pytest.fixture(scope="module")
def kill_summary(request: pytest.FixtureRequest) -> Iterator[KillSummary]:
    yield from kill_summary_fixture(request)


@pytest.fixture(scope="module")
def fault_summary(request: pytest.FixtureRequest) -> Iterator[KillSummary]:
    """Fault cases checked per module, printed at its end like the crash kills."""
    yield from kill_summary_fixture(request, "fault cases")
