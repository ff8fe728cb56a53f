"""Point-in-time restore is exact: a recorded history of random writes and deletes by
several nodes (syncing with each other at random, so their versions are causally
related and sometimes concurrent), restored at random points, equals the history
replayed to that point by a simple model written here (maximal versions by vector
comparison, nothing of the store's or the server's merge code).

Over PostgreSQL (both transports) and the memory server. The points are commit times
(``--at``, as ISO-8601 and as unix milliseconds) and records (``--lsn``); a point
before the window is refused with the window in the message, a point after the newest
entry is the current state and says so.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.sync._servers import ALL_KINDS, Server, server_factory
from walsync.engine import Store
from walsync.engine.errors import RestorePointError
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore

pytestmark = [pytest.mark.timeout(300)]

OPTIONS = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                            retry_initial_seconds=0.02, retry_max_seconds=0.3)
KEYS = [f"k/{i}" for i in range(6)]


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Server]]:
    yield from server_factory(lambda: request.getfixturevalue("pg_cluster"))


@dataclass(frozen=True)
class Written:
    """One version as its writer made it: the model's history."""

    key: str
    origin: str
    lsn: int
    hlc: int
    vv: dict[str, int]
    value: Any  # None: a delete


def _leq(a: dict[str, int], b: dict[str, int]) -> bool:
    return all(n <= b.get(k, 0) for k, n in a.items())


def model_at(history: list[Written], cut: int) -> dict[str, tuple[set[str], Any]]:
    """Each key present at the cut: the set of its maximal versions' values (JSON text,
    "<deleted>" for a tombstone) and its winner's value; a key whose maximal versions
    are all tombstones is absent."""
    out: dict[str, tuple[set[str], Any]] = {}
    for key in sorted({w.key for w in history}):
        seen = [w for w in history if w.key == key and w.hlc <= cut]
        top = [w for w in seen
               if not any(o is not w and _leq(w.vv, o.vv) and w.vv != o.vv for o in seen)]
        if not top or all(w.value is None for w in top):
            continue
        best = max(top, key=lambda w: (w.hlc, w.origin, w.lsn))
        out[key] = ({"<deleted>" if w.value is None else json.dumps(w.value) for w in top},
                    best.value)
    return out


def restored_state(path: Path) -> dict[str, tuple[set[str], Any]]:
    out: dict[str, tuple[set[str], Any]] = {}
    with Store.open(path, create=False) as store:
        for key, _sibs in store.iter_siblings(""):
            if key.startswith(".walsync/"):
                continue
            versions = store.get_versions(key)
            values = {"<deleted>" if v.version.deleted else json.dumps(v.value)
                      for v in versions}
            if values and values != {"<deleted>"}:
                out[key] = (values, store.get(key))
    return out


def sync(store: Store, server: Server) -> None:
    rep = Replicator(store, server.transport(), OPTIONS)
    try:
        rep.run_once()
    finally:
        rep.stop()


#: what a writer's store held of every key right after one of its records: (origin,
#: lsn) -> key -> the version vectors of its siblings
Seen = dict[tuple[str, int], dict[str, list[dict[str, int]]]]


def vectors(store: Store) -> dict[str, list[dict[str, int]]]:
    return {k: [dict(v.version.vv) for v in store.get_versions(k)] for k in KEYS}


def make_history(server: Server, tmp: Path,
                 rng: random.Random) -> tuple[list[Written], Seen, dict[str, Store]]:
    stores = {name: Store.open(tmp / name, create=True) for name in ("a", "b", "c")}
    history: list[Written] = []
    seen: Seen = {}
    for _ in range(45):
        store = stores[rng.choice("abc")]
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(KEYS)
            roll = rng.random()
            value = None if roll < 0.25 else ("same" if roll < 0.35 else rng.randrange(10**6))
            result = store.delete(key) if value is None else store.put(key, value)
            mine = [v for v in store.get_versions(key)
                    if (v.version.origin, v.version.lsn) == (store.node_id, result.lsn)]
            if not mine:  # a delete the store holds as a tombstone sibling only
                mine = [v for v in store.get_versions(key) if v.version.lsn == result.lsn]
            assert len(mine) == 1, (key, result.lsn, store.get_versions(key))
            v = mine[0].version
            history.append(Written(key, v.origin, v.lsn, v.hlc, dict(v.vv), value))
            seen[(v.origin, v.lsn)] = vectors(store)
        if rng.random() < 0.5:
            sync(store, server)
        if rng.random() < 0.3:
            time.sleep(0.002)  # commits in later milliseconds: --at cuts between them
    for store in stores.values():
        sync(store, server)
    return history, seen, stores


#: each database transport once, the memory server over several histories
CASES = [pytest.param(k, 0, marks=pytest.mark.postgres) for k in ALL_KINDS if k != "memory"] + [
    pytest.param("memory", seed) for seed in range(5)]


@pytest.mark.parametrize(("kind", "seed"), CASES)
def test_pitr_restore_equals_the_history_replayed_to_the_point(
        servers: Callable[[str], Server], tmp_path: Path, kind: str, seed: int) -> None:
    server = servers(kind)
    rng = random.Random(f"pitr-{kind}-{seed}")
    history, seen, stores = make_history(server, tmp_path, rng)
    try:
        hlcs = sorted({w.hlc for w in history})
        points: list[tuple[str, Any, int]] = []
        for _ in range(4):  # commit times, inclusive at millisecond precision
            ms = rng.choice(hlcs) >> 16
            as_iso = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
            points.append(("at", as_iso if rng.random() < 0.5 else ms, ((ms + 1) << 16) - 1))
        for _ in range(4):  # records
            w = rng.choice(history)
            points.append(("lsn", f"{w.origin}:{w.lsn}", w.hlc))
        transport = server.transport()
        siblings_seen = absent_seen = 0
        for n, (how, arg, cut) in enumerate(points):
            dest = tmp_path / f"restored-{n}"
            report = restore(transport, dest, **{how: arg})
            want = model_at(history, cut)
            assert restored_state(dest) == want, (how, arg)
            siblings_seen += sum(len(values) > 1 for values, _ in want.values())
            absent_seen += len({w.key for w in history if w.hlc <= cut} - set(want))
            point = report.point
            assert point is not None
            assert point.cut_hlc == cut
            included = [w for w in history if w.hlc <= cut]
            assert point.entries == len(included)
            last = max(included, key=lambda w: (w.hlc, w.origin, w.lsn))
            assert (point.last_node, point.last_lsn, point.last_hlc) == (
                last.origin, last.lsn, last.hlc)
            assert point.after_newest == (cut >= hlcs[-1])
            if how == "lsn":
                # causality: everything the node held when it committed the record is
                # in the cut (each version it held is at or below a restored sibling)
                with Store.open(dest, readonly=True) as restored:
                    held = vectors(restored)
                origin, _, lsn = str(arg).rpartition(":")
                for key, vvs in seen[(origin, int(lsn))].items():
                    for vv in vvs:
                        assert any(_leq(vv, r) for r in held[key]), (arg, key, vv, held[key])
        # the history held concurrent versions and deletes at the points restored
        assert siblings_seen, (siblings_seen, absent_seen)
        assert absent_seen, (siblings_seen, absent_seen)
        # after the newest entry: the current state, said so
        report = restore(transport, tmp_path / "now", at=(hlcs[-1] >> 16) + 60_000)
        assert report.point is not None
        assert report.point.after_newest
        assert restored_state(tmp_path / "now") == model_at(history, 1 << 62)
        # before the window: refused, the window named
        first = dt.datetime.fromtimestamp((hlcs[0] >> 16) / 1000, dt.UTC)
        with pytest.raises(RestorePointError) as info:
            restore(transport, tmp_path / "before", at=(hlcs[0] >> 16) - 1)
        assert "before the server's window" in str(info.value)
        assert first.isoformat(timespec="milliseconds") in str(info.value)
        assert not (tmp_path / "before").exists() or not any((tmp_path / "before").iterdir())
    finally:
        for store in stores.values():
            store.close()
