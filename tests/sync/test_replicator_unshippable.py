"""Entries the server cannot hold are set aside and reported; everything else ships.

A store written by an older walsync can hold what ``put`` now refuses: a value
that does not decode (``CBORTag(2, "x")``), a fence of 2**63 (PostgreSQL's bigint
ends below it), a key with NUL (PostgreSQL's text cannot hold it). Such an entry
once failed every batch it was in, so ``walsync sync --once`` shipped nothing at
all. Now the replicator leaves it out, ships the rest of its record and every
other record, and reports it (log, last error, the store's ``unshipped`` list
that ``walsync status`` prints) with its LSN, key and reason; writing the key
again replaces it on the server. Both transports.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
from click.testing import CliRunner

import walsync.engine.ops
from tests.gateway import PostgrestGateway
from tests.sync._helpers import query, supabase_transport
from walsync.engine import Put, Store
from walsync.sync.cli import main
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.transport import Transport

pytestmark = pytest.mark.postgres

NO_PULL = ReplicatorOptions(pull=False, retry_initial_seconds=0.02, retry_max_seconds=0.3)


@contextmanager
def older_walsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Writes as an older walsync made them: no check of values, fences or NUL in keys."""
    with monkeypatch.context() as m:
        m.setattr(walsync.engine.ops, "value_problem", lambda *args, **kwargs: None)
        m.setattr(walsync.engine.ops, "check_fence", lambda fence, where: None)
        m.setattr(walsync.engine.ops, "check_key", lambda key, max_bytes: None)
        yield


@pytest.fixture(params=["postgres", "supabase"])
def transport(request: pytest.FixtureRequest, pg_db: str,
              pg_gateway: Callable[..., PostgrestGateway]) -> Iterator[Transport]:
    migrate(pg_db)
    made: Transport
    if request.param == "postgres":
        made = PostgresTransport(pg_db, timeout_seconds=10, connect_timeout_seconds=3)
    else:
        made = supabase_transport(pg_gateway(schemas=["walsync_api"]))
    try:
        yield made
    finally:
        made.close()


def server_keys(dsn: str) -> dict[str, Any]:
    return dict(query(dsn, "select key, value from walsync.state_json"))


def test_replicator_sets_aside_what_the_server_cannot_hold_and_ships_the_rest(
    tmp_path: Path, pg_db: str, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(tmp_path / "s", node_id="old")
    try:
        store.put("a/first", 1)
        with older_walsync(monkeypatch):
            bad_value = store.put("b/tag", cbor2.CBORTag(2, "x")).lsn
            mixed = store.commit([Put("m/ok", "kept"), Put("m/bad", [cbor2.CBORTag(1, "x")]),
                                  Put("m/fence", 3, fence=2**63)]).lsn
            nul = store.put("n\x00ul", 4).lsn
        store.put("z/last", {"ok": True})
        rep = Replicator(store, transport, NO_PULL)
        try:
            pushed, _ = rep.run_once()
            assert rep.error is None
            assert pushed == 3  # a/first, m/ok, z/last
            assert rep.acked_lsn == store.applied_lsn  # nothing blocks what follows
            assert server_keys(pg_db) == {"a/first": 1, "m/ok": "kept", "z/last": {"ok": True}}
            unshipped = store.sync_ledger.unshipped
            assert [(u.lsn, u.key) for u in unshipped] == [
                (bad_value, "b/tag"), (mixed, "m/bad"), (mixed, "m/fence"), (nul, "n\x00ul")]
            reasons = [u.reason for u in unshipped]
            assert "does not decode" in reasons[0]
            assert "does not decode" in reasons[1]
            assert "fence 9223372036854775808 is outside" in reasons[2]
            assert "NUL" in reasons[3]
            assert f"LSN {nul}, key 'n\\x00ul' was not shipped" in str(rep.status().last_error)

            # the way out: write the keys again; the new versions ship
            store.put("b/tag", "fixed")
            store.delete("m/bad")
            store.put("m/fence", 3, fence=7)
            rep.run_once()
            assert rep.error is None
            assert server_keys(pg_db) == {"a/first": 1, "m/ok": "kept", "z/last": {"ok": True},
                                          "b/tag": "fixed", "m/fence": 3}
            assert store.sync_ledger.unshipped == unshipped  # once each
        finally:
            rep.close()
    finally:
        store.close()
    result = CliRunner().invoke(main, ["status", "-s", str(tmp_path / "s"), "--json"],
                                env={"WALSYNC_PG_DSN": pg_db}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert [u["key"] for u in status["unshipped"]] == ["b/tag", "m/bad", "m/fence", "n\x00ul"]
