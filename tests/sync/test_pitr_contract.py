"""The contract of the functions behind `walsync nodes` and point-in-time restore, over
every transport (postgres, supabase, memory): ``nodes``, ``node_label``, ``log_window``,
``log_page`` and ``entry_point`` answer the same documents (each server's own clock
readings compared by form), by the same rules; and in tenant mode each tenant sees its
own nodes and log only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from tests.gateway import PostgrestGateway
from tests.sync import test_tenant_mode, test_transport_contract
from tests.sync._helpers import entry, query, records, supabase_transport
from tests.sync.test_tenant_mode import Server as TenantServer
from tests.sync.test_transport_contract import CLOCK_FIELDS, TIMESTAMP, Server, expect_error
from walsync.engine.errors import RemoteRejectedError
from walsync.sync.memory import MemoryServer
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport

#: the fixtures: the contract suite's server over every transport, and a tenant-mode one
server = test_transport_contract.server
tenant_server = test_tenant_mode.server
#: the server's own clock readings in these answers, compared by form
OWN = (*CLOCK_FIELDS, "first_push_at", "claimed_at")


def by_form(doc: Any) -> Any:
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k in OWN and v is not None:
                assert isinstance(v, str), (k, v)
                assert TIMESTAMP.match(v), (k, v)
                out[k] = f"<{k}>"
            else:
                out[k] = by_form(v)
        return out
    if isinstance(doc, list):
        return [by_form(v) for v in doc]
    return doc


def test_nodes_lists_each_node_with_its_label_pushes_and_live_leases(server: Server) -> None:
    t = server.migrate()
    empty = t.nodes()
    assert (empty.nodes, empty.head) == ([], 0)
    assert TIMESTAMP.match(empty.now)
    t.hello("b", tokens=["tb"], new_token="tb", acked_lsn=0, base_lsn=0)  # claimed, no push
    t.push("a", 2, records("a", 2, 1))
    first = {n.node_id: n for n in t.nodes().nodes}["a"].first_push_at
    t.push("a", 3, [entry("a", 3, "k/x", 1)])
    t.pull("c", 0, 10)  # a node that only pulled
    assert t.lease_acquire("r1", "a", 600).acquired
    assert t.lease_acquire("r0", "a", 600).acquired
    assert t.lease_acquire("r2", "b", 600).acquired
    t.lease_release("r2", "b", t.leases("b")[0].token)  # released: not live
    listing = t.nodes()
    assert [n.node_id for n in listing.nodes] == ["a", "b", "c"]
    assert listing.head == 3
    a, b, c = listing.nodes
    assert (a.acked_lsn, a.acked_hlc, a.leases, a.label) == (
        3, entry("a", 3, "k/x", 1)["hlc"], ["r0", "r1"], None)
    assert a.first_push_at == first  # the first push's time, kept by later pushes
    assert a.last_push_at is not None
    assert a.first_push_at is not None
    assert a.first_push_at <= a.last_push_at
    assert (b.first_push_at, b.last_push_at, b.leases) == (None, None, [])
    assert b.claimed_at is not None
    assert (c.pull_cursor, c.first_push_at) == (0, None)
    assert c.last_pull_at is not None


def test_node_label_sets_keeps_or_clears_and_never_creates_a_node(server: Server) -> None:
    t = server.migrate()
    assert t.node_label("ghost", "x").known is False
    assert t.nodes().nodes == []
    t.push("a", 1, [entry("a", 1, "k", 1)])
    assert t.node_label("a", "host-a", replace=False).label == "host-a"  # fills an empty one
    assert t.node_label("a", "other", replace=False).label == "host-a"  # never replaces one
    assert t.node_label("a", "ops-a").label == "ops-a"
    assert t.nodes().nodes[0].label == "ops-a"
    assert t.node_label("a", None).label is None
    expect_error(RemoteRejectedError, lambda: t.node_label("a", ""))
    expect_error(RemoteRejectedError, lambda: t.node_label("a", "x" * 201))
    assert t.node_label("a", "é" * 200).label == "é" * 200  # characters, not bytes


def test_log_window_page_and_entry_point_read_the_log_by_position_and_cut(
        server: Server) -> None:
    t = server.migrate()
    window = t.log_window()
    assert (window.from_hlc, window.to_hlc, window.entries, window.head) == (None, None, 0, 0)
    base = 1_800_000_000_000 << 16
    pushed = []
    for lsn, (key, hlc) in enumerate([("a/1", 5), ("b/1", 1), ("a/2", 9), ("a/1", 3)], 1):
        e = {**entry("n", lsn, key, lsn), "hlc": base + hlc}
        pushed.append(e)
        t.push("n", lsn, [e])
    t.push("m", 1, [{**entry("m", 1, "a/1", "m"), "hlc": base + 7},
                    {**entry("m", 1, "b/2", "m"), "hlc": base + 7, "idx": 1}])
    window = t.log_window()
    assert (window.from_hlc, window.to_hlc, window.entries, window.head) == (
        base + 1, base + 9, 6, 6)
    # by cut and prefix, a bounded run of positions a call
    page = t.log_page("a/", base + 5, 0, 100)
    assert [(r.pos, r.key, r.sibling.version.origin, r.sibling.version.lsn) for r in page.rows
            ] == [(1, "a/1", "n", 1), (4, "a/1", "n", 4)]
    assert (page.next, page.head) == (6, 6)
    assert page.rows[0].value_hash == pushed[0]["value_hash"]
    assert page.rows[0].sibling.data == b"\x01"
    seen, after = [], 0
    while True:
        page = t.log_page("", base + 7, after, 2)
        assert page.next - after <= 2
        if page.next <= after:
            break
        seen += [r.pos for r in page.rows]
        after = page.next
    assert seen == [1, 2, 4, 5, 6]  # pos 3 (hlc 9) is past the cut
    assert t.log_page("", base + 100, 6, 10).rows == []
    # a record's HLC and the nearest LSNs held
    point = t.entry_point("n", 3)
    assert (point.hlc, point.before, point.after) == (base + 9, 2, 4)
    missing = t.entry_point("n", 9)
    assert (missing.hlc, missing.before, missing.after) == (None, 4, None)
    assert t.entry_point("m", 1).hlc == base + 7
    nobody = t.entry_point("nobody", 1)
    assert (nobody.hlc, nobody.before, nobody.after) == (None, None, None)


@pytest.mark.postgres
def test_pitr_functions_answer_identical_documents_on_every_transport(
        pg_db: str, pg_gateway: Callable[..., PostgrestGateway]) -> None:
    """Random pushes, labels, leases and reads: the database (through postgres and
    supabase) and a memory server answer the same documents."""
    migrate(pg_db)
    direct = PostgresTransport(pg_db)
    rest = supabase_transport(pg_gateway(schemas=["walsync_api"]))
    memory = MemoryServer().transport()
    rng = random.Random(20261207)
    try:
        def both(method: str, *args: Any, **kwargs: Any) -> None:
            for t in (direct, memory):
                getattr(t, method)(*args, **kwargs)

        lsns = {"n1": 0, "n2": 0, "n3": 0}
        base = 1_800_000_000_000 << 16
        for _ in range(40):
            node = rng.choice(sorted(lsns))
            roll = rng.random()
            if roll < 0.6:
                lsns[node] += 1
                lsn = lsns[node]
                batch = [{**entry(node, lsn, f"k/{rng.randrange(5)}",
                                  None if rng.random() < 0.2 else rng.randrange(100)),
                          "hlc": base + rng.randrange(50)}]
                both("push", node, lsn, batch)
            elif roll < 0.75:
                label = rng.choice([None, "host", f"host-{node}"])
                replace = rng.random() < 0.5
                both("node_label", node, label, replace=replace)
            elif roll < 0.9:
                run = f"r{rng.randrange(3)}"
                both("lease_acquire", run, node, 600)
            else:
                both("pull", node, 0, 5)
        reads: list[tuple[str, dict[str, Any]]] = [("nodes", {}), ("log_window", {})]
        for _ in range(12):
            reads.append(("log_page", {"p_prefix": rng.choice(["", "k/1", "k/"]),
                                       "p_upto_hlc": base + rng.randrange(60),
                                       "p_after": rng.randrange(30),
                                       "p_limit": rng.randrange(1, 20)}))
            node = rng.choice(sorted(lsns))
            reads.append(("entry_point", {"p_node": node,
                                          "p_lsn": rng.randrange(lsns[node] + 3)}))
            node = rng.choice([*sorted(lsns), "ghost"])
            reads.append(("node_label", {"p_node": node, "p_label": "reads",
                                         "p_replace": False}))
        for fn, args in reads:
            want = by_form(direct.call(fn, args))
            assert by_form(rest.call(fn, args)) == want, (fn, args)
            assert by_form(memory.call(fn, args)) == want, (fn, args)
    finally:
        direct.close()
        rest.close()
        memory.close()


@pytest.mark.postgres
def test_tenant_sees_its_own_nodes_labels_and_log_only(
        tenant_server: TenantServer) -> None:
    a, b = tenant_server.tenant("A"), tenant_server.tenant("B")
    base = 1_800_000_000_000 << 16
    a.push("n1", 1, [{**entry("n1", 1, "k", "A"), "hlc": base + 1}])
    b.push("n1", 1, [{**entry("n1", 1, "k", "B"), "hlc": base + 5}])
    b.push("n2", 1, [{**entry("n2", 1, "k", "B2"), "hlc": base + 6}])
    assert a.node_label("n1", "a-host").known
    assert [n.node_id for n in a.nodes().nodes] == ["n1"]
    assert [(n.node_id, n.label) for n in b.nodes().nodes] == [("n1", None), ("n2", None)]
    assert a.node_label("n2", "steal").known is False  # B's node: not A's to name
    assert (a.log_window().from_hlc, a.log_window().entries) == (base + 1, 1)
    assert (b.log_window().from_hlc, b.log_window().entries) == (base + 5, 2)
    assert [r.sibling.data for r in a.log_page("", base + 10, 0, 100).rows] == [b"aA"]
    assert a.entry_point("n2", 1).hlc is None
    assert b.entry_point("n2", 1).hlc == base + 6
    assert query(tenant_server.dsn, "select tenant, node_id, label from walsync.nodes "
                                    "order by 1, 2") == [
        ("A", "n1", "a-host"), ("B", "n1", None), ("B", "n2", None)]
