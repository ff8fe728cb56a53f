"""Scoped pull with real Stores and replicators over the memory server (which answers as
the SQL does: tests/sync/test_transport_contract_scope.py): a store pulls only its scope,
widening fills the new prefixes in exactly once with no gap, narrowing stops pulling,
a compacted log makes the replicator re-bootstrap, and the scope is kept in the store.
Random schedules of writes, scope changes and group changes hold every one of these."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.sync._helpers import store_siblings
from walsync.engine import Store
from walsync.sync.memory import MemoryServer
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.scope import Scope, load_scope, pending_fills, plan_fills
from walsync.sync.transport import PullPage, StatePage, Transport, TransportProxy

pytestmark = pytest.mark.timeout(120)

ONCE = ReplicatorOptions(pull_interval_seconds=0, batch_wait_seconds=0, pull_limit=3,
                         retry_initial_seconds=0.001, retry_max_seconds=0.01)
PUSH_ONLY = ReplicatorOptions(pull=False, batch_wait_seconds=0)
KEYS = ["a/1", "a/2", "a/x/1", "a/x/2", "b/1", "b/2", "c/1", "c/x/1", "zed"]
PREFIXES = ["a/", "a/x/", "b/", "c/", "c/x/"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Recording(TransportProxy):
    """Every version delivered to the store, by pull or by fill: (origin, lsn, key)."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.delivered: list[tuple[str, int, str]] = []
        self.filled: list[tuple[str, int, str]] = []

    def pull(self, node_id: str, after: int, limit: int, *,
             prefixes: Sequence[str] | None = None, group: str | None = None) -> PullPage:
        page = super().pull(node_id, after, limit, prefixes=prefixes, group=group)
        self.delivered += [(e["origin"], e["lsn"], e["key"]) for e in page.entries]
        return page

    def scope_backfill(self, node_id: str, prefix: str, after_pos: int, upto: int,
                       except_prefixes: Sequence[str], after_key: str | None,
                       limit: int) -> StatePage:
        page = super().scope_backfill(node_id, prefix, after_pos, upto, except_prefixes,
                                      after_key, limit)
        got = [(r.sibling.version.origin, r.sibling.version.lsn, r.key) for r in page.rows]
        self.delivered += got
        self.filled += got
        return page


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[dict[str, Any]]:
    held: dict[str, Any] = {"stores": [], "reps": []}
    yield held
    for rep in held["reps"]:
        rep.close()
    for store in held["stores"]:
        if not store.closed:
            store.close()


def _open(held: dict[str, Any], root: Path, name: str) -> Store:
    store = Store.open(root / name, node_id=name)
    held["stores"].append(store)
    return store


def _rep(held: dict[str, Any], store: Store, transport: Transport,
         options: ReplicatorOptions = ONCE, scope: Scope | None = None) -> Replicator:
    rep = Replicator(store, transport, options, scope=scope)
    held["reps"].append(rep)
    return rep


def _server_siblings(server: MemoryServer) -> dict[str, list[tuple[str, int]]]:
    return {k: sorted((s["origin"], s["lsn"]) for s in v) for k, v in server.siblings().items()}


def _in(key: str, prefixes: Sequence[str] | None) -> bool:
    return prefixes is None or any(key.startswith(p) for p in prefixes)


def _resolved(scope: Scope, server: MemoryServer) -> list[str] | None:
    if scope.everything:
        return None
    out = list(scope.prefixes or ())
    if scope.group is not None:
        out += server.transport().scope_group(scope.group)[0].prefixes
    return None if "" in out else out


def test_scope_store_pulls_only_its_prefixes_and_pushes_everything(
        tmp_path: Path, stores: dict[str, Any]) -> None:
    server = MemoryServer()
    a, b = _open(stores, tmp_path, "A"), _open(stores, tmp_path, "B")
    ra = _rep(stores, a, server.transport(), PUSH_ONLY)
    rb = _rep(stores, b, server.transport(), scope=Scope(prefixes=("a/",)))
    for k in KEYS:
        a.put(k, k)
    b.put("b/mine", 1)
    ra.run_once()
    rb.run_once()
    assert sorted(k for k, _ in b.iter_siblings()) == ["a/1", "a/2", "a/x/1", "a/x/2", "b/mine"]
    assert "b/mine" in _server_siblings(server)  # pushed whatever the scope
    # kept in the store: a later open (and replicator) pulls by it
    assert load_scope(b) == Scope(prefixes=("a/",))
    path = b.path
    rb.close()
    b.close()
    again = Store.open(path)
    stores["stores"].append(again)
    assert load_scope(again) == Scope(prefixes=("a/",))
    with pytest.raises(ValueError, match="must hold a '/'"):
        Scope(prefixes=("a",))


def test_scope_narrowing_stops_pulling_and_widening_fills_in_once(
        tmp_path: Path, stores: dict[str, Any]) -> None:
    server = MemoryServer()
    a, b = _open(stores, tmp_path, "A"), _open(stores, tmp_path, "B")
    ra = _rep(stores, a, server.transport(), PUSH_ONLY)
    rec = Recording(server.transport())
    rb = _rep(stores, b, rec, scope=Scope(prefixes=("a/",)))
    a.put("a/1", 1)
    a.put("b/1", 1)
    a.put("b/2", 1)
    ra.run_once()
    rb.run_once()
    a.put("b/1", 2)  # replaces b/1's version: only the newer one is filled in
    a.put("b/3", 1)
    a.put("a/1", 2)
    ra.run_once()
    rb.run_once()  # passes over them: out of scope
    assert (b.get("a/1"), b.get("b/1")) == (2, None)
    a.delete("b/2")  # after the widening's position: pulled, not filled
    ra.run_once()
    rb.set_scope(Scope(prefixes=("a/", "b/")))
    rb.run_once()
    assert (b.get("b/1"), b.get("b/2"), b.get("b/3")) == (2, None, 1)
    assert store_siblings(b) == _server_siblings(server)
    assert len(rec.delivered) == len(set(rec.delivered))
    assert sorted((k, n) for _, n, k in rec.filled) == [("b/1", 4), ("b/3", 5)]
    assert pending_fills(b) == []
    # narrowing: a/ no more
    rb.set_scope(Scope(prefixes=("b/",)))
    a.put("a/1", 3)
    a.put("b/1", 3)
    ra.run_once()
    rb.run_once()
    assert (b.get("a/1"), b.get("b/1")) == (2, 3)
    # and back: only what it missed while a/ was out
    rb.set_scope(Scope())
    rb.run_once()
    assert b.get("a/1") == 3
    assert store_siblings(b) == _server_siblings(server)
    assert len(rec.delivered) == len(set(rec.delivered))


def test_scope_group_widened_on_the_server_is_filled_in(
        tmp_path: Path, stores: dict[str, Any]) -> None:
    server = MemoryServer()
    t = server.transport()
    t.scope_group("g", ["a/"])
    a, b = _open(stores, tmp_path, "A"), _open(stores, tmp_path, "B")
    ra = _rep(stores, a, server.transport(), PUSH_ONLY)
    rb = _rep(stores, b, server.transport(), scope=Scope(group="g"))
    a.put("a/1", 1)
    a.put("c/1", 1)
    ra.run_once()
    rb.run_once()
    assert (b.get("a/1"), b.get("c/1")) == (1, None)
    t.scope_group("g", ["a/", "c/"])
    a.put("c/2", 2)
    ra.run_once()
    rb.run_once()
    assert (b.get("c/1"), b.get("c/2")) == (1, 2)


@pytest.mark.parametrize("seed", range(12))
def test_scope_random_schedules_deliver_each_version_once_and_leave_no_gap(
        tmp_path: Path, stores: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    server = MemoryServer()
    t = server.transport()
    t.scope_group("g", [rng.choice(PREFIXES)])
    a, c, b = (_open(stores, tmp_path, n) for n in ("A", "C", "B"))
    writers = [(a, _rep(stores, a, server.transport(), PUSH_ONLY)),
               (c, _rep(stores, c, server.transport(), PUSH_ONLY))]
    rec = Recording(server.transport())
    rb = _rep(stores, b, rec)
    trail: list[str] = []

    def random_scope() -> Scope:
        kind = rng.randrange(4)
        picked = tuple(rng.sample(PREFIXES, rng.randrange(0, 3)))
        return [Scope(), Scope(prefixes=picked), Scope(group="g"),
                Scope(prefixes=picked, group="g")][kind]

    for _ in range(120):
        roll = rng.random()
        if roll < 0.45:
            store, rep = rng.choice(writers)
            key = rng.choice(KEYS)
            if rng.random() < 0.25:
                store.delete(key)
            else:
                store.put(key, rng.randrange(1000))
            if rng.random() < 0.7:
                rep.run_once()
        elif roll < 0.7:
            rb.run_once()
        elif roll < 0.88:
            scope = random_scope()
            trail.append(f"scope {scope.describe()}")
            rb.set_scope(scope)
        else:
            group = rng.sample(PREFIXES, rng.randrange(1, 3))
            trail.append(f"group {group}")
            t.scope_group("g", group)
    for _, rep in writers:
        rep.run_once()
    rb.run_once()
    assert pending_fills(b) == []
    assert len(rec.delivered) == len(set(rec.delivered)), trail
    want = _resolved(rb.scope, server)
    mine = {k: v for k, v in store_siblings(b).items() if _in(k, want)}
    theirs = {k: v for k, v in _server_siblings(server).items() if _in(k, want)}
    assert mine == theirs, trail


def test_scope_plan_fills_keeps_each_parts_own_history() -> None:
    left: dict[str, int] = {}
    # every key -> a/ at 10: everything but a/ left at 10
    assert plan_fills(None, ["a/"], left, 10) == []
    assert left == {"": 10}
    # a/x/ alone at 20: the rest of a/ left at 20
    assert plan_fills(["a/"], ["a/x/"], left, 20) == []
    assert left == {"": 10, "a/": 20}
    # every key at 30: a/ but a/x/ from 20, the rest but a/ from 10, a/x/ kept
    fills = plan_fills(["a/x/"], None, left, 30)
    assert sorted((f.prefix, f.after, f.upto, f.excluded) for f in fills) == [
        ("", 10, 30, ("a/", "a/x/")), ("a/", 20, 30, ("a/x/",))]
    assert left == {}


def test_scope_compacted_log_makes_the_replicator_rebootstrap(
        tmp_path: Path, stores: dict[str, Any]) -> None:
    clock = Clock()
    server = MemoryServer(clock=clock)
    t = server.transport()
    t.log_retention(3600)
    a, b = _open(stores, tmp_path, "A"), _open(stores, tmp_path, "B")
    ra = _rep(stores, a, server.transport(), PUSH_ONLY)
    rec = Recording(server.transport())
    rb = _rep(stores, b, rec, scope=Scope(prefixes=("a/", "b/")))
    a.put("a/keep", 1)
    a.put("a/gone", 1)
    ra.run_once()
    rb.run_once()
    assert b.get("a/gone") == 1
    pulled_to = rb.status().pull_cursor
    a.put("a/keep", 2)
    a.put("b/new", 1)
    a.put("a/other", 1)
    a.delete("a/other")  # a tombstone B never pulls before it is collected
    ra.run_once()
    # B stays away for longer than the window; the writes age past it too
    clock.now = 1e10
    run = t.compact_log()
    assert run.collected_tombstones == 1
    assert run.gc_through > pulled_to
    rb.run_once()
    assert rb.status().extra["rebootstraps"] == 1
    assert (b.get("a/keep"), b.get("b/new"), b.get("a/other")) == (2, 1, None)
    assert rb.status().pull_cursor == server.transport().head()
    assert len(rec.delivered) == len(set(rec.delivered))
    # and pulls on normally from there
    a.put("b/after", 1)
    ra.run_once()
    rb.run_once()
    assert b.get("b/after") == 1
    assert rb.status().extra["rebootstraps"] == 1


def test_scope_positions_of_another_server_are_forgotten(
        tmp_path: Path, stores: dict[str, Any]) -> None:
    """A prefix left the scope at a position of one server; the store then syncs with
    another (its cursor starts again from 0): widening fills the prefix from 0 there."""
    first, second = MemoryServer(), MemoryServer()
    a, b = _open(stores, tmp_path, "A"), _open(stores, tmp_path, "B")
    a.put("b/1", 1)
    a.put("a/1", 1)
    _rep(stores, a, first.transport(), PUSH_ONLY).run_once()
    rb = _rep(stores, b, first.transport(), scope=Scope(prefixes=("a/",)))
    rb.run_once()  # b/ was never in the scope here
    rb.set_scope(Scope(prefixes=("a/", "b/")))
    rb.run_once()
    rb.set_scope(Scope(prefixes=("a/",)))
    a.put("a/2", 2)
    _rep(stores, a, first.transport(), PUSH_ONLY).run_once()
    rb.run_once()  # b/ left the scope at the first server's position 3
    rb.close()
    # the second server has other positions: b/9 lands below 3 there
    c = _open(stores, tmp_path, "C")
    c.put("b/9", 9)
    _rep(stores, c, second.transport(), PUSH_ONLY).run_once()
    _rep(stores, a, second.transport(), PUSH_ONLY).run_once()
    rb2 = _rep(stores, b, second.transport())  # another server: pulls from 0 again
    rb2.run_once()
    rb2.set_scope(Scope(prefixes=("a/", "b/")))
    rb2.run_once()
    assert b.get("b/9") == 9
    assert store_siblings(b) == _server_siblings(second)
