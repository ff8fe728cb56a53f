"""The events API (engine/events.py): what commits publish, in what order, and that
no subscriber (blocked, sleeping, raising, overflowing) holds up a commit."""

from __future__ import annotations

import itertools
import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from walsync.engine import (
    CheckpointEvent,
    CommitEvent,
    ConflictError,
    ConflictEvent,
    Durability,
    Event,
    OverflowEvent,
    Put,
    Store,
    StoreClosedError,
    Subscription,
)
from walsync.engine.record import CODEC_NONE
from walsync.engine.versions import Sibling, Version

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    try:
        yield s
    finally:
        s.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def take(sub: Subscription, n: int, timeout: float = 10.0) -> list[Event]:
    """The next ``n`` events of an iterator subscription (fails if they do not come)."""
    out: list[Event] = []
    for _ in range(n):
        event = sub.get(timeout_seconds=timeout)
        assert event is not None, f"only {len(out)} of {n} events arrived: {out}"
        out.append(event)
    return out


def lsns(events: list[Event]) -> list[int]:
    return [e.lsn for e in events]


def remote_sibling(node: str, lsn: int, value: Any) -> Sibling:
    """A version another node wrote without having seen ours: concurrent with it."""
    return Sibling(Version(node, lsn, (1_700_000_000_000 + lsn) << 16, {node: lsn}, 0, False),
                   CODEC_NONE, cbor2.dumps(value))


# -- what a commit publishes -------------------------------------------------------------


def test_events_commit_names_lsn_keys_source_and_durability(store: Store) -> None:
    with store.events.subscribe() as sub:
        a = store.put("a/1", 1)
        b = store.put("b/1", 2, durability="none")
        c = store.commit([Put("b/2", 3), Put("a/2", 4), Put("b/2", 5)])
        m = store.apply_remote([("r/1", remote_sibling("other", 7, 1))])
        assert m is not None
        got = take(sub, 4)
    assert got == [
        CommitEvent(lsn=a.lsn, hlc=a.hlc, keys=("a/1",), source="local",
                    durability=Durability.LOCAL),
        CommitEvent(lsn=b.lsn, hlc=b.hlc, keys=("b/1",), source="local",
                    durability=Durability.NONE),
        CommitEvent(lsn=c.lsn, hlc=c.hlc, keys=("b/2", "a/2"), source="local",
                    durability=Durability.LOCAL),
        CommitEvent(lsn=m.lsn, hlc=m.hlc, keys=("r/1",), source="merge",
                    durability=Durability.LOCAL),
    ]


def test_events_nothing_published_for_a_failed_commit(store: Store) -> None:
    store.put("k", 1)
    with store.events.subscribe() as sub:
        with pytest.raises(ConflictError):
            store.put("k", 2, expect=None)
        ok = store.put("k", 3)
        assert lsns(take(sub, 1)) == [ok.lsn]
        assert sub.get(timeout_seconds=0.05) is None


def test_events_store_checkpoint_reports_its_lsn_and_removals(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", segment_bytes=4096, durability="none") as store:
        for i in range(40):
            store.put(f"k{i}", "x" * 300)
        with store.events.subscribe(kinds=[CheckpointEvent]) as sub:
            result = store.checkpoint()
            (event,) = take(sub, 1)
    assert result.segments_removed > 0
    assert event == CheckpointEvent(lsn=result.lsn, segments_removed=result.segments_removed,
                                    bytes_removed=result.bytes_removed)


def test_events_merge_with_concurrent_versions_reports_conflict(store: Store) -> None:
    store.put("k", "ours")
    store.put("same", "agreed")
    with store.events.subscribe(kinds=("conflict", "commit")) as sub:
        merged = store.apply_remote([
            ("k", remote_sibling("other", 1, "theirs")),
            ("calm", remote_sibling("other", 2, "only theirs")),
        ])
        assert merged is not None
        got = take(sub, 2)
    assert isinstance(got[0], CommitEvent)
    assert got[0].source == "merge"
    assert got[1] == ConflictEvent(lsn=merged.lsn, key="k", siblings=2)
    assert len(store.get_versions("k")) == 2
    # a concurrent version with the same value collapses for readers: no conflict,
    # also when one side holds it compressed (a large value) and the other not
    big = "long " * 2000
    store.put("big", big)
    with store.events.subscribe(kinds="conflict") as sub:
        store.apply_remote([("same", remote_sibling("third", 3, "agreed")),
                            ("big", remote_sibling("third", 4, big))])
        assert sub.get(timeout_seconds=0.1) is None
    assert len(store.get_versions("same")) == 1
    assert len(store.get_versions("big")) == 1
    assert len(store.iter_siblings("big").__next__()[1]) == 2  # two stored, one seen


def test_events_filters_by_kind_and_prefix(store: Store) -> None:
    with store.events.subscribe(kinds=("commit",), prefix="a/") as only_a, \
            store.events.subscribe(kinds=("checkpoint",)) as checkpoints:
        store.put("b/1", 1)
        one = store.put("a/1", 1)
        both = store.commit([Put("b/2", 1), Put("a/2", 1)])
        store.checkpoint()
        got = take(only_a, 2)
        (cp,) = take(checkpoints, 1)
        assert only_a.get(timeout_seconds=0.05) is None
        assert checkpoints.get(timeout_seconds=0.05) is None
    assert lsns(got) == [one.lsn, both.lsn]
    assert isinstance(cp, CheckpointEvent)
    assert cp.lsn == both.lsn
    with pytest.raises(ValueError, match="unknown event kind"):
        store.events.subscribe(kinds=("comit",))


# -- order ------------------------------------------------------------------------------


def test_events_arrive_in_commit_order_from_many_threads(store: Store) -> None:
    threads, per_thread = 8, 40
    committed: list[int] = []
    lock = threading.Lock()

    def commit_many(t: int) -> None:
        for i in range(per_thread):
            lsn = store.put(f"t{t}/{i}", i).lsn
            with lock:
                committed.append(lsn)

    with store.events.subscribe(kinds="commit") as sub:
        workers = [threading.Thread(target=commit_many, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        got = lsns(take(sub, threads * per_thread))
    assert all(a < b for a, b in itertools.pairwise(got)), "LSNs went backwards"
    assert got == sorted(committed)


def test_events_overflow_keeps_order_and_accounts_for_every_commit(store: Store) -> None:
    """A consumer too slow for its queue: what it sees and what the overflow
    events say it missed add up to every commit, in order."""
    seen: list[Event] = []
    end: list[int] = []  # the last LSN, once committed

    def last_of(event: Event) -> int:
        return event.last_lsn if isinstance(event, OverflowEvent) else event.lsn

    def slow_consumer(sub: Subscription) -> None:
        while not (end and seen and last_of(seen[-1]) >= end[0]):
            event = sub.get(timeout_seconds=0.02)
            if event is not None:
                seen.append(event)
                time.sleep(0.001)

    with store.events.subscribe(kinds="commit", max_queued=8) as sub:
        consumer = threading.Thread(target=slow_consumer, args=(sub,))
        consumer.start()
        committed = [store.put(f"k{i}", i, durability="none").lsn for i in range(300)]
        end.append(committed[-1])
        consumer.join(20)
        assert not consumer.is_alive(), f"the consumer never reached LSN {end[0]}"
    assert sub.dropped > 0, "the queue never overflowed: the test proves nothing"
    accounted: list[int] = []
    for event in seen:
        if isinstance(event, OverflowEvent):
            assert event.dropped == event.last_lsn - event.first_lsn + 1
            accounted.extend(range(event.first_lsn, event.last_lsn + 1))
        else:
            accounted.append(event.lsn)
    assert accounted == committed
    assert sum(e.dropped for e in seen if isinstance(e, OverflowEvent)) == sub.dropped


def test_events_overflow_is_announced_once_exactly_where_the_gap_is(store: Store) -> None:
    with store.events.subscribe(kinds="commit", max_queued=5) as sub:
        first = [store.put(f"a{i}", i, durability="none").lsn for i in range(20)]
        wait_until(lambda: sub.dropped == 15, what="15 drops")
        got = take(sub, 6)
        assert lsns(got[:5]) == first[:5]
        assert got[5] == OverflowEvent(lsn=first[-1], dropped=15, first_lsn=first[5],
                                       last_lsn=first[-1])
        # the gap marker also goes in when room frees up before the consumer drains
        second = [store.put(f"b{i}", i, durability="none").lsn for i in range(7)]
        wait_until(lambda: sub.dropped == 17, what="17 drops")
        assert lsns(take(sub, 1)) == second[:1]
        after = store.put("c", 0, durability="none").lsn
        got = take(sub, 6)
    assert lsns(got[:4]) == second[1:5]
    assert got[4] == OverflowEvent(lsn=second[6], dropped=2, first_lsn=second[5],
                                   last_lsn=second[6])
    assert got[5].lsn == after


# -- subscribers that block, sleep or raise --------------------------------------------


def _commit_latencies(store: Store, n: int, prefix: str) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        store.put(f"{prefix}/{i}", i)
        out.append(time.perf_counter() - started)
    return out


def test_events_blocked_sleeping_and_raising_subscribers_do_not_delay_commits(
    store: Store, caplog: pytest.LogCaptureFixture,
) -> None:
    """The bound: a subscriber adds one non-blocking queue put to a commit. Shown by
    200 durable commits all returning while one subscriber is blocked outright,
    another sleeps 50 ms per event (200 x 50 ms = 10 s if commits waited for it)
    and a third raises on every event; their latency stays that of commits
    with no subscriber (generous bounds: the machine is shared)."""
    n, sleep_seconds = 200, 0.05
    baseline = _commit_latencies(store, n, "base")

    gate = threading.Event()
    entered = threading.Event()
    blocked_got: list[Event] = []

    def blocked(event: Event) -> None:
        entered.set()
        gate.wait()
        blocked_got.append(event)

    def sleeping(event: Event) -> None:
        time.sleep(sleep_seconds)

    raised: list[int] = []

    def raising(event: Event) -> None:
        raised.append(event.lsn)
        raise RuntimeError(f"hook broken at {event.lsn}")

    caplog.set_level(logging.ERROR, logger="walsync.events")
    blocked_sub = store.events.subscribe(blocked, kinds="commit")
    sleeping_sub = store.events.subscribe(sleeping, kinds="commit")
    raising_sub = store.events.subscribe(raising, kinds="commit")
    try:
        started = time.perf_counter()
        with_subs = _commit_latencies(store, n, "subs")
        elapsed = time.perf_counter() - started
        # every commit returned while the blocked subscriber was held in its callback
        assert entered.wait(5), "the blocked subscriber never got its first event"
        assert blocked_got == []
        assert elapsed < n * sleep_seconds / 4, f"{n} commits took {elapsed:.2f} s"
        base_median, subs_median = statistics.median(baseline), statistics.median(with_subs)
        assert subs_median < base_median * 4 + 0.005, (base_median, subs_median)
        # the raising subscriber keeps receiving; failures are logged, rate-limited
        wait_until(lambda: raising_sub.failures == n, what="every event to reach the raiser")
        assert not raising_sub.closed
        assert raised == sorted(raised)
        assert len(set(raised)) == n
        failures_logged = [r for r in caplog.records if "failed on" in r.getMessage()]
        assert 1 <= len(failures_logged) <= n // 100 + 1
        assert failures_logged[0].exc_info is not None
        # released, the blocked one gets every event, in order
        gate.set()
        wait_until(lambda: len(blocked_got) == n, what="the blocked subscriber to catch up")
        assert lsns(blocked_got) == sorted(lsns(blocked_got))
        assert blocked_sub.dropped == 0
    finally:
        gate.set()
        for sub in (blocked_sub, sleeping_sub, raising_sub):
            sub.close()


def test_events_max_failures_cancels_only_after_failures_in_a_row(store: Store) -> None:
    calls: list[int] = []
    fail_all = threading.Event()

    def flaky(event: Event) -> None:
        calls.append(event.lsn)
        if fail_all.is_set() or len(calls) % 2:
            raise ValueError("flaky")

    good: list[Event] = []
    sub = store.events.subscribe(flaky, kinds="commit", max_failures=2)
    witness = store.events.subscribe(good.append, kinds="commit")
    for i in range(10):
        store.put(f"a{i}", i)
    wait_until(lambda: len(calls) == 10, what="10 calls")
    assert sub.failures == 5
    assert not sub.closed
    fail_all.set()
    for i in range(5):
        store.put(f"b{i}", i)
    wait_until(lambda: sub.closed, what="the cancellation")
    wait_until(lambda: len(good) == 15, what="the witness")
    assert len(calls) == 12
    assert sub.failures == 7
    assert sub not in store.events.subscriptions
    assert witness in store.events.subscriptions
    witness.close()


# -- lifecycle --------------------------------------------------------------------------


def test_events_unsubscribe_stops_delivery_at_once(store: Store) -> None:
    sub = store.events.subscribe(kinds="commit")
    witness = store.events.subscribe(kinds="commit")  # offered each batch after sub
    store.put("a", 1)
    b = store.put("b", 1)
    assert lsns(take(witness, 2))[-1] == b.lsn  # so sub holds both, undelivered
    sub.close()
    c = store.put("c", 1)
    assert lsns(take(witness, 1)) == [c.lsn]
    assert sub.get(timeout_seconds=0.05) is None
    assert list(sub) == []
    assert sub.closed
    assert sub not in store.events.subscriptions
    witness.close()


def test_events_store_close_delivers_what_was_published_then_ends(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    before = set(threading.enumerate())
    slow: list[Event] = []

    def slow_hook(event: Event) -> None:
        time.sleep(0.01)
        slow.append(event)

    hook = store.events.subscribe(slow_hook)
    iterated: list[Event] = []
    it = store.events.subscribe()
    reader = threading.Thread(target=lambda: iterated.extend(it))
    reader.start()
    committed = [store.put(f"k{i}", i).lsn for i in range(20)]
    store.close()
    reader.join(5)
    assert not reader.is_alive(), "the iterator did not end when the store closed"
    for got in (slow, iterated):
        assert lsns([e for e in got if isinstance(e, CommitEvent)]) == committed
        assert isinstance(got[-1], CheckpointEvent)  # close checkpoints last
    started = [t.name for t in set(threading.enumerate()) - before]
    assert not [name for name in started if name.startswith("walsync-events")]
    assert hook.closed
    assert it.closed
    with pytest.raises(StoreClosedError):
        store.events.subscribe()


def test_events_close_does_not_wait_forever_for_a_stuck_subscriber(
    store: Store, caplog: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()
    sub = store.events.subscribe(lambda e: gate.wait(), kinds="commit")
    store.put("k", 1)
    wait_until(lambda: sub.delivered == 1, what="the subscriber to block")
    caplog.set_level(logging.WARNING, logger="walsync.events")
    started = time.monotonic()
    store.events.close(timeout_seconds=0.2)
    took = time.monotonic() - started
    gate.set()
    assert took < 3, f"close waited {took:.1f} s"
    assert any(sub.name in r.getMessage() for r in caplog.records)


def test_store_checkpoint_subscribers_get_no_run_checkpoints_and_cost_commits_nothing(
    tmp_path: Path,
) -> None:
    """Store and run checkpoints are different kinds: a subscriber to store checkpoints
    gets those alone, and (commits carrying none) makes commits publish nothing."""
    from walsync.engine.workflow import Workflows

    with Store.open(tmp_path / "s") as store:
        with store.events.subscribe(kinds=("checkpoint",)) as sub:
            assert not store.events._wants_records  # commits publish nothing for it
            run = Workflows(store).run("w", "r1")
            run.start()
            run.checkpoint("c1")
            store.checkpoint()
            got = take(sub, 1)
            assert sub.get(timeout_seconds=0.3) is None  # nothing else comes
        assert [type(e).__name__ for e in got] == ["CheckpointEvent"]
