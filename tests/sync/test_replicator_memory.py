"""The replicator's logic on the in-memory reference server (sync/memory.py): no
PostgreSQL, so each case runs in well under a second.

Real Stores replicate through a MemoryServer, which answers as the SQL functions do (the
contract suite holds it to them): writes, deletes and conflicts converge between stores
and the server; merge records are never shipped back; lost acknowledgements and faults
before or after a push duplicate nothing; 'remote' durability waits for the server and
times out while it is down; a permanent error stops the replicator and keeps every
entry; a copied store takes a fresh node id; a server put back from a backup, or another
server, gets what it lacks again; a host whose lease was taken over is refused and told;
restore rebuilds a lost node's runs. PostgreSQL stays in the contract and end-to-end
suites (test_replicator.py, test_node_identity.py, test_recovery_point.py, ...).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sync._helpers import local_entries, store_siblings, store_winners, wait_for
from tests.sync._servers import Server, missing_on
from walsync.engine import LeaseLostEvent, Store
from walsync.engine.errors import (
    LeaseLostError,
    RemoteAuthError,
    RemoteDurabilityTimeoutError,
    RemoteUnavailableError,
    ReplicatorStoppedError,
    SyncProtocolError,
)
from walsync.engine.identity import owner_of
from walsync.engine.workflow import Workflows, held_lease
from walsync.sync.lease import Leases
from walsync.sync.memory import MemoryServer, MemoryTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore
from walsync.sync.transport import PushAck, Transport, TransportProxy, WireEntry

pytestmark = pytest.mark.timeout(60)

#: synchronous rounds (run_once), no waiting between batches
ONCE = ReplicatorOptions(pull_interval_seconds=0, batch_wait_seconds=0,
                         retry_initial_seconds=0.001, retry_max_seconds=0.01)
#: a background thread
THREAD = ReplicatorOptions(pull_interval_seconds=0.01, batch_wait_seconds=0.001,
                           retry_initial_seconds=0.001, retry_max_seconds=0.02)


class Clock:
    """The memory server's clock, moved by the test (leases expire when it says)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Nodes:
    """Stores under ``root`` and their replicators; everything is closed at the end."""

    def __init__(self, root: Path, server: MemoryServer) -> None:
        self.root = root
        self.server = server
        self.stores: list[Store] = []
        self.replicators: list[Replicator] = []

    def open(self, name: str, **options: Any) -> Store:
        store = Store.open(self.root / name, node_id=name, **options)
        self.stores.append(store)
        return store

    def replicator(self, store: Store, options: ReplicatorOptions = ONCE, *,
                   transport: Transport | None = None) -> Replicator:
        rep = Replicator(store, transport or self.server.transport(), options)
        self.replicators.append(rep)
        return rep

    def close_all(self) -> None:
        for rep in self.replicators:
            rep.close()
        for store in self.stores:
            if not store.closed:
                store.close()


@pytest.fixture
def server() -> MemoryServer:
    return MemoryServer()


@pytest.fixture
def nodes(tmp_path: Path, server: MemoryServer) -> Iterator[Nodes]:
    n = Nodes(tmp_path, server)
    try:
        yield n
    finally:
        n.close_all()


def server_siblings(server: MemoryServer) -> dict[str, list[tuple[str, int]]]:
    return {k: [(s["origin"], s["lsn"]) for s in v] for k, v in server.siblings().items()}


def server_winners(server: MemoryServer) -> dict[str, tuple[str, int, bool]]:
    return {k: (w["origin"], w["lsn"], w["deleted"]) for k, w in server.state().items()}


def entry_ids(server: MemoryServer) -> list[tuple[str, int, str]]:
    return [(e["origin"], e["lsn"], e["key"]) for e in server.entries()]


def sync_all(*reps: Replicator, rounds: int = 2) -> None:
    """Every store ships everything, then pulls what the others shipped."""
    for _ in range(rounds):
        for rep in reps:
            rep.run_once()


# -- both ways ---------------------------------------------------------------------------


def test_memory_replicator_writes_deletes_and_conflicts_converge(
        nodes: Nodes, server: MemoryServer) -> None:
    a, b = nodes.open("A"), nodes.open("B")
    ra, rb = nodes.replicator(a), nodes.replicator(b)
    a.put("from-a", {"n": 1})
    b.put("from-b", [1, 2, 3])
    with a.batch() as batch:
        batch.put("pair/1", "one")
        batch.put("pair/2", "two")
    a.put("doc", {"by": "A"})  # neither has seen the other's: concurrent
    b.put("doc", {"by": "B"})
    sync_all(ra, rb)
    assert (b.get("from-a"), b.get("pair/2"), a.get("from-b")) == ({"n": 1}, "two", [1, 2, 3])
    assert len(a.get_versions("doc")) == len(b.get_versions("doc")) == 2
    assert server_siblings(server)["doc"] == [("A", 3), ("B", 2)]
    assert a.get("doc") == b.get("doc")  # one deterministic winner everywhere
    assert [c.key for c in server.transport().conflicts("", 10)] == ["doc"]

    deleted = b.delete("from-a")
    resolved = a.put("doc", {"by": "both"})
    sync_all(ra, rb)
    assert a.get("from-a") is None
    assert [v.value for v in b.get_versions("doc")] == [{"by": "both"}]
    assert server_siblings(server)["doc"] == [("A", resolved.lsn)]
    assert server.transport().conflicts("", 10) == []
    assert server_winners(server)["from-a"] == ("B", deleted.lsn, True)
    assert store_siblings(a) == store_siblings(b) == server_siblings(server)
    assert store_winners(a) == store_winners(b) == server_winners(server)


def test_memory_replicator_never_ships_pulled_merge_records(
        nodes: Nodes, server: MemoryServer) -> None:
    a, b = nodes.open("A"), nodes.open("B")
    ra, rb = nodes.replicator(a), nodes.replicator(b)
    for i in range(20):
        (a if i % 2 else b).put(f"k{i % 5}", i)
        if i % 3 == 0:
            sync_all(ra, rb, rounds=1)
    sync_all(ra, rb, rounds=3)
    assert a.applied_lsn > 10  # each store's WAL holds the other's records as merges
    assert b.applied_lsn > 10
    own = sorted((e["origin"], e["lsn"], e["key"]) for s in (a, b) for e in local_entries(s))
    assert sorted(entry_ids(server)) == own
    assert len(own) == 20
    assert (ra.acked_lsn, rb.acked_lsn) == (a.applied_lsn, b.applied_lsn)
    assert server.node_row("A")["acked_lsn"] == a.applied_lsn  # merge records count
    assert store_siblings(a) == store_siblings(b) == server_siblings(server)


# -- faults ------------------------------------------------------------------------------


class Faulty(TransportProxy):
    """Pushes and pulls that fail, as ``plan`` says for each call in turn: "before" (the
    server never got it), "after" (it committed; the answer was lost), or None."""

    def __init__(self, inner: Transport, rng: random.Random, rate: float) -> None:
        super().__init__(inner)
        self.rng = rng
        self.rate = rate
        self.faults = 0

    def _fault(self) -> str | None:
        if self.rng.random() >= self.rate:
            return None
        self.faults += 1
        return self.rng.choice(["before", "after"])

    def push(self, node_id: str, through_lsn: int, entries: list[WireEntry]) -> PushAck:
        fault = self._fault()
        if fault == "before":
            raise RemoteUnavailableError("injected: the push never reached the server")
        ack = super().push(node_id, through_lsn, entries)
        if fault == "after":
            raise RemoteUnavailableError("injected: the acknowledgement was lost")
        return ack

    def pull(self, node_id: str, after: int, limit: int) -> Any:
        fault = self._fault()
        if fault == "before":
            raise RemoteUnavailableError("injected: the pull never reached the server")
        page = super().pull(node_id, after, limit)
        if fault == "after":
            raise RemoteUnavailableError("injected: the page was lost")
        return page


@pytest.mark.parametrize("seed", range(4))
def test_memory_replicator_faults_before_and_after_pushes_duplicate_nothing(
        nodes: Nodes, server: MemoryServer, seed: int) -> None:
    rng = random.Random(seed)
    stores = [nodes.open(name) for name in ("A", "B", "C")]
    faulty = [Faulty(server.transport(), rng, 0.3) for _ in stores]
    reps = [nodes.replicator(s, THREAD, transport=t).start() for s, t in zip(stores, faulty,
                                                                             strict=True)]
    for i in range(120):
        store = rng.choice(stores)
        if rng.random() < 0.15:
            store.delete(f"k{rng.randrange(12)}")
        else:
            store.put(f"k{rng.randrange(12)}", {"i": i, "by": store.node_id})

    def settled() -> bool:
        return all(r.error is None and r.status().lag_entries == 0 for r in reps) and all(
            store_siblings(s) == server_siblings(server) for s in stores)

    wait_for(settled, timeout=30, what="every store shipped and pulled everything")
    assert sum(t.faults for t in faulty) > 10
    assert sum(r.status().retries for r in reps) > 0
    # every local write once on the server, under its writer, in LSN order per writer
    own = sorted((e["origin"], e["lsn"], e["key"]) for s in stores for e in local_entries(s))
    assert sorted(entry_ids(server)) == own
    assert [e["pos"] for e in server.entries()] == list(range(1, len(own) + 1))
    assert len({store_winners(s) == server_winners(server) for s in stores}) == 1
    assert {json.dumps(dict(s.scan()), sort_keys=True) for s in stores} == {
        json.dumps(dict(stores[0].scan()), sort_keys=True)}


def test_memory_replicator_remote_durability_waits_and_times_out_while_the_server_is_down(
        nodes: Nodes, server: MemoryServer) -> None:
    a = nodes.open("A", remote_timeout_seconds=0.5)
    rep = nodes.replicator(a, THREAD).start()
    for i in range(3):
        done = a.put(f"k{i}", i, durability="remote")
        assert ("A", done.lsn, f"k{i}") in entry_ids(server)  # no waiting: it is there
    server.stop()
    with pytest.raises(RemoteDurabilityTimeoutError, match="durable locally") as info:
        a.put("k", "while down", durability="remote")
    assert info.value.lsn == 4
    assert a.get("k") == "while down"
    wait_for(lambda: rep.status().retries > 0, what="retries while down")
    assert rep.error is None  # transient: still trying
    server.start()
    wait_for(lambda: rep.status().lag_entries == 0, what="shipped once the server is back")
    assert ("A", 4, "k") in entry_ids(server)
    assert a.put("after", 1, durability="remote").lsn == 5


def test_memory_replicator_permanent_error_stops_it_and_keeps_every_entry(
        nodes: Nodes, tmp_path: Path) -> None:
    server = MemoryServer(key="the-right-key")
    nodes.server = server
    a = nodes.open("A", segment_bytes=4096)
    for i in range(30):
        a.put(f"k{i}", "z" * 300)
    rep = nodes.replicator(a, THREAD, transport=server.transport("a-revoked-key")).start()
    wait_for(lambda: rep.error is not None, what="the replicator to stop")
    assert isinstance(rep.error, RemoteAuthError)
    assert "a-revoked-key" not in str(rep.error)
    assert rep.status().stopped_reason is not None
    with pytest.raises(ReplicatorStoppedError, match="durable locally"):
        a.put("k30", "z", durability="remote")
    a.checkpoint()
    assert a.wal_reader().oldest_lsn() == 1  # nothing acknowledged: every record kept
    assert server.entries() == []

    rep.close()
    again = nodes.replicator(a, ONCE, transport=server.transport())
    again.run_once()
    assert again.acked_lsn == a.applied_lsn == 31
    assert sorted(entry_ids(server)) == sorted(("A", i + 1, f"k{i}") for i in range(31))


def test_memory_replicator_resumes_from_the_servers_acknowledgement_after_a_crash(
        nodes: Nodes, server: MemoryServer) -> None:
    a = nodes.open("A")
    rep = nodes.replicator(a)
    for i in range(10):
        a.put(f"k{i}", i)
    rep.run_once()
    rep.close()
    a.sync_ledger.set_acked_lsn(3)  # the store's record of the acknowledgement was lost
    rep = nodes.replicator(a)
    assert rep.run_once() == (0, 0)  # the server's entries are its own: adopted
    assert rep.acked_lsn == 10
    assert len(server.entries()) == 10
    assert server.calls["push_claimed"] == 1  # nothing was sent again


# -- node identity and server identity -------------------------------------------------


def _copy(src: Path, dst: Path, how: str) -> None:
    shutil.copytree(src, dst)
    if how == "clone":  # the copy believes its directory is the one it was made in
        meta = json.loads((dst / "STORE").read_text())
        meta["directory_inode"] = os.stat(dst).st_ino
        (dst / "STORE").write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["cp", "clone"])
def test_memory_replicator_a_copy_whose_original_shipped_on_takes_a_fresh_id(
        tmp_path: Path, server: MemoryServer, how: str) -> None:
    view = Server("memory", "", None, memory=server)
    with Store.open(tmp_path / "a", node_id="A") as a:
        for i in range(5):
            a.put(f"k/{i}", i)
        Replicator(a, server.transport(), ONCE).run_once()
    _copy(tmp_path / "a", tmp_path / "copy", how)
    with Store.open(tmp_path / "a") as a:
        for i in range(3):
            a.put(f"k/{i}", f"original {i}")
        Replicator(a, server.transport(), ONCE).run_once()
    with Store.open(tmp_path / "copy") as copy:
        assert copy.node_id == "A"
        copy.put("k/0", "from the copy")
        rep = Replicator(copy, server.transport(), ONCE)
        rep.run_once()
        assert rep.status().node_renewals == 1
        assert copy.node_id != "A"
        assert copy.identities[-1].start_lsn == 6  # both agree up to LSN 5
        assert server.entries()[-1]["origin"] == copy.node_id
        assert missing_on(view, copy) == []
    held = view.entries()
    assert [held[("A", n, f"k/{n - 6}")] for n in (6, 7, 8)] == [
        "original 0", "original 1", "original 2"]
    with Store.open(tmp_path / "a") as a:
        Replicator(a, server.transport(), ONCE).run_once()
        assert a.node_id == "A"
        assert missing_on(view, a) == []


def test_memory_replicator_server_put_back_from_a_backup_gets_the_lost_entries_again(
        nodes: Nodes, server: MemoryServer) -> None:
    view = Server("memory", "", None, memory=server)
    a = nodes.open("A")
    rep = nodes.replicator(a)
    for i in range(10):
        a.put(f"k/{i}", i)
    rep.run_once()
    backup = server.backup()
    for i in range(10, 25):
        a.put(f"k/{i % 12}", i)
    rep.run_once()
    assert view.acked("A") == 25
    server.put_back(backup)  # the database restored from its backup: up to LSN 10
    assert view.acked("A") == 10
    a.put("after", 1)
    rep.run_once()
    assert rep.status().reships == 1
    assert rep.acked_lsn == a.applied_lsn
    assert missing_on(view, a) == []
    assert store_siblings(a) == server_siblings(server)


def test_memory_replicator_another_server_gets_everything_and_going_back_ships_nothing(
        nodes: Nodes) -> None:
    first, second = MemoryServer(), MemoryServer()
    a = nodes.open("A")
    for i in range(20):
        a.put(f"k/{i % 8}", i)
    assert Replicator(a, first.transport(), ONCE).run_once() == (20, 0)
    to_second = Replicator(a, second.transport(), ONCE)
    pushed, _ = to_second.run_once()
    assert pushed == 20
    assert to_second.status().server_id == second.server_id
    assert missing_on(Server("memory", "", None, memory=second), a) == []
    back = Replicator(a, first.transport(), ONCE)
    assert back.run_once()[0] == 0  # the first server holds every entry already
    assert missing_on(Server("memory", "", None, memory=first), a) == []


# -- leases and fencing ----------------------------------------------------------------


def test_memory_replicator_a_host_whose_lease_was_taken_over_is_refused_and_told(
        tmp_path: Path) -> None:
    clock = Clock()
    server = MemoryServer(clock=clock)
    x, y = Store.open(tmp_path / "x"), Store.open(tmp_path / "y")
    rep_x = Replicator(x, server.transport(), ONCE)
    rep_y = Replicator(y, server.transport(), ONCE)
    lost = x.events.subscribe(kinds="lease_lost")
    try:
        lease_x = Leases(server.transport(), store=x, ttl_seconds=30).acquire("run-1")
        run_x = Workflows(x).run("w", "run-1", lease=lease_x)
        run_x.start()
        run_x.step("x1", lambda: "by X")
        rep_x.run_once()
        rep_y.run_once()
        with pytest.raises(Exception, match="leased by"):
            Leases(server.transport(), store=y, ttl_seconds=30).acquire("run-1")
        clock.now += 31  # X's lease expires by the server's clock
        lease_y = Leases(server.transport(), store=y, ttl_seconds=30).acquire("run-1")
        assert lease_y.token == lease_x.token + 1
        run_y = Workflows(y).get_run("run-1")
        run_y.set_lease(lease_y)
        run_y.step("y1", lambda: "by Y")
        rep_y.run_once()
        # X, paused past its lease, writes on through its old run object: refused locally
        # once it pulled Y's record; written around the workflow layer, refused there
        rep_x.run_once()
        with pytest.raises(LeaseLostError):
            run_x.step("x2", lambda: "by X, late")
        refused_before = len(server.refused())
        # (a key of the run in the spelling of an older walsync: a user key to the store)
        x.put("runs/run-1/steps/x3", {"by": "X"}, fence=lease_x.token)
        rep_x.run_once()
        assert [(r["key"], r["fence"], r["current"], r["holder"])
                for r in server.refused()[refused_before:]] == [
            ("runs/run-1/steps/x3", lease_x.token, lease_y.token, y.node_id)]
        assert rep_x.status().lost_runs == {"run-1": lease_y.token}
        event = lost.get(timeout_seconds=5)
        assert isinstance(event, LeaseLostEvent)
        assert (event.run_id, event.current_token, event.holder) == (
            "run-1", lease_y.token, y.node_id)
    finally:
        lost.close()
        x.close()
        y.close()


class Answering(MemoryTransport):
    """A memory transport whose answer to one function is ``doc`` (another protocol
    version, or a proxy answering in the server's place)."""

    def __init__(self, server: MemoryServer, function: str, doc: Any) -> None:
        super().__init__(server)
        self.function = function
        self.doc = doc

    def call(self, function: str, args: dict[str, Any]) -> Any:
        answer = super().call(function, args)
        return self.doc if function == self.function else answer


@pytest.mark.parametrize(("function", "doc", "field"), [
    ("lease_acquire", {"acquired": True, "holder": "A", "token": 1}, "'run_id'"),
    ("lease_acquire", {"acquired": True, "run_id": "r1", "holder": "A", "token": "1",
                       "expires_at": "2026-12-07T00:00:00+00:00",
                       "now": "2026-12-07T00:00:00+00:00"}, "'token'"),
    ("lease_renew", {"renewed": True}, "'token'"),
    ("lease_release", ["released"], "not a JSON object"),
    ("leases", {"leases": []}, "not a JSON array"),
])
def test_memory_leases_refuse_a_malformed_answer_naming_the_call(
        tmp_path: Path, server: MemoryServer, function: str, doc: Any, field: str) -> None:
    """A lease answer of another shape is a SyncProtocolError naming the call and the
    field, never a KeyError or a lease taken on half an answer."""
    with Store.open(tmp_path / "a", node_id="A") as a:
        good = Leases(server.transport(), store=a).acquire("r1")
        leases = Leases(Answering(server, function, doc), store=a)
        calls = {"lease_acquire": lambda: leases.acquire("r2"),
                 "lease_renew": lambda: leases.renew(good),
                 "lease_release": lambda: leases.release(good),
                 "leases": leases.held}
        with pytest.raises(SyncProtocolError, match=field) as info:
            calls[function]()
        assert str(info.value).startswith(function)
        assert held_lease(a, "r2") is None  # nothing taken on half an answer


def test_memory_restore_rebuilds_a_lost_nodes_runs_and_names_the_recovery_point(
        tmp_path: Path, server: MemoryServer) -> None:
    with Store.open(tmp_path / "a", node_id="A") as a:
        lease = Leases(server.transport(), store=a).acquire("r1")
        run = Workflows(a).run("w", "r1", lease=lease)
        run.start()
        run.step("s1", lambda: {"done": 1})
        a.put("unrelated", 1)
        Replicator(a, server.transport(), ONCE).run_once()
        applied = a.applied_lsn
    report = restore(server.transport(), tmp_path / "b", lost_node="A")
    assert report.resumable_runs == ["r1"]
    assert report.lost_node_acked_lsn == applied
    assert report.recovery_point is not None
    with Store.open(tmp_path / "b") as b:
        assert b.node_id != "A"
        assert b.get("unrelated") is None  # only the lost node's runs
        assert Workflows(b).get_run("r1").record.owner_node == "A"
    everything = restore(server.transport(), tmp_path / "c")
    assert everything.keys == len(server.siblings())
    with Store.open(tmp_path / "c") as c:
        assert c.get("unrelated") == 1
        assert owner_of(c.identities, 1).node_id == c.node_id
