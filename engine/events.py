"""Events: what happened in a store, delivered to subscribers in the same process.

(Over 500 lines: the event types and their delivery, subscriptions, overflow and the
bus, are one contract that a subscriber reads at once.)

Orchestrators hang hooks on them (a step finished, a run failed, a pull
brought a conflict, a lease was lost). Events are not durable and are not
replayed after a crash: the store's state is the truth, and a subscriber that
must not miss anything re-reads it (after an overflow, or on start-up)::

    with store.events.subscribe(kinds=("step", "run")) as sub:   # iterator form
        for event in sub:
            ...

    sub = store.events.subscribe(on_event, prefix="orders/")     # callback form
    ...
    sub.close()

Order. The events of commits arrive in commit order: a CommitEvent, then the
events that commit carries (RunEvent, StepEvent, RunCheckpointEvent,
ConflictEvent), all with its LSN; LSNs never go down, and each subscriber sees
every commit applied after ``subscribe`` returned. CheckpointEvent (a store
checkpoint) and LeaseLostEvent concern records committed earlier: they arrive
when they happen and carry the LSN they concern.

Why a subscriber cannot hold up a commit. The commit path does no more than
one non-blocking put on an unbounded queue per group-commit batch (none when
nobody subscribed to commit events). A dispatcher thread turns batches into
events and offers them to each subscription's bounded queue without ever
waiting; each callback runs in its subscription's own thread. So a subscriber
that sleeps, blocks or raises adds at most one queue put, about a
microsecond, to a commit (tests/engine/test_events.py checks commits
complete while a subscriber is blocked outright). The one cost a subscriber
can impose is CPU: its thread shares the interpreter lock with committers, as
any Python thread does; a subscriber busy computing can delay a commit by up
to the interpreter's switch interval (5 ms by default), a sleeping or blocked
one costs nothing.

Overflow. A subscription queues at most ``max_queued`` events (10,000 by
default). When its queue is full, further events for it are dropped and
counted, never waited for; once its consumer has taken what was queued
before the gap, it receives one OverflowEvent (``dropped``, ``first_lsn``,
``last_lsn``) exactly where the gap is, then the events that came after it.
It should then re-read what it follows from the store.

A callback that raises is logged (with its traceback the first time, then
once every 100 failures) and keeps receiving; ``max_failures=n`` cancels the
subscription after ``n`` failures in a row instead.

Closing the store ends delivery: events already published are still
delivered, then iterators stop and callback threads end; close waits up to
CLOSE_WAIT_SECONDS for them and logs a warning about a subscriber still stuck
in its callback (its thread is a daemon: it never keeps the process alive).
``Subscription.close`` stops one subscription at once, discarding what it had
not delivered.

The replicator does not subscribe: it wakes through the store's commit
listener, a direct call after each commit, which no queue can lose.

Threads: subscribe, close and the counters from any thread; an iterator
subscription is consumed by one thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import cbor2

from .errors import StoreClosedError
from .options import Durability
from .record import CODEC_NONE, KIND_MERGE, decode_entry, decode_value
from .versions import Sibling, visible_siblings

__all__ = [
    "CLOSE_WAIT_SECONDS",
    "DEFAULT_MAX_QUEUED",
    "KINDS",
    "CheckpointEvent",
    "CommitEvent",
    "ConflictEvent",
    "Event",
    "EventBus",
    "LeaseLostEvent",
    "OverflowEvent",
    "RunCheckpointEvent",
    "RunEvent",
    "StepEvent",
    "Subscription",
]

log = logging.getLogger("walsync.events")

#: how long Store.close waits for subscribers to take the events already published
CLOSE_WAIT_SECONDS = 5.0
#: events a subscription holds before it drops (and later announces) the rest
DEFAULT_MAX_QUEUED = 10_000
_LOG_EVERY_FAILURES = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """The base of every event: ``lsn`` is the record it concerns."""

    kind: ClassVar[str] = ""
    lsn: int = 0

    def concerns(self, prefix: str) -> bool:
        """Whether the event is about a key under ``prefix`` (events about no key: yes)."""
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitEvent(Event):
    """A record was committed and applied: readers see it now.

    ``source`` is ``local`` (this process wrote it) or ``merge`` (pulled or
    restored from the server). ``durability`` is what the record had reached
    when the event was published: ``none`` or ``local``; a ``remote`` commit
    is announced once locally durable, before the server acknowledges it.
    """

    kind: ClassVar[str] = "commit"
    hlc: int
    keys: tuple[str, ...]
    source: Literal["local", "merge"]
    durability: Durability

    def concerns(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunEvent(Event):
    """A run's status changed (``old_status`` None: the run was created).

    ``key`` is the run record's key (the workflow layer spells it).
    """

    kind: ClassVar[str] = "run"
    key: str
    run_id: str
    old_status: str | None
    new_status: str

    def concerns(self, prefix: str) -> bool:
        return self.key.startswith(prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepEvent(Event):
    """A step's status changed (``old_status`` None: the step is new); ``key`` is the
    step record's key."""

    kind: ClassVar[str] = "step"
    key: str
    run_id: str
    step_id: str
    old_status: str | None
    new_status: str
    attempts: int

    def concerns(self, prefix: str) -> bool:
        return self.key.startswith(prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCheckpointEvent(Event):
    """A run's named checkpoint was ``created``, or the run ``rolled_back`` to it;
    ``key`` is the checkpoint's key."""

    kind: ClassVar[str] = "run_checkpoint"
    key: str
    run_id: str
    name: str
    action: Literal["created", "rolled_back"]

    def concerns(self, prefix: str) -> bool:
        return self.key.startswith(prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointEvent(Event):
    """The store checkpointed: the snapshot is synced through ``lsn``, and the WAL
    segments no longer needed were removed."""

    kind: ClassVar[str] = "checkpoint"
    segments_removed: int
    bytes_removed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConflictEvent(Event):
    """A merge (pull, restore) left ``key`` with ``siblings`` concurrent versions
    (as ``Store.get_versions`` counts them): resolve it with a write."""

    kind: ClassVar[str] = "conflict"
    key: str
    siblings: int

    def concerns(self, prefix: str) -> bool:
        return self.key.startswith(prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseLostEvent(Event):
    """The server refused this host's writes to a run another host now leases.

    ``token`` is the lease token those writes carried, ``current_token`` and
    ``holder`` the lease that won; ``lsn`` is the newest refused record. Stop
    driving the run here. ``key`` is the run record's key.
    """

    kind: ClassVar[str] = "lease_lost"
    key: str
    run_id: str
    token: int
    current_token: int
    holder: str | None

    def concerns(self, prefix: str) -> bool:
        return self.key.startswith(prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class OverflowEvent(Event):
    """This subscription's queue was full: ``dropped`` events concerning LSNs
    ``first_lsn``..``last_lsn`` were not delivered. Re-read the store."""

    kind: ClassVar[str] = "overflow"
    dropped: int
    first_lsn: int
    last_lsn: int


_EVENT_TYPES: tuple[type[Event], ...] = (
    CommitEvent, RunEvent, StepEvent, RunCheckpointEvent, CheckpointEvent, ConflictEvent,
    LeaseLostEvent, OverflowEvent,
)
#: every kind a subscription may ask for (an OverflowEvent is always delivered)
KINDS = frozenset(t.kind for t in _EVENT_TYPES)
#: kinds that come from commit records (the rest are emitted on their own)
#: the kinds that commits carry (a store checkpoint and a lease loss are not a commit's)
_RECORD_KINDS = frozenset({"commit", "run", "step", "run_checkpoint", "conflict"})


class _Record(Protocol):
    """What the store hands over for each committed record (its pending commit)."""

    @property
    def lsn(self) -> int: ...
    @property
    def hlc(self) -> int: ...
    @property
    def kind(self) -> int: ...
    @property
    def sync(self) -> bool: ...
    @property
    def ops(self) -> Sequence[Sequence[Any]]: ...
    @property
    def notes(self) -> tuple[Event, ...]: ...


_STOP = object()
_OPEN, _ENDING, _CLOSED = 0, 1, 2
_names = itertools.count(1)


class Subscription:
    """One subscriber's queue, filter and (for a callback) delivery thread.

    Iterate over it (or call ``get``) in the iterator form; iteration ends
    when the subscription or the store is closed. ``delivered``, ``dropped``
    and ``failures`` count what it took, lost to overflow, and what its
    callback raised on.
    """

    def __init__(
        self,
        bus: EventBus,
        callback: Callable[[Event], object] | None,
        kinds: frozenset[str] | None,
        prefix: str,
        max_queued: int,
        max_failures: int | None,
    ) -> None:
        self.kinds = kinds
        self.prefix = prefix
        self.name = f"walsync-events-{next(_names)}"
        self.delivered = 0
        self.dropped = 0
        self.failures = 0
        self._bus = bus
        self._callback = callback
        self._max_queued = max_queued
        self._max_failures = max_failures
        self._failing = 0
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[Event] = collections.deque()
        self._state = _OPEN
        #: dropped events not yet announced: [count, first LSN, last LSN]
        self._gap: list[int] | None = None
        self._thread: threading.Thread | None = None
        #: loops awaiting the next event (``__anext__``), woken by what wakes ``get``
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def closed(self) -> bool:
        """Cancelled, or ended by the store's close and drained."""
        with self._cond:
            return self._state == _CLOSED or (
                self._state == _ENDING and not self._queue and self._gap is None)

    def wants(self, event: Event) -> bool:
        if self.kinds is not None and event.kind not in self.kinds:
            return False
        return not self.prefix or event.concerns(self.prefix)

    # -- the consumer's side ---------------------------------------------------

    def get(self, timeout_seconds: float | None = None) -> Event | None:
        """The next event; None after ``timeout_seconds``, or once the
        subscription is closed (or the store closed and everything was taken)."""
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        with self._cond:
            while True:
                if self._state == _CLOSED:
                    return None
                if self._queue:
                    self.delivered += 1
                    return self._queue.popleft()
                if self._gap is not None:
                    self.delivered += 1
                    return self._take_gap()
                if self._state == _ENDING:
                    return None
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._cond.wait(left)

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        """The async iterator form (``async for event in sub``): the next event,
        awaited without a thread; ends as iteration does.

        The dispatcher wakes the waiting loop with ``call_soon_threadsafe``, so
        it still never waits for the consumer.
        """
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._state != _CLOSED:
                    if self._queue:
                        self.delivered += 1
                        return self._queue.popleft()
                    if self._gap is not None:
                        self.delivered += 1
                        return self._take_gap()
                if self._state != _OPEN:
                    raise StopAsyncIteration
                ready = asyncio.Event()
                self._wakers.append((loop, ready))
            await ready.wait()

    def _wake_loops(self) -> None:
        """Wake the loops awaiting this subscription. Holds ``_cond``."""
        wakers, self._wakers = self._wakers, []
        for loop, ready in wakers:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(ready.set)

    def close(self) -> None:
        """Stop now: what was not delivered yet is discarded. Idempotent."""
        with self._cond:
            if self._state == _CLOSED:
                return
            self._state = _CLOSED
            self._queue.clear()
            self._gap = None
            self._cond.notify_all()
            self._wake_loops()
        self._bus._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the dispatcher's side -------------------------------------------------

    def _offer(self, events: Sequence[Event]) -> None:
        """Queue the wanted events; never waits for the consumer."""
        wanted = [e for e in events if self.wants(e)]
        if not wanted:
            return
        with self._cond:
            if self._state != _OPEN:
                return
            for event in wanted:
                if len(self._queue) >= self._max_queued:
                    self.dropped += 1
                    if self._gap is None:
                        self._gap = [1, event.lsn, event.lsn]
                    else:
                        gap = self._gap
                        gap[0] += 1
                        gap[1] = min(gap[1], event.lsn)
                        gap[2] = max(gap[2], event.lsn)
                    continue
                if self._gap is not None:
                    self._queue.append(self._take_gap())
                self._queue.append(event)
            self._cond.notify()
            if self._wakers:
                self._wake_loops()

    def _take_gap(self) -> OverflowEvent:
        assert self._gap is not None
        dropped, first, last = self._gap
        self._gap = None
        return OverflowEvent(lsn=last, dropped=dropped, first_lsn=first, last_lsn=last)

    def _end(self) -> None:
        """The store is closing: deliver what is queued, then stop."""
        with self._cond:
            if self._state == _OPEN:
                self._state = _ENDING
            self._cond.notify_all()
            self._wake_loops()

    # -- the callback's thread ---------------------------------------------------

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._deliver, name=self.name, daemon=True)
        self._thread.start()

    def _join(self, timeout_seconds: float) -> bool:
        """Wait for the delivery thread to end; whether it did."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout_seconds)
        return not thread.is_alive()

    def _deliver(self) -> None:
        callback = self._callback
        assert callback is not None
        while True:
            event = self.get()
            if event is None:
                return
            try:
                callback(event)
            except Exception:
                self.failures += 1
                self._failing += 1
                if self.failures == 1 or self.failures % _LOG_EVERY_FAILURES == 0:
                    log.exception("event subscriber %s (%r) failed on %r (%d failures so far)",
                                  self.name, callback, event, self.failures)
                if self._max_failures is not None and self._failing >= self._max_failures:
                    log.error("event subscriber %s (%r) cancelled after %d failures in a row",
                              self.name, callback, self._failing)
                    self.close()
                    return
            else:
                self._failing = 0


class EventBus:
    """A store's events (``store.events``): subscribe here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: tuple[Subscription, ...] = ()
        #: whether some subscriber wants events of commit records (checked per batch)
        self._wants_records = False
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        self._closed = False

    def subscribe(
        self,
        callback: Callable[[Event], object] | None = None,
        *,
        kinds: Iterable[str | type[Event]] | str | None = None,
        prefix: str = "",
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_failures: int | None = None,
    ) -> Subscription:
        """Receive events from now on: ``callback(event)`` in a thread of its own,
        or, without a callback, by iterating over the returned Subscription.

        ``kinds`` (names from KINDS or event classes) and ``prefix`` filter
        what is queued. The prefix is matched against the key an event
        concerns: any of a commit's keys, a conflict's key, the run record's key
        for run and lease-lost events, the step's or the checkpoint's key for
        step and run-checkpoint events (``walsync.engine.workflow.keys`` spells
        them: ``keys.run(run_id)`` is a prefix of them all); store checkpoints
        concern no key and always pass. See the module docstring for order, overflow and failures.
        """
        wanted = _kinds(kinds)
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        if max_failures is not None and max_failures < 1:
            raise ValueError(f"max_failures must be at least 1 or None, got {max_failures}")
        sub = Subscription(self, callback, wanted, prefix, max_queued, max_failures)
        with self._lock:
            if self._closed:
                raise StoreClosedError("the store is closed: it publishes no more events")
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._dispatch, name="walsync-events-dispatch", daemon=True)
                self._dispatcher.start()
            self._subs = (*self._subs, sub)
            self._wants_records = _wants_records(self._subs)
            if callback is not None:
                sub._start()
        return sub

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return self._subs

    def publish(self, records: Sequence[_Record]) -> None:
        """The commit path: hand over a batch of applied records, in LSN order.

        One put on an unbounded queue, never blocking; nothing at all when no
        subscriber wants commit events. The caller serialises calls (the
        store's apply stage), which is what keeps events in commit order.
        """
        if self._wants_records:
            self._inbox.put(records)

    def emit(self, event: Event) -> None:
        """Publish an event that is not part of a commit (checkpoints, lease loss)."""
        if self._subs:
            self._inbox.put(event)

    def close(self, timeout_seconds: float = CLOSE_WAIT_SECONDS) -> None:
        """Deliver what was published, then end every subscription (Store.close)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            dispatcher = self._dispatcher
        deadline = time.monotonic() + timeout_seconds
        if dispatcher is not None:
            self._inbox.put(_STOP)
            dispatcher.join(timeout_seconds)
        subs = self._subs
        for sub in subs:
            sub._end()
        stuck = [s.name for s in subs if not s._join(max(0.0, deadline - time.monotonic()))]
        if stuck:
            log.warning("event subscribers %s still busy %.1f s after the store closed; left "
                        "behind", ", ".join(stuck), timeout_seconds)
        with self._lock:
            self._subs = ()
            self._wants_records = False

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)
            self._wants_records = _wants_records(self._subs)

    def _dispatch(self) -> None:
        """The dispatcher thread: expand each published item, offer it to every subscription."""
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            subs = self._subs
            if not subs:
                continue
            try:
                if isinstance(item, Event):
                    events: list[Event] = [item]
                else:
                    assert isinstance(item, list | tuple)
                    events = _events_of(item, _union_kinds(subs))
                for sub in subs:
                    sub._offer(events)
            except Exception:
                # the dispatcher must outlive any surprise, or every subscriber stops
                log.exception("event dispatch failed; the events of this batch are lost")


def _kinds(kinds: Iterable[str | type[Event]] | str | None) -> frozenset[str] | None:
    if kinds is None:
        return None
    items = [kinds] if isinstance(kinds, str) else list(kinds)
    out = set()
    for k in items:
        name = k if isinstance(k, str) else getattr(k, "kind", None)
        if name not in KINDS:
            raise ValueError(f"unknown event kind {k!r}; kinds are {', '.join(sorted(KINDS))}")
        out.add(name)
    return frozenset(out)


def _wants_records(subs: Sequence[Subscription]) -> bool:
    return any(s.kinds is None or s.kinds & _RECORD_KINDS for s in subs)


def _union_kinds(subs: Sequence[Subscription]) -> frozenset[str]:
    out: set[str] = set()
    for s in subs:
        if s.kinds is None:
            return KINDS
        out |= s.kinds
    return frozenset(out)


def _events_of(records: Sequence[_Record], wanted: frozenset[str]) -> list[Event]:
    """A batch's events, in LSN order: each record's CommitEvent, then what it carries."""
    out: list[Event] = []
    commits = "commit" in wanted
    conflicts = "conflict" in wanted
    for rec in records:
        merged = rec.kind == KIND_MERGE
        if commits:
            out.append(CommitEvent(
                lsn=rec.lsn, hlc=rec.hlc,
                keys=tuple(dict.fromkeys(op[0] for op in rec.ops if op[0])),
                source="merge" if merged else "local",
                durability=Durability.LOCAL if rec.sync else Durability.NONE,
            ))
        for note in rec.notes:
            if note.kind in wanted:
                out.append(dataclasses.replace(note, lsn=rec.lsn))
        if merged and conflicts:
            for key, entry in rec.ops:
                if key:
                    count = _visible_siblings(entry)
                    if count > 1:
                        out.append(ConflictEvent(lsn=rec.lsn, key=key, siblings=count))
    return out


def _visible_siblings(entry: bytes) -> int:
    """How many siblings a reader of this stored entry sees (identical values collapsed)."""
    stored = decode_entry(entry)
    if len(stored) < 2:
        return len(stored)
    return len(visible_siblings(stored, decode=_identity))


def _identity(sib: Sibling) -> tuple[bool, bytes | None]:
    """A sibling's value as compared for collapsing: its bytes before compression."""
    if sib.data is None or sib.codec == CODEC_NONE:
        return sib.data is None, sib.data
    return False, cbor2.dumps(decode_value(sib.codec, sib.data))
