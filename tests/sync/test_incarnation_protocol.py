"""The server side of node incarnations (migration 20261207000005, PROTOCOL.md "Node
identity"): claims, claimed pushes and what a server holds of a node, called directly
through both transports against a real PostgreSQL, and against the in-memory reference
server (sync/memory.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import cbor2
import pytest

from tests.sync._helpers import entry, query
from tests.sync._servers import Server, server_factory
from walsync.sync.incarnation import server_entries
from walsync.sync.migrate import migrate
from walsync.sync.supabase import SupabaseTransport
from walsync.sync.transport import Claim, PushAck, Transport, WireBatch

KINDS = [pytest.param("postgres", marks=pytest.mark.postgres),
         pytest.param("supabase", marks=pytest.mark.postgres), "memory"]


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Server]]:
    yield from server_factory(lambda: request.getfixturevalue("pg_cluster"))


def hello(t: Transport, node: str, **claim: Any) -> Any:
    return t.hello(node, **claim)


def push(t: Transport, node: str, claim: Claim, through: int,
         entries: list[dict[str, Any]]) -> PushAck:
    return t.push(node, through, WireBatch(entries, claim))


@pytest.mark.parametrize("kind", KINDS)
def test_claims_go_to_a_holder_of_the_token_not_ahead_of_the_server(
        servers: Any, kind: str) -> None:
    server: Server = servers(kind)
    t = server.transport()
    first = hello(t, "N", tokens=["t1"], new_token="t1", acked_lsn=0, base_lsn=0)
    assert (first.reason, first.claimed, first.acked_lsn) == (None, True, 0)
    assert first.server_id == server.server_id()
    # a store without the token the server holds: refused, nothing changed
    copy = hello(t, "N", tokens=["t0"], new_token="t9", acked_lsn=0, base_lsn=0)
    assert (copy.reason, copy.claimed) == ("taken", False)
    # its holder claims again with a new token (the old one among its own)
    again = hello(t, "N", tokens=["t2", "t1"], new_token="t2", acked_lsn=0, base_lsn=0)
    assert (again.reason, again.claimed) == (None, True)
    assert push(t, "N", Claim("t2", 0, 0), 3, [entry("N", 3, "k", 1)]).acked_lsn == 3
    # a holder whose acknowledgement is behind the server's: "ahead", not claimed
    ahead = hello(t, "N", tokens=["t3", "t2"], new_token="t3", acked_lsn=1, base_lsn=0)
    assert (ahead.reason, ahead.claimed, ahead.acked_lsn) == ("ahead", False, 3)
    # only asking: no new token, nothing written
    asked = hello(t, "N", tokens=["t2"], new_token=None, acked_lsn=3, base_lsn=0)
    assert (asked.reason, asked.claimed) == (None, False)
    assert server.incarnation("N") == "t2"
    # a renewed id starts above its base: the server holds everything of it below
    renewed = hello(t, "N.x", tokens=["u1"], new_token="u1", acked_lsn=40, base_lsn=40)
    assert (renewed.claimed, renewed.acked_lsn) == (True, 40)
    unknown = hello(t, "nobody", tokens=[], new_token=None, acked_lsn=0, base_lsn=0)
    assert (unknown.reason, unknown.acked_lsn) == (None, 0)
    assert not server.node_known("nobody")


@pytest.mark.parametrize("kind", KINDS)
def test_claimed_pushes_store_nothing_under_another_token_or_after_a_gap(
        servers: Any, kind: str) -> None:
    server: Server = servers(kind)
    t = server.transport()
    hello(t, "N", tokens=["t1"], new_token="t1", acked_lsn=0, base_lsn=0)
    ok = push(t, "N", Claim("t1", 0, 0), 2, [entry("N", 1, "a", 1), entry("N", 2, "b", 2)])
    assert (ok.acked_lsn, ok.inserted, ok.refused, ok.server_id) == (
        2, 2, None, server.server_id())

    taken = push(t, "N", Claim("other", 0, 2), 3, [entry("N", 3, "c", "copy's")])
    assert (taken.refused, taken.inserted, taken.acked_lsn) == ("taken", 0, 2)
    # after a gap (the server holds up to 2, the batch follows 5): refused
    gap = push(t, "N", Claim("t1", 0, 5), 6, [entry("N", 6, "d", 6)])
    assert (gap.refused, gap.acked_lsn) == ("behind", 2)
    assert sorted(server.entries()) == [("N", 1, "a"), ("N", 2, "b")]
    assert server.acked("N") == 2

    # records with nothing for the server (merges): an empty push acknowledges them
    empty = push(t, "N", Claim("t1", 0, 2), 4, [])
    assert (empty.refused, empty.acked_lsn, empty.inserted) == (None, 4, 0)
    # an id the store retired (no token): only where the server holds what precedes
    retired = push(t, "R", Claim(None, 0, 0), 1, [entry("R", 1, "r", "old")])
    assert (retired.refused, retired.acked_lsn) == (None, 1)
    based = push(t, "R.x", Claim(None, 10, 10), 11, [entry("R.x", 11, "r", "new")])
    assert (based.refused, based.acked_lsn) == (None, 11)


@pytest.mark.parametrize("kind", KINDS)
def test_node_entries_name_what_the_server_holds_of_a_node_with_refused_ones(
        servers: Any, kind: str) -> None:
    server: Server = servers(kind)
    t = server.transport()
    hello(t, "N", tokens=["t1"], new_token="t1", acked_lsn=0, base_lsn=0)
    t.lease_acquire("r1", "other", 60)
    batch = [entry("N", 1, "a", "one", hlc=11 << 16), entry("N", 2, "b", None, hlc=12 << 16),
             entry("N", 3, "runs/r1", "refused", hlc=13 << 16)]
    ack = push(t, "N", Claim("t1", 0, 0), 3, batch)
    assert [f.run_id for f in ack.fenced] == ["r1"]
    held = server_entries(t, "N", 0, 3)
    assert held == {
        1: [("a", hashlib.md5(cbor2.dumps("one")).hexdigest(), 11 << 16)],
        2: [("b", None, 12 << 16)],
        3: [("runs/r1", hashlib.md5(cbor2.dumps("refused")).hexdigest(), None)]}
    assert server_entries(t, "N", 1, 2) == {2: [("b", None, 12 << 16)]}
    assert server_entries(t, "N", 3, 3) == {}


@pytest.mark.postgres
def test_tenant_mode_claims_and_positions_are_per_tenant(servers: Any) -> None:
    """Tenants may share node ids: each has its own claim and position; the server's id
    is the database's."""
    server: Server = servers("supabase")
    migrate(server.dsn, tenant_mode=True)
    gw = server.gateway
    assert gw is not None
    ts = {tenant: SupabaseTransport(gw.url, gw.anon_key, access_token=gw.mint(
        {"role": "authenticated", "aud": "authenticated", "tenant_id": tenant}))
        for tenant in ("t-a", "t-b")}
    try:
        a = hello(ts["t-a"], "N", tokens=["a1"], new_token="a1", acked_lsn=0, base_lsn=0)
        b = hello(ts["t-b"], "N", tokens=["b1"], new_token="b1", acked_lsn=0, base_lsn=0)
        assert (a.claimed, b.claimed) == (True, True)
        assert a.server_id == b.server_id == server.server_id()
        assert push(ts["t-a"], "N", Claim("a1", 0, 0), 2,
                    [entry("N", 1, "k", "a"), entry("N", 2, "j", "a")]).acked_lsn == 2
        # t-b's N holds nothing: its push after LSN 2 is refused, under t-a's token too
        assert push(ts["t-b"], "N", Claim("b1", 0, 2), 3, [entry("N", 3, "k", "b")]
                    ).refused == "behind"
        assert push(ts["t-b"], "N", Claim("a1", 0, 0), 1, [entry("N", 1, "k", "b")]
                    ).refused == "taken"
        assert server_entries(ts["t-b"], "N", 0, 5) == {}
        assert sorted(server_entries(ts["t-a"], "N", 0, 5)) == [1, 2]
        assert query(server.dsn, "select tenant, incarnation from walsync.nodes "
                                 "order by tenant") == [("t-a", "a1"), ("t-b", "b1")]
    finally:
        for t in ts.values():
            t.close()
