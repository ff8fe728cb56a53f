"""The acknowledgement ledger and its checker, for any side that holds keyed commits.

A writer reports each commit twice: an *intent* (what it is about to write)
before the call, an *acknowledgement* (with the commit's LSN) after the call
returned. After a crash the parent builds the :class:`Commit` list of that
writer's life (acknowledged ones carry their LSN; the rest were in flight)
and calls :meth:`Ledger.check` with what the checked side now holds
(:class:`Observed`). The rules:

* every acknowledged commit is there with its value, unless a later commit
  of the same key (acknowledged, or in flight at the crash) replaced it;
* a commit in flight is wholly there, with one LSN on all its keys, or
  wholly absent: never half-applied;
* no key holds anything no commit wrote; LSNs only grow, none is
  acknowledged twice.

With no problem found, the ledger advances to the observed state, which is
then the "before" of the next crash. Writers are sequential (a writer has at
most one commit in flight, numbered after its acknowledged ones) and two
writers' in-flight commits touch different keys; values are unique per
commit, so a value read back names the commit that wrote it.

Checking a store (``tests/crash/store_lane.py``): ``Observed.read`` returns
the key's single version (LSN, value, tombstone), ``keys`` the live keys,
``next_lsn`` the store's.

Checking a sync server: build one :class:`Commit` per local commit the test
made, with ``lsn`` set once the server acknowledged it (a commit with
durability ``remote`` that returned, or one at or below the replicator's
acknowledged LSN), ``None`` otherwise; make ``Observed.read`` return
``KeyState(row.lsn, row.value, row.deleted)`` from the server's row of that
key for the writing node (``None`` for no row), ``keys`` the set of keys
with a row, and leave ``next_lsn`` None (the server has no such counter).
"At least once delivered, exactly once applied" is then: acknowledged
commits present, in-flight ones whole or absent, nothing else, and a
duplicate delivery never shows as a second LSN or a stray key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KeyState:
    """A key as read back: the LSN of the commit that wrote it and its value."""

    lsn: int
    value: Any  # None for a tombstone
    deleted: bool


@dataclass
class Commit:
    """One commit of one writer: key -> value it leaves (None: delete), LSN once acked."""

    writer: str
    seq: int
    effects: dict[str, Any]
    lsn: int | None = None

    @property
    def acknowledged(self) -> bool:
        return self.lsn is not None

    def name(self) -> str:
        return f"commit {self.seq} of writer {self.writer}"


@dataclass
class Observed:
    """What the checked side holds now."""

    #: a key's state; None if it was never written; a string names a problem
    read: Callable[[str], KeyState | str | None]
    #: every key it holds (tombstones included or not: both are accepted)
    keys: set[str]
    #: the next LSN it will assign, when it has one
    next_lsn: int | None = None


def describe(state: KeyState | None) -> str:
    if state is None:
        return "nothing"
    if state.deleted:
        return f"a tombstone of LSN {state.lsn}"
    v = state.value
    if isinstance(v, dict) and {"t", "s", "g", "p"} <= set(v):
        return (f"LSN {state.lsn} value of thread {v['t']} seq {v['s']} generation {v['g']} "
                f"({len(v['p'])} bytes of padding)")
    return f"LSN {state.lsn} value {v!r:.80}"


def _matches(state: KeyState | None, value: Any) -> bool:
    if state is None:
        return False
    if value is None:
        return state.deleted
    return not state.deleted and state.value == value


@dataclass
class Ledger:
    """The resolved state of every key written so far (after the last check)."""

    known: dict[str, KeyState] = field(default_factory=dict)
    max_lsn: int = 0
    acknowledged: int = 0

    def check(self, commits: Iterable[Commit], observed: Observed) -> list[str]:
        """The problems found (empty: the ledger now holds the observed state)."""
        problems: list[str] = []
        expected = dict(self.known)
        by_writer: dict[str, list[Commit]] = {}
        for c in commits:
            by_writer.setdefault(c.writer, []).append(c)
        in_flight: list[tuple[Commit, int]] = []
        acked_lsns: dict[int, str] = {}
        max_acked = self.max_lsn
        n_acked = 0
        for writer, cs in sorted(by_writer.items()):
            cs.sort(key=lambda c: c.seq)
            seqs = [c.seq for c in cs]
            if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                problems.append(f"writer {writer}: sequence numbers are not contiguous: {seqs}")
            acked = [c for c in cs if c.acknowledged]
            pending = cs[len(acked):]
            if any(c.acknowledged for c in pending) or len(pending) > 1:
                problems.append(f"writer {writer}: more than one commit in flight, or an "
                                f"acknowledgement after one: {[c.seq for c in pending]}")
            last = self.max_lsn
            for c in acked:
                assert c.lsn is not None
                if c.lsn <= last:
                    problems.append(f"{c.name()}: LSN {c.lsn} is not above the previous {last}")
                if c.lsn in acked_lsns:
                    problems.append(f"LSN {c.lsn} acknowledged twice: {acked_lsns[c.lsn]} and "
                                    f"{c.name()}")
                acked_lsns[c.lsn] = c.name()
                last = c.lsn
                max_acked = max(max_acked, c.lsn)
                n_acked += 1
                for key, value in c.effects.items():
                    expected[key] = KeyState(c.lsn, value, value is None)
            if pending:
                in_flight.append((pending[0], last))
        if problems:
            return problems

        flight_keys = {key for c, _ in in_flight for key in c.effects}
        actual: dict[str, KeyState | None] = {}
        for key in sorted(set(expected) | flight_keys):
            got = observed.read(key)
            if isinstance(got, str):
                problems.append(got)
                continue
            actual[key] = got

        for key, want in sorted(expected.items()):
            if key in flight_keys or key not in actual:
                continue
            got = actual[key]
            if got != want:
                problems.append(f"key {key!r}: expected the acknowledged write at LSN "
                                f"{want.lsn} ({describe(want)}), found {describe(got)}")
        resolved = {k: v for k, v in actual.items() if v is not None and k not in flight_keys}
        for c, writer_last in in_flight:
            applied: dict[str, KeyState] = {}
            absent: list[str] = []
            for key, value in c.effects.items():
                got = actual.get(key)
                before = expected.get(key)
                if got == before:
                    absent.append(key)
                elif _matches(got, value) and got is not None and got.lsn > writer_last:
                    applied[key] = got
                else:
                    problems.append(f"key {key!r} of the in-flight {c.name()} holds "
                                    f"{describe(got)}, neither the last acknowledged state "
                                    f"({describe(before)}) nor the commit's own value")
            if applied and absent:
                problems.append(f"half-applied {c.name()}: present on {sorted(applied)}, "
                                f"absent on {sorted(absent)}")
            lsns = {s.lsn for s in applied.values()}
            if len(lsns) > 1:
                problems.append(f"the in-flight {c.name()} shows several LSNs: {sorted(lsns)}")
            if lsns and (lsn := next(iter(lsns))) in acked_lsns:
                problems.append(f"the in-flight {c.name()} was found at LSN {lsn}, which was "
                                f"acknowledged for {acked_lsns[lsn]}")
            for key in c.effects:
                state = actual.get(key)
                if state is not None:
                    resolved[key] = state

        stray = observed.keys - set(expected) - flight_keys
        if stray:
            problems.append(f"keys no commit wrote: {sorted(stray)[:10]}")
        if observed.next_lsn is not None and observed.next_lsn <= max_acked:
            problems.append(f"next LSN {observed.next_lsn} is not above the acknowledged LSN "
                            f"{max_acked}")
        if not problems:
            self.known = resolved
            self.max_lsn = max([max_acked, *(s.lsn for s in resolved.values())])
            self.acknowledged += n_acked
        return problems
