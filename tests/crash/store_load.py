"""The engine crash workload: a child committing from several threads, and its report.

The child (:func:`child_main`, forked by the zygote) opens a store and
commits from several threads. Thread ``tid`` only touches its own keys
(``t<tid>/s<j>`` for single writes, ``t<tid>/b<j>`` for batches), one commit
at a time, so the parent can tell exactly which commits may be in the store.
Thread 0 also checkpoints now and then and compacts once per child, at a
seeded moment. Every report is one line (tests/crash/children.py ``Emitter``)::

    O                                        about to open the store
    R <next_lsn> <replayed>                  store open, workload starts
    I <tid> <seq> <json [[op, key, n], ...]>  about to commit (op "put"/"del";
                                              n: padding length of the value)
    A <tid> <seq> <lsn>                       that commit returned with this LSN
    C                                        the workload ended; closing the store
    D                                        store closed
    H / E / K                                kill points (tests/crash/killpoints.py)

Values are ``{"t": tid, "s": seq, "g": generation, "p": "x" * n}``, unique per
key, so a value read back names the commit that wrote it; tombstones are told
apart by their version's LSN.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.crash.children import Emitter
from tests.crash.killpoints import KillPlan, KillPoints
from tests.crash.ledger import Commit

SINGLE_KEYS = 4
BATCH_KEYS = 3
#: padding of an occasional large value: its CBOR encoding exceeds the default
#: compress_above_bytes, so it is stored zstd-compressed
BIG_PADDING = 6000

#: one operation of a commit as the child reports it: [op, key, padding or None]
WireOp = list[Any]


def single_key(tid: int, j: int) -> str:
    return f"t{tid:02d}/s{j}"


def batch_key(tid: int, j: int) -> str:
    return f"t{tid:02d}/b{j}"


def make_value(tid: int, seq: int, generation: int, padding: int) -> dict[str, Any]:
    return {"t": tid, "s": seq, "g": generation, "p": "x" * padding}


def make_ops(rng: random.Random, tid: int) -> list[WireOp]:
    """The next commit of thread ``tid``: a single put or delete, or a batch."""

    def padding() -> int:
        return BIG_PADDING if rng.random() < 0.03 else rng.randint(0, 160)

    r = rng.random()
    if r < 0.45:
        return [["put", single_key(tid, rng.randrange(SINGLE_KEYS)), padding()]]
    if r < 0.60:
        return [["del", single_key(tid, rng.randrange(SINGLE_KEYS)), None]]
    ops: list[WireOp] = []
    for j in range(BATCH_KEYS):
        if rng.random() < 0.25:
            ops.append(["del", batch_key(tid, j), None])
        else:
            ops.append(["put", batch_key(tid, j), padding()])
    if rng.random() < 0.5:
        ops.append(["put", single_key(tid, rng.randrange(SINGLE_KEYS)), padding()])
    return ops


@dataclass
class StoreChildConfig:
    path: str
    seed: int
    #: distinguishes this child's values from earlier children's on the same store
    generation: int
    threads: int = 4
    segment_bytes: int = 4096
    checkpoint_every_bytes: int = 16384
    #: the workload closes the store and exits 0 after this many acknowledgements
    max_acks: int = 10_000
    #: ... or after this long (a safety net)
    max_seconds: float = 20.0
    #: the share of commits made with durability 'none' (a process crash keeps
    #: them too: they were written before the call returned)
    none_fraction: float = 0.0
    #: the chance, per commit of thread 0, of an explicit checkpoint
    checkpoint_fraction: float = 0.02
    #: compact once, after this many of thread 0's commits (-1: never)
    compact_after: int = -1
    #: open the store (replaying its WAL), report, and exit without a workload or close
    open_only: bool = False
    kill: dict[str, Any] | None = None
    discover: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the child -----------------------------------------------------------------


def child_main(report_fd: int, args: dict[str, Any]) -> int:
    from walsync.engine import Delete, Put, Store

    config = StoreChildConfig(**args)
    emit = Emitter(report_fd)
    points = KillPoints(emit, KillPlan.from_dict(config.kill), discover=config.discover)
    points.install()
    points.enter("open")
    emit("O")
    store = Store.open(
        config.path,
        segment_bytes=config.segment_bytes,
        checkpoint_every_bytes=config.checkpoint_every_bytes,
        durability="local",
    )
    assert store.recovery is not None
    emit(f"R {store.next_lsn} {store.recovery.replayed_records}")
    if config.open_only:
        points.report_counts()
        return 0  # no close: a later child or the parent carries on from here
    points.enter("run")
    deadline = time.monotonic() + config.max_seconds
    acks = [0]
    lock = threading.Lock()
    stop = threading.Event()
    #: a compaction asked for runs before the load stops: thread 0 also checkpoints,
    #: so the others may reach max_acks before it reaches compact_after
    compacted = threading.Event()
    if config.compact_after < 0:
        compacted.set()
    failed: list[str] = []

    def worker(tid: int) -> None:
        rng = random.Random(f"{config.seed}/{config.generation}/{tid}")
        seq = 0
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                wire = make_ops(rng, tid)
                ops: list[Put | Delete] = [
                    Put(key, make_value(tid, seq, config.generation, n))
                    if op == "put" else Delete(key)
                    for op, key, n in wire
                ]
                durability = "none" if rng.random() < config.none_fraction else "local"
                emit(f"I {tid} {seq} {json.dumps(wire, separators=(',', ':'))}")
                result = store.commit(ops, durability=durability)
                emit(f"A {tid} {seq} {result.lsn}")
                with lock:
                    acks[0] += 1
                    total = acks[0]
                    points.acked(total)
                    if total >= config.max_acks and compacted.is_set():
                        stop.set()
                if tid == 0:
                    if seq == config.compact_after:
                        store.compact()
                        compacted.set()
                    elif rng.random() < config.checkpoint_fraction:
                        store.checkpoint()
                seq += 1
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            failed.append(traceback.format_exc())
            stop.set()

    threads = [threading.Thread(target=worker, args=(tid,), name=f"crash-load-{tid}")
               for tid in range(config.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        sys.stderr.write("".join(failed))
        return 3
    emit("C")
    points.enter("close")
    store.close()
    emit("D")
    points.report_counts()
    return 0


# -- the parent's view of one child ----------------------------------------------


@dataclass
class Incarnation:
    """What one child reported: its intents and acknowledgements, and its kill points."""

    generation: int
    opening: bool = False
    ready: bool = False
    replayed: int = 0
    closing: bool = False
    done: bool = False
    intents: dict[tuple[int, int], list[WireOp]] = field(default_factory=dict)
    acks: dict[tuple[int, int], int] = field(default_factory=dict)
    #: (point, phase) first reached by this child
    reached: set[tuple[str, str]] = field(default_factory=set)
    #: (point, phase) -> hits, from a child that ended normally
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    #: the kill point that ended the child: (point, when)
    killed_at: tuple[str, str] | None = None
    bad_lines: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        parts = line.split(" ", 3)
        try:
            kind = parts[0]
            if kind == "O":
                self.opening = True
            elif kind == "R":
                self.ready = True
                self.replayed = int(parts[2])
            elif kind == "I":
                self.intents[(int(parts[1]), int(parts[2]))] = json.loads(parts[3])
            elif kind == "A":
                self.acks[(int(parts[1]), int(parts[2]))] = int(parts[3])
            elif kind == "C":
                self.closing = True
            elif kind == "D":
                self.done = True
            elif kind == "H":
                self.reached.add((parts[1], parts[2]))
            elif kind == "E":
                self.counts[(parts[1], parts[2])] = int(parts[3])
            elif kind == "K":
                self.killed_at = (parts[1], parts[2])
            else:
                self.bad_lines.append(line)
        except (IndexError, ValueError):
            self.bad_lines.append(line)

    def effects(self, tid: int, seq: int) -> dict[str, Any]:
        """key -> the value commit (tid, seq) leaves there (None: a tombstone)."""
        return {
            key: make_value(tid, seq, self.generation, n) if op == "put" else None
            for op, key, n in self.intents[(tid, seq)]
        }

    def commits(self) -> tuple[list[Commit], list[str]]:
        """The ledger's view of this child, and report problems (acks without intents)."""
        problems = [f"unparsable report line {line!r}" for line in self.bad_lines]
        problems.extend(
            f"generation {self.generation}: ack of thread {tid} seq {seq} without an intent"
            for tid, seq in self.acks if (tid, seq) not in self.intents
        )
        commits = [
            Commit(f"g{self.generation}/t{tid}", seq, self.effects(tid, seq),
                   self.acks.get((tid, seq)))
            for tid, seq in sorted(self.intents)
        ]
        return commits, problems
