"""Crash-test kit: a child-process workload, an acknowledgement ledger and a checker.

Reusable by any suite that SIGKILLs a writer and then checks what survived
(engine crash torture now; workflow and sync suites later).

The child (``python -m tests.engine._crashkit '<json ChildConfig>'``) opens a
store and commits from several threads. Thread ``tid`` only touches its own
keys (``t<tid>/s<j>`` for single writes, ``t<tid>/b<j>`` for batches), one
commit at a time, so the parent can tell exactly which commits may be in the
store. Before each commit it reports an *intent*, after the commit returns an
*acknowledgement*; every line is one ``os.write`` to stdout (a pipe) under a
lock, so lines never interleave and a line written before a SIGKILL still
reaches the parent::

    O                                        about to open the store (imports done)
    R <pid> <next_lsn> <replayed>            store open, workload starts
    I <tid> <seq> <json [[op, key, n], ...]>  about to commit (op "put"/"del";
                                              n: padding length of the value)
    A <tid> <seq> <lsn>                       that commit returned with this LSN
    D                                         workload ended, store closed

Values are ``{"t": tid, "s": seq, "g": generation, "p": "x" * n}``, unique per
key, so a value read back names the commit that wrote it; tombstones are told
apart by their version's LSN.

The parent keeps a :class:`Ledger` (the resolved state of every key after the
previous check) and, per child, an :class:`Incarnation` (its intents and
acknowledgements). :func:`check_store` compares a reopened store with them:

* every acknowledged commit is present with its value, unless a later commit
  of the same key (acknowledged, or in flight at the kill) replaced it;
* a commit in flight at the kill (at most one per thread) is either wholly
  present, with one LSN on all its keys, or wholly absent;
* no key holds anything no commit wrote; LSNs only grow.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

SINGLE_KEYS = 4
BATCH_KEYS = 3
#: padding of an occasional large value: its CBOR encoding exceeds the default
#: compress_above_bytes, so it is stored zstd-compressed
BIG_PADDING = 6000


def single_key(tid: int, j: int) -> str:
    return f"t{tid:02d}/s{j}"


def batch_key(tid: int, j: int) -> str:
    return f"t{tid:02d}/b{j}"


def make_value(tid: int, seq: int, generation: int, padding: int) -> dict[str, Any]:
    return {"t": tid, "s": seq, "g": generation, "p": "x" * padding}


#: one operation of a commit as the child reports it: [op, key, padding or None]
WireOp = list[Any]


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


# -- the child -----------------------------------------------------------------


@dataclass
class ChildConfig:
    path: str
    seed: int
    #: distinguishes this child's values from earlier children's on the same store
    generation: int
    threads: int = 4
    segment_bytes: int = 4096
    checkpoint_every_bytes: int = 16384
    #: switch this failpoint on (action "kill") once ``arm_after_acks`` commits returned
    arm_failpoint: str | None = None
    arm_after_acks: int = 0
    #: the workload closes the store and exits 0 after this long (a safety net)
    max_seconds: float = 20.0
    #: the share of commits made with durability 'none' (a process crash keeps
    #: them too: they were written before the call returned)
    none_fraction: float = 0.0
    #: open the store (replaying its WAL), report, and exit without a workload
    open_only: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChildConfig:
        return cls(**json.loads(text))


class _Emitter:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        data = (line + "\n").encode()
        if len(data) > 4000:  # a pipe write above PIPE_BUF could be split
            raise AssertionError(f"report line too long ({len(data)} bytes)")
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]


def child_main(config: ChildConfig) -> int:
    from engine import Delete, Put, Store, _failpoints

    emit = _Emitter(1)
    emit("O")
    store = Store.open(
        config.path,
        segment_bytes=config.segment_bytes,
        checkpoint_every_bytes=config.checkpoint_every_bytes,
        durability="local",
    )
    assert store.recovery is not None
    emit(f"R {os.getpid()} {store.next_lsn} {store.recovery.replayed_records}")
    if config.open_only:
        os._exit(0)  # no close: a later child or the parent carries on from here
    deadline = time.monotonic() + config.max_seconds
    acks = [0]
    acks_lock = threading.Lock()
    failed: list[str] = []

    def worker(tid: int) -> None:
        rng = random.Random(f"{config.seed}/{config.generation}/{tid}")
        seq = 0
        try:
            while time.monotonic() < deadline and not failed:
                wire = make_ops(rng, tid)
                ops: list[Put | Delete] = [
                    Put(key, make_value(tid, seq, config.generation, n))
                    if op == "put"
                    else Delete(key)
                    for op, key, n in wire
                ]
                durability = "none" if rng.random() < config.none_fraction else "local"
                emit(f"I {tid} {seq} {json.dumps(wire, separators=(',', ':'))}")
                result = store.commit(ops, durability=durability)
                emit(f"A {tid} {seq} {result.lsn}")
                seq += 1
                with acks_lock:
                    acks[0] += 1
                    n_acks = acks[0]
                if config.arm_failpoint and n_acks == config.arm_after_acks:
                    _failpoints.enable(config.arm_failpoint, "kill")
                if tid == 0 and rng.random() < 0.02:
                    store.checkpoint()
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            failed.append(traceback.format_exc())

    if config.arm_failpoint and config.arm_after_acks == 0:
        _failpoints.enable(config.arm_failpoint, "kill")
    threads = [
        threading.Thread(target=worker, args=(tid,), name=f"crashkit-{tid}")
        for tid in range(config.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        sys.stderr.write("".join(failed))
        sys.stderr.flush()
        os._exit(3)
    store.close()
    emit("D")
    return 0


# -- the parent's view of one child ----------------------------------------------


@dataclass
class Intent:
    tid: int
    seq: int
    generation: int
    wire: list[WireOp]

    def effects(self) -> dict[str, Any]:
        """key -> the value this commit leaves there (None: a tombstone)."""
        return {
            key: (make_value(self.tid, self.seq, self.generation, n) if op == "put" else None)
            for op, key, n in self.wire
        }


@dataclass
class Incarnation:
    """What one child reported: its intents and acknowledgements."""

    generation: int
    opening: bool = False
    ready: bool = False
    pid: int | None = None
    done: bool = False
    intents: dict[tuple[int, int], Intent] = field(default_factory=dict)
    acks: dict[tuple[int, int], int] = field(default_factory=dict)
    bad_lines: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        parts = line.split(" ", 3)
        try:
            if parts[0] == "O":
                self.opening = True
            elif parts[0] == "R":
                self.ready = True
                self.pid = int(parts[1])
            elif parts[0] == "I":
                tid, seq = int(parts[1]), int(parts[2])
                self.intents[(tid, seq)] = Intent(tid, seq, self.generation, json.loads(parts[3]))
            elif parts[0] == "A":
                self.acks[(int(parts[1]), int(parts[2]))] = int(parts[3])
            elif parts[0] == "D":
                self.done = True
            else:
                self.bad_lines.append(line)
        except (IndexError, ValueError):
            self.bad_lines.append(line)


class ChildRun:
    """One child process running the workload, with its reports collected live."""

    def __init__(
        self, config: ChildConfig, *, env_failpoints: str | None = None, stderr_path: Path
    ) -> None:
        self.config = config
        self.incarnation = Incarnation(config.generation)
        self._cond = threading.Condition()
        env = dict(os.environ)
        env.pop("WALSYNC_FAILPOINTS", None)
        if env_failpoints:
            env["WALSYNC_FAILPOINTS"] = env_failpoints
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.engine._crashkit", config.to_json()],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._reader = threading.Thread(target=self._read, name="crashkit-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            with self._cond:
                for raw in lines:
                    self.incarnation.feed(raw.decode())
                self._cond.notify_all()
        # a partial last line cannot be an acknowledgement (those are short and
        # written whole); an intent cut short was never committed
        with self._cond:
            self._cond.notify_all()

    def wait_opening(self, timeout: float) -> bool:
        """Until the child is about to open the store (or it exits)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.incarnation.opening:
                if self.proc.poll() is not None and not self._reader.is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def wait_for(self, acks: int, timeout: float) -> bool:
        """Until the child is ready and reported ``acks`` acknowledgements, or it exits."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                inc = self.incarnation
                if inc.ready and len(inc.acks) >= acks:
                    return True
                if self.proc.poll() is not None and not self._reader.is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the child to end (killing it after ``timeout``) and for its last lines."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._stderr.close()
        return code

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


# -- the ledger and the checker ----------------------------------------------------


@dataclass(frozen=True)
class KeyState:
    """A key as read back: the LSN of the commit that wrote it and its value."""

    lsn: int
    value: Any  # None for a tombstone
    deleted: bool


def read_key(store: Any, key: str) -> KeyState | str | None:
    """The key's one sibling; None if it was never written; a problem string otherwise."""
    versions = store.get_versions(key)
    if not versions:
        return None
    if len(versions) != 1:
        return f"key {key!r} has {len(versions)} siblings after local writes only"
    v = versions[0]
    return KeyState(v.version.lsn, v.value, v.version.deleted)


@dataclass
class Ledger:
    """The resolved state of every key written so far (after the last check)."""

    known: dict[str, KeyState] = field(default_factory=dict)
    max_lsn: int = 0
    generations: int = 0
    acknowledged: int = 0

    def new_generation(self) -> int:
        self.generations += 1
        return self.generations


def _effect_matches(state: KeyState | None, value: Any) -> bool:
    if state is None:
        return False
    if value is None:
        return state.deleted
    return not state.deleted and state.value == value


def check_store(store: Any, ledger: Ledger, inc: Incarnation) -> list[str]:
    """Compare a reopened store with the ledger and what one child reported.

    Call it after every child (the ledger resolves that child's in-flight
    commits). Returns the problems found; with none, the ledger is advanced
    to the store's state.
    """
    problems: list[str] = []
    expected: dict[str, KeyState] = dict(ledger.known)
    # the in-flight intents, each with its thread's last acknowledged LSN
    in_flight: list[tuple[Intent, int]] = []
    all_acked: dict[int, tuple[int, int, int]] = {}
    max_acked = ledger.max_lsn
    problems.extend(f"unparsable report line {line!r}" for line in inc.bad_lines)
    by_tid: dict[int, list[int]] = {}
    for tid, seq in inc.intents:
        by_tid.setdefault(tid, []).append(seq)
    for tid, seq in inc.acks:
        if (tid, seq) not in inc.intents:
            problems.append(f"generation {inc.generation}: ack of thread {tid} seq {seq} "
                            "without an intent")
    for tid, seqs in sorted(by_tid.items()):
        seqs.sort()
        acked = [s for s in seqs if (tid, s) in inc.acks]
        if acked != list(range(len(acked))):
            problems.append(f"generation {inc.generation} thread {tid}: acknowledged "
                            f"sequence numbers are not 0..n-1: {acked}")
        pending = [s for s in seqs if (tid, s) not in inc.acks]
        if len(pending) > 1 or (pending and pending[0] != len(acked)):
            problems.append(f"generation {inc.generation} thread {tid}: more than one "
                            f"commit in flight: {pending}")
        last_lsn = ledger.max_lsn
        for s in acked:
            lsn = inc.acks[(tid, s)]
            if lsn <= last_lsn:
                problems.append(f"generation {inc.generation} thread {tid}: LSN {lsn} of "
                                f"seq {s} is not above the previous {last_lsn}")
            if lsn in all_acked:
                problems.append(f"LSN {lsn} acknowledged twice: {all_acked[lsn]} and "
                                f"{(inc.generation, tid, s)}")
            all_acked[lsn] = (inc.generation, tid, s)
            last_lsn = lsn
            max_acked = max(max_acked, lsn)
            for key, value in inc.intents[(tid, s)].effects().items():
                expected[key] = KeyState(lsn, value, value is None)
        if pending:
            in_flight.append((inc.intents[(tid, pending[0])], last_lsn))
    if problems:
        return problems

    flight_keys = {key for intent, _ in in_flight for key in intent.effects()}
    actual: dict[str, KeyState | None] = {}
    for key in sorted(set(expected) | flight_keys):
        got = read_key(store, key)
        if isinstance(got, str):
            problems.append(got)
            continue
        actual[key] = got

    for key, want in sorted(expected.items()):
        if key in flight_keys or key not in actual:
            continue
        got = actual[key]
        if got != want:
            problems.append(
                f"key {key!r}: expected the acknowledged write at LSN {want.lsn} "
                f"({_describe(want)}), found {_describe(got)}"
            )
    resolved: dict[str, KeyState] = {
        k: v for k, v in actual.items() if v is not None and k not in flight_keys
    }
    for intent, thread_last_lsn in in_flight:
        effects = intent.effects()
        applied: dict[str, KeyState] = {}
        absent: list[str] = []
        for key, value in effects.items():
            got = actual.get(key)
            before = expected.get(key)
            if got == before:
                absent.append(key)
            elif _effect_matches(got, value) and got is not None and got.lsn > thread_last_lsn:
                applied[key] = got
            else:
                problems.append(
                    f"key {key!r} of the in-flight commit (thread {intent.tid} seq {intent.seq}"
                    f" generation {intent.generation}) holds {_describe(got)}, neither the last "
                    f"acknowledged state ({_describe(before)}) nor the commit's own value"
                )
        if applied and absent:
            problems.append(
                f"half-applied commit (thread {intent.tid} seq {intent.seq} generation "
                f"{intent.generation}): present on {sorted(applied)}, absent on {sorted(absent)}"
            )
        lsns = {s.lsn for s in applied.values()}
        if len(lsns) > 1:
            problems.append(
                f"the in-flight commit of thread {intent.tid} seq {intent.seq} shows several "
                f"LSNs: {sorted(lsns)}"
            )
        if lsns and (lsn := next(iter(lsns))) in all_acked:
            problems.append(f"in-flight commit found at LSN {lsn}, which was acknowledged "
                            f"for {all_acked[lsn]}")
        for key in effects:
            state = actual.get(key)
            if state is not None:
                resolved[key] = state

    live = set(store.keys())
    stray = live - set(expected) - flight_keys
    if stray:
        problems.append(f"keys no commit wrote: {sorted(stray)[:10]}")
    if store.next_lsn <= max_acked:
        problems.append(f"next LSN {store.next_lsn} is not above the acknowledged LSN "
                        f"{max_acked}")
    if not problems:
        ledger.known = resolved
        ledger.max_lsn = max([max_acked, *(s.lsn for s in resolved.values())])
        ledger.acknowledged += len(inc.acks)
    return problems


def _describe(state: KeyState | None) -> str:
    if state is None:
        return "nothing"
    if state.deleted:
        return f"a tombstone of LSN {state.lsn}"
    v = state.value
    if isinstance(v, dict) and {"t", "s", "g", "p"} <= set(v):
        return (f"LSN {state.lsn} value of thread {v['t']} seq {v['s']} generation {v['g']} "
                f"({len(v['p'])} bytes of padding)")
    return f"LSN {state.lsn} value {v!r:.80}"


def replay_command(seed: int, test_file: str, test_name: str) -> str:
    """The one-line command that replays a seeded run (for failure messages)."""
    return (
        f"seed {seed}; replay: WALSYNC_CRASH_SEED={seed} .venv/bin/python -m pytest "
        f"{test_file} -k {test_name}"
    )


def crash_seed() -> int:
    """WALSYNC_CRASH_SEED if set, else a fresh random seed (printed on failure)."""
    text = os.environ.get("WALSYNC_CRASH_SEED", "").strip()
    if text:
        return int(text)
    return random.SystemRandom().randrange(1, 2**31)


if __name__ == "__main__":
    sys.exit(child_main(ChildConfig.from_json(sys.argv[1])))
