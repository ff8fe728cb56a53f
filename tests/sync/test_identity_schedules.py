"""Random schedules over copies, servers and writes: nothing acknowledged is lost.

Each schedule runs stores against real databases (one transport kind per test): local
and remote writes, ship and pull rounds, copies of a store taken at random moments (both
copies go on writing), backups of a database (pg_dump) put back later (pg_restore), and
`walsync status`. Two families:

* ``copies``: ``cp -r`` copies (a new directory: the copy knows at its first open) and
  switches of a store to the other of two databases;
* ``clones``: copies whose store cannot tell them from the original (as a cloned disk or
  VM image), one database: only the server's claims keep them apart. (A node id is
  claimed per server: two such clones that each keep to another server are beyond what
  the protocol can see, sync/PROTOCOL.md "Node identity".)

Checked throughout:

* a ``remote`` commit's own entry is on the store's server when the commit returns;
* after every round, every write of the store up to its acknowledged LSN is on its
  server exactly as the store wrote it (each LSN under the node id that owns it), and so
  is every version of its own still current in its snapshot;
* `walsync status` never reports 0 unreplicated entries while the server lacks one;
* at the end, after last rounds everywhere, every write a server acknowledged (and did
  not lose to a backup put back) is among its merged state's siblings, or was
  superseded there by a write whose writer had seen it (values are unique; "seen" is
  what the writer held of the key when it wrote: a version that dominates another
  without having seen it is Riak's kv679).

WALSYNC_IDENTITY_SCHEDULES sets how many schedules run per family and transport
(default 3).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.pg import PostgresCluster
from tests.sync._servers import KINDS, Server, missing_on, server_factory
from walsync.engine import Store
from walsync.engine.identity import owner_of
from walsync.sync.cli import main
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(900)]

SCHEDULES = int(os.environ.get("WALSYNC_IDENTITY_SCHEDULES", "3") or 3)
STEPS = 45
ROUND = ReplicatorOptions(pull=False, retry_initial_seconds=0.02, retry_max_seconds=0.3)
PULL = ReplicatorOptions(pull=True, pull_interval_seconds=0.0, retry_initial_seconds=0.02,
                         retry_max_seconds=0.3)
THREAD = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                           retry_initial_seconds=0.02, retry_max_seconds=0.3)
KEYS = [f"k/{i}" for i in range(8)]


@pytest.fixture
def servers(pg_cluster: PostgresCluster) -> Iterator[Callable[[str], Server]]:
    yield from server_factory(pg_cluster)


@dataclass(frozen=True)
class Write:
    lsn: int
    key: str
    value: str
    #: the values of the key's versions the writer held when it wrote
    seen: frozenset[str]


@dataclass
class Slot:
    """One store directory, the server it syncs with, and the writes its history holds."""

    name: str
    path: Path
    server: Server
    store: Store
    writes: list[Write] = field(default_factory=list)

    def reopen(self) -> None:
        self.store = Store.open(self.path, remote_timeout_seconds=60)


class Schedule:
    def __init__(self, rng: random.Random, tmp: Path, servers: list[Server],
                 family: str) -> None:
        self.rng = rng
        self.tmp = tmp
        self.servers = servers
        self.family = family
        self.slots: list[Slot] = []
        self.ledger: dict[str, Write] = {}
        #: per server: the values of the writes it acknowledged
        self.acked_on: dict[int, set[str]] = {i: set() for i in range(len(servers))}
        #: per server: its backup and what it had acknowledged then
        self.backups: dict[int, tuple[Path, set[str]]] = {}
        self.counter = 0
        self.log: list[str] = []
        self.statuses = self.reships = 0

    def add(self, name: str, server: Server, path: Path | None = None,
            writes: list[Write] | None = None) -> Slot:
        store = Store.open(path or self.tmp / name, node_id=None if path else name,
                           remote_timeout_seconds=60)
        slot = Slot(name, path or self.tmp / name, server, store, list(writes or []))
        self.slots.append(slot)
        return slot

    def index(self, server: Server) -> int:
        return self.servers.index(server)

    def record(self, slot: Slot, lsn: int, key: str, value: str, seen: frozenset[str]) -> None:
        write = Write(lsn, key, value, seen)
        slot.writes.append(write)
        self.ledger[value] = write

    def seen(self, slot: Slot, key: str) -> frozenset[str]:
        return frozenset(v.value for v in slot.store.get_versions(key) if v.value is not None)

    def acked(self, slot: Slot, lsn: int) -> None:
        self.acked_on[self.index(slot.server)].update(
            w.value for w in slot.writes if w.lsn <= lsn)

    # -- operations ----------------------------------------------------------------------

    def write_local(self, slot: Slot) -> None:
        keys = self.rng.sample(KEYS, 2 if self.rng.random() < 0.3 else 1)
        puts = [(key, self.seen(slot, key), self.value(slot)) for key in keys]
        with slot.store.batch() as batch:
            for key, _, value in puts:
                batch.put(key, value)
        assert batch.result is not None
        for key, seen, value in puts:
            self.record(slot, batch.result.lsn, key, value, seen)

    def value(self, slot: Slot) -> str:
        self.counter += 1
        return f"{slot.name}#{self.counter}"

    def write_remote(self, slot: Slot) -> None:
        rep = Replicator(slot.store, slot.server.transport(), THREAD).start()
        try:
            key, value = self.rng.choice(KEYS), self.value(slot)
            seen = self.seen(slot, key)
            done = slot.store.put(key, value, durability="remote")
            self.record(slot, done.lsn, key, value, seen)
            owner = owner_of(slot.store.identities, done.lsn).node_id
            held = slot.server.entries().get((owner, done.lsn, key))
            assert held == value, (self.log[-1], owner, done.lsn, key, held)
            acked = rep.acked_lsn
        finally:
            rep.close()
        self.acked(slot, acked)

    def round(self, slot: Slot, *, pull: bool) -> None:
        rep = Replicator(slot.store, slot.server.transport(), PULL if pull else ROUND)
        try:
            rep._with_retries(rep.run_once)
            acked = rep.acked_lsn
        finally:
            rep.close()
        self.reships += rep.status().reships
        assert rep.error is None, rep.error
        missing = missing_on(slot.server, slot.store, through=acked)
        assert missing == [], (self.log[-1], acked, missing)
        self.acked(slot, acked)

    def copy(self, slot: Slot) -> None:
        if len(self.slots) >= 4:
            return
        slot.store.close()
        name = f"{slot.name}c{len(self.slots)}"
        shutil.copytree(slot.path, self.tmp / name)
        if self.family == "clones":  # the copy's store names the copy's own directory
            meta = json.loads((self.tmp / name / "STORE").read_text())
            meta["directory_inode"] = os.stat(self.tmp / name).st_ino
            (self.tmp / name / "STORE").write_text(json.dumps(meta))
        slot.reopen()
        self.add(name, self.rng.choice(self.servers), self.tmp / name, slot.writes)

    def switch(self, slot: Slot) -> None:
        slot.server = self.rng.choice([s for s in self.servers if s is not slot.server]
                                      or self.servers)

    def backup(self, slot: Slot) -> None:
        index = self.index(slot.server)
        path = self.tmp / f"backup-{index}-{self.counter}.dump"
        slot.server.dump(path)
        self.backups[index] = (path, set(self.acked_on[index]))

    def restore_backup(self, slot: Slot) -> None:
        index = self.index(slot.server)
        if index in self.backups:
            path, acked = self.backups.pop(index)
            slot.server.restore_dump(path)
            self.acked_on[index] = acked

    def status(self, slot: Slot) -> None:
        missing = missing_on(slot.server, slot.store)
        slot.store.close()
        try:
            result = CliRunner().invoke(main, ["status", "--store", str(slot.path), "--json"],
                                        env=slot.server.env(), catch_exceptions=False)
        finally:
            slot.reopen()
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["server_error"] is None, doc
        if missing:
            assert doc["unreplicated_entries"] > 0, (self.log[-1], missing, doc)
        self.statuses += 1

    def step(self) -> None:
        slot = self.rng.choice(self.slots)
        ops: list[tuple[str, Callable[[Slot], None], float]] = [
            ("write_local", self.write_local, 30), ("write_remote", self.write_remote, 14),
            ("ship", lambda s: self.round(s, pull=False), 14),
            ("ship+pull", lambda s: self.round(s, pull=True), 10),
            ("copy", self.copy, 7), ("status", self.status, 8), ("backup", self.backup, 3),
            ("restore_backup", self.restore_backup, 3)]
        if len(self.servers) > 1:
            ops.append(("switch", self.switch, 7))
        name, op, _ = self.rng.choices(ops, [w for _, _, w in ops])[0]
        self.log.append(f"{name}({slot.name} on server {self.index(slot.server)}, "
                        f"node {slot.store.node_id}, applied {slot.store.applied_lsn})")
        op(slot)

    def finish(self) -> None:
        """Last rounds everywhere (twice: pulls bring others' writes), then each server
        holds, or superseded knowingly, every write it acknowledged."""
        self.log.append("finish")
        for _ in range(2):
            for slot in self.slots:
                self.round(slot, pull=True)
        for slot in self.slots:
            assert missing_on(slot.server, slot.store) == [], slot.name
            self.status(slot)
        for index, server in enumerate(self.servers):
            state = server.sibling_values()
            for value in self.acked_on[index]:
                write = self.ledger[value]
                kept = state.get(write.key, [])
                assert any(v == value or value in self.past(v) for v in kept), (
                    f"server {index} lost {write} (siblings {kept})")
        for slot in self.slots:
            slot.store.close()

    def past(self, value: str) -> set[str]:
        """Every write the writer of ``value`` had seen, transitively."""
        out: set[str] = set()
        todo = [value]
        while todo:
            for seen in self.ledger[todo.pop()].seen:
                if seen not in out:
                    out.add(seen)
                    todo.append(seen)
        return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["copies", "clones"])
@pytest.mark.parametrize("seed", range(SCHEDULES))
def test_random_schedules_of_copies_servers_and_writes_lose_nothing(
        tmp_path: Path, servers: Any, kind: str, family: str, seed: int) -> None:
    rng = random.Random(f"identity-{family}-{seed}")
    count = 2 if family == "copies" else 1
    schedule = Schedule(rng, tmp_path, [servers(kind) for _ in range(count)], family)
    schedule.add("X", schedule.servers[0])
    schedule.add("Y", rng.choice(schedule.servers))
    try:
        for _ in range(STEPS):
            schedule.step()
        schedule.finish()
    except BaseException:
        print("\n".join(schedule.log))
        for slot in schedule.slots:
            if not slot.store.closed:
                slot.store.close()
        raise
    renewed = [i.node_id for s in schedule.slots for i in _ids(s)]
    print(f"{family} seed {seed} ({kind}): {len(schedule.slots)} stores, "
          f"{schedule.statuses} statuses, {schedule.reships} re-ships, "
          f"{len(set(renewed))} renewed ids")


def _ids(slot: Slot) -> list[Any]:
    with Store.open(slot.path, readonly=True) as store:
        return list(store.identities[1:])
