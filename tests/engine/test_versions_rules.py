"""Unit and property tests of engine/versions.py: vectors, siblings, winner, HLC."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walsync.engine.versions import (
    HLC_LOGICAL_BITS,
    HybridClock,
    Sibling,
    Version,
    compare_vv,
    dominates_or_equal,
    join_vv,
    make_sibling,
    merge_sibling,
    visible_siblings,
    winner,
)


def _sib(
    vv: dict[str, int],
    data: bytes | None = b"v",
    *,
    origin: str = "a",
    lsn: int = 1,
    hlc: int = 1,
    fence: int = 0,
    codec: int = 0,
) -> Sibling:
    return Sibling(Version(origin, lsn, hlc, vv, fence, data is None), codec, data)


# -- compare_vv / join_vv ------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ({}, {}, "equal"),
        ({"a": 1}, {"a": 1}, "equal"),
        ({"a": 1, "b": 0}, {"a": 1}, "equal"),  # a missing component is 0
        ({"a": 1}, {"a": 2}, "before"),
        ({}, {"a": 1}, "before"),
        ({"a": 1}, {"a": 1, "b": 1}, "before"),
        ({"a": 2}, {"a": 1}, "after"),
        ({"a": 1, "b": 3}, {"b": 3}, "after"),
        ({"a": 1}, {"b": 1}, "concurrent"),
        ({"a": 2, "b": 1}, {"a": 1, "b": 2}, "concurrent"),
    ],
)
def test_compare_vv_classifies_pairs(a: dict[str, int], b: dict[str, int], expected: str) -> None:
    assert compare_vv(a, b) == expected
    mirrored = {"before": "after", "after": "before"}.get(expected, expected)
    assert compare_vv(b, a) == mirrored


def test_dominates_or_equal_treats_missing_as_zero() -> None:
    assert dominates_or_equal({"a": 2, "b": 1}, {"a": 2})
    assert dominates_or_equal({"a": 1}, {"a": 1, "b": 0})
    assert not dominates_or_equal({"a": 1}, {"a": 1, "b": 1})
    assert dominates_or_equal({"a": 1}, {})


def test_join_vv_takes_componentwise_max() -> None:
    assert join_vv([]) == {}
    assert join_vv([{"a": 1, "b": 5}, {"a": 3}, {"c": 2, "b": 1}]) == {"a": 3, "b": 5, "c": 2}
    joined = join_vv([{"a": 1}, {"b": 2}])
    assert compare_vv(joined, {"a": 1}) == "after"
    assert compare_vv(joined, {"b": 2}) == "after"


# -- merge_sibling ---------------------------------------------------------------


def test_merge_sibling_into_empty_adds_it() -> None:
    s = _sib({"a": 1})
    assert merge_sibling([], s) == [s]


def test_merge_sibling_ignores_dominated_version() -> None:
    current = [_sib({"a": 2, "b": 1}, lsn=2)]
    assert merge_sibling(current, _sib({"a": 1}, b"old", lsn=1)) is None


def test_merge_sibling_ignores_equal_version() -> None:
    current = [_sib({"a": 2}, lsn=2)]
    assert merge_sibling(current, _sib({"a": 2}, b"other", lsn=2)) is None


def test_merge_sibling_dominating_replaces_every_dominated_sibling() -> None:
    s1 = _sib({"a": 1}, b"x", origin="a", lsn=1, hlc=1)
    s2 = _sib({"b": 1}, b"y", origin="b", lsn=1, hlc=2)
    both = merge_sibling([s1], s2)
    assert both is not None
    assert len(both) == 2
    top = _sib({"a": 1, "b": 2}, b"z", origin="b", lsn=2, hlc=3)
    assert merge_sibling(both, top) == [top]


def test_merge_sibling_dominating_one_keeps_the_concurrent_other() -> None:
    s1 = _sib({"a": 1}, b"x", origin="a", lsn=1, hlc=1)
    s2 = _sib({"b": 1}, b"y", origin="b", lsn=1, hlc=2)
    pair = merge_sibling([s1], s2)
    assert pair is not None
    s3 = _sib({"a": 2}, b"w", origin="a", lsn=2, hlc=3)  # dominates s1 only
    merged = merge_sibling(pair, s3)
    assert merged is not None
    assert {s.data for s in merged} == {b"y", b"w"}


def test_merge_sibling_concurrent_is_added_in_winner_order() -> None:
    s1 = _sib({"a": 1}, b"x", origin="a", lsn=1, hlc=5)
    s2 = _sib({"b": 1}, b"y", origin="b", lsn=1, hlc=2)
    merged = merge_sibling([s1], s2)
    assert merged == [s2, s1]  # sorted by order_key, winner last
    assert winner(merged) is s1


def test_merge_sibling_handles_tombstones_like_values() -> None:
    live = _sib({"a": 1}, b"x", lsn=1)
    tomb = _sib({"a": 2}, None, lsn=2)
    merged = merge_sibling([live], tomb)
    assert merged == [tomb]
    assert merged[0].deleted
    assert merge_sibling(merged, live) is None


# -- visible_siblings --------------------------------------------------------------


def test_visible_siblings_collapses_identical_values_with_joined_vv() -> None:
    s1 = _sib({"a": 1}, b"same", origin="a", lsn=1, hlc=10)
    s2 = _sib({"b": 4}, b"same", origin="b", lsn=4, hlc=20, fence=0)
    s3 = _sib({"c": 1}, b"different", origin="c", lsn=1, hlc=15)
    shown = visible_siblings([s1, s3, s2])
    assert len(shown) == 2
    collapsed = next(s for s in shown if s.data == b"same")
    # the winner's (s2's) metadata, the group's joined vector
    assert collapsed.version.origin == "b"
    assert collapsed.version.lsn == 4
    assert collapsed.version.hlc == 20
    assert dict(collapsed.version.vv) == {"a": 1, "b": 4}
    assert [s.data for s in shown] == [b"different", b"same"]  # winner last


def test_visible_siblings_keeps_winner_fence_and_distinguishes_codec() -> None:
    s1 = _sib({"a": 1}, b"v", origin="a", lsn=1, hlc=100, fence=0)
    s2 = _sib({"b": 1}, b"v", origin="b", lsn=1, hlc=1, fence=7)
    s3 = _sib({"c": 1}, b"v", origin="c", lsn=1, hlc=50, codec=1)
    shown = visible_siblings([s1, s2, s3])
    assert len(shown) == 2
    merged = next(s for s in shown if s.codec == 0)
    assert merged.version.fence == 7
    assert merged.version.origin == "b"
    assert dict(merged.version.vv) == {"a": 1, "b": 1}


def test_visible_siblings_collapses_tombstones_together() -> None:
    t1 = _sib({"a": 1}, None, origin="a", lsn=1, hlc=1)
    t2 = _sib({"b": 1}, None, origin="b", lsn=1, hlc=2)
    shown = visible_siblings([t1, t2])
    assert len(shown) == 1
    assert shown[0].deleted
    assert dict(shown[0].version.vv) == {"a": 1, "b": 1}


def test_visible_siblings_of_one_is_unchanged() -> None:
    s = _sib({"a": 1})
    assert visible_siblings([s]) == [s]
    assert visible_siblings([]) == []


# -- winner ------------------------------------------------------------------------


def test_winner_prefers_fence_then_hlc_then_origin_then_lsn() -> None:
    base = {"origin": "m", "lsn": 5, "hlc": 100, "fence": 1}

    def mk(**kw: object) -> Sibling:
        args = {**base, **kw}
        return _sib({str(args["origin"]): int(str(args["lsn"]))}, b"x",
                    origin=str(args["origin"]), lsn=int(str(args["lsn"])),
                    hlc=int(str(args["hlc"])), fence=int(str(args["fence"])))

    # fence beats a higher HLC, origin and LSN
    hi_fence = mk(fence=2, hlc=1, origin="a", lsn=1)
    assert winner([mk(hlc=999, origin="z", lsn=99), hi_fence]) is hi_fence
    # same fence: HLC decides
    hi_hlc = mk(hlc=101, origin="a", lsn=1)
    assert winner([hi_hlc, mk(origin="z", lsn=99)]) is hi_hlc
    # same fence and HLC: origin decides
    hi_origin = mk(origin="n", lsn=1)
    assert winner([mk(origin="m", lsn=99), hi_origin]) is hi_origin
    # everything else equal: LSN decides
    hi_lsn = mk(lsn=6)
    assert winner([hi_lsn, mk(lsn=5)]) is hi_lsn


def test_version_order_key_and_hlc_unix_ms() -> None:
    v = Version("n", 3, (1234 << HLC_LOGICAL_BITS) + 7, {"n": 3}, 2)
    assert v.order_key == (2, (1234 << HLC_LOGICAL_BITS) + 7, "n", 3)
    assert v.hlc_unix_ms == 1234


def test_sibling_wire_round_trip() -> None:
    s = _sib({"a": 3, "b": 1}, b"data", origin="b", lsn=1, hlc=99, fence=4, codec=1)
    assert Sibling.from_wire(s.to_wire()) == s
    t = _sib({"a": 1}, None)
    back = Sibling.from_wire(t.to_wire())
    assert back.deleted
    assert back.version.deleted


# -- HybridClock --------------------------------------------------------------------


def test_hybrid_clock_tick_strictly_increases_when_time_goes_backwards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [2_000_000_000_000_000_000]
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    clock = HybridClock()
    seen = []
    for step in [0, 0, -5_000_000_000, 1_000_000, -1]:
        now[0] += step
        seen.append(clock.tick())
    assert seen[0] == (2_000_000_000_000 << HLC_LOGICAL_BITS)
    assert seen == [seen[0] + i for i in range(5)]  # logical counter only
    # once the wall clock is ahead again, the HLC follows it
    now[0] = 2_000_000_010_000_000_000
    assert clock.tick() == 2_000_000_010_000 << HLC_LOGICAL_BITS


def test_hybrid_clock_tick_tracks_wall_clock() -> None:
    before = time.time_ns() // 1_000_000
    value = HybridClock().tick()
    after = time.time_ns() // 1_000_000
    assert before <= value >> HLC_LOGICAL_BITS <= after


def test_hybrid_clock_logical_counter_overflow_carries() -> None:
    clock = HybridClock(last=(1 << 60) | 0xFFFF)  # far in the future, counter full
    nxt = clock.tick()
    assert nxt == ((1 << 60) | 0xFFFF) + 1
    assert nxt >> HLC_LOGICAL_BITS == ((1 << 60) >> HLC_LOGICAL_BITS) + 1


def test_hybrid_clock_observe_only_moves_forward() -> None:
    future = (time.time_ns() // 1_000_000 + 3_600_000) << HLC_LOGICAL_BITS
    clock = HybridClock()
    clock.observe(future)
    assert clock.last == future
    clock.observe(future - 100)
    assert clock.last == future
    assert clock.tick() == future + 1
    assert clock.tick() == future + 2


def test_hybrid_clock_resumes_above_saved_last() -> None:
    saved = HybridClock().tick() + 10_000
    assert HybridClock(saved).tick() > saved


# -- order independence (property) ----------------------------------------------------

_NODES = ["a", "b", "c", "d"]


def _version_from_vv(vv: dict[str, int]) -> Sibling:
    """A version determined by its vector, with a unique order key per vector."""
    vv = {k: v for k, v in vv.items() if v > 0}
    origin = max(vv)
    hlc = sum(vv.get(n, 0) * 8**i for i, n in enumerate(_NODES))
    data = repr(sorted(vv.items())).encode() if hlc % 5 else None  # some tombstones
    return Sibling(Version(origin, vv[origin], hlc, vv, 0, data is None), 0, data)


_vv_strategy = st.dictionaries(
    st.sampled_from(_NODES), st.integers(min_value=1, max_value=7), min_size=1
)


def _canonical(sibs: list[Sibling]) -> list[tuple[object, ...]]:
    """Siblings as comparable tuples (a vector's key order does not matter)."""
    out: list[tuple[object, ...]] = []
    for s in sibs:
        data, codec, vv, hlc, origin, lsn, fence = s.to_wire()
        out.append((data, codec, tuple(sorted(vv.items())), hlc, origin, lsn, fence))
    return out


@settings(max_examples=300, deadline=None)
@given(
    vvs=st.lists(_vv_strategy, min_size=1, max_size=12),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    dup_count=st.integers(min_value=0, max_value=6),
)
def test_merge_sibling_is_order_and_duplicate_independent(
    vvs: list[dict[str, int]], seed: int, dup_count: int
) -> None:
    versions_in = [_version_from_vv(vv) for vv in vvs]
    rng = random.Random(seed)

    def fold(seq: list[Sibling]) -> list[Sibling]:
        current: list[Sibling] = []
        for s in seq:
            merged = merge_sibling(current, s)
            if merged is not None:
                current = merged
        return current

    reference = fold(versions_in)
    shuffled = versions_in + [rng.choice(versions_in) for _ in range(dup_count)]
    rng.shuffle(shuffled)
    other = fold(shuffled)
    assert _canonical(other) == _canonical(reference)
    # and it is exactly the set of maximal versions (an antichain)
    unique = {tuple(sorted(s.version.vv.items())): s for s in versions_in}
    maximal = [
        s for s in unique.values()
        if not any(
            compare_vv(s.version.vv, t.version.vv) == "before" for t in unique.values()
        )
    ]
    assert sorted(map(repr, _canonical(reference))) == sorted(map(repr, _canonical(maximal)))
    for i, x in enumerate(reference):
        for y in reference[i + 1:]:
            assert compare_vv(x.version.vv, y.version.vv) == "concurrent"
    # the shown (collapsed) siblings and the winner do not depend on order either
    assert _canonical(visible_siblings(other)) == _canonical(visible_siblings(reference))
    assert winner(other) == winner(reference)


# -- make_sibling ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(origin=st.text(max_size=8), lsn=st.integers(0, 2**63 - 1),
       hlc=st.integers(0, 2**63 - 1),
       vv=st.dictionaries(st.text(max_size=4), st.integers(0, 2**63 - 1), max_size=4),
       fence=st.integers(0, 2**63 - 1), codec=st.integers(0, 1),
       data=st.none() | st.binary(max_size=16))
def test_make_sibling_is_the_constructors_sibling(origin: str, lsn: int, hlc: int,
                                                  vv: dict[str, int], fence: int, codec: int,
                                                  data: bytes | None) -> None:
    """Field for field (every field compares, so one it does not set fails here), with
    the same hash and the same frozenness."""
    made = make_sibling(origin, lsn, hlc, vv, fence, codec, data)
    built = Sibling(Version(origin, lsn, hlc, vv, fence, data is None), codec, data)
    assert made == built
    assert made.version == built.version
    assert hash(made.version) == hash(built.version)
    assert repr(made) == repr(built)
    assert made.deleted is (data is None)
    with pytest.raises(AttributeError):
        made.version.lsn = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        made.data = b""  # type: ignore[misc]
