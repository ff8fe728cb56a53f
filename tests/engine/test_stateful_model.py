"""A Hypothesis state machine: the Store against a plain dict model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from walsync.engine import ConflictError, Delete, Put, Store, Version
from walsync.engine.layout import StoreLayout

KEYS = [
    "a", "a/1", "a/2", "a/10", "ab", "b", "runs/1/steps/1", "runs/1/steps/2", "runs/2",
    "é", "日本/1", "a\xff", "a\U0010ffff", "z" * 100,
]
PREFIXES = ["", "a", "a/", "runs/1/", "runs/", "日", "a\xff", "a\U0010ffff", "zz", "q"]

_DELETE = object()

values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=30),
    st.binary(max_size=60),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=4),
    st.sampled_from(["x" * 6000, b"\x01" * 700]),  # compressed / fill a segment quickly
)
keys = st.sampled_from(KEYS)


def _utf8(item: tuple[str, Any]) -> bytes:
    return item[0].encode()


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="walsync-model-"))
        self.path = self.dir / "store"
        self.model: dict[str, Any] = {}
        self.stale: dict[str, list[Version]] = {}
        self.next_lsn = 1
        self.floor: int | None = None
        self.store: Store | None = None

    def _open(self) -> Store:
        return Store.open(self.path, segment_bytes=4096, durability="none",
                          compress_above_bytes=512)

    @initialize()
    def start(self) -> None:
        self.store = self._open()

    @property
    def s(self) -> Store:
        assert self.store is not None
        return self.store

    def _remember(self, key: str) -> None:
        v = self.s.get_version(key)
        if v is not None:
            self.stale.setdefault(key, []).append(v)

    def _committed(self, lsn: int) -> None:
        assert lsn == self.next_lsn
        self.next_lsn += 1

    # -- rules ----------------------------------------------------------------

    @rule(key=keys, value=values)
    def put(self, key: str, value: Any) -> None:
        self._remember(key)
        self._committed(self.s.put(key, value).lsn)
        self.model[key] = value

    @rule(key=keys)
    def delete(self, key: str) -> None:
        self._remember(key)
        self._committed(self.s.delete(key, durability="local").lsn)
        self.model.pop(key, None)

    @rule(ops=st.lists(st.tuples(keys, st.one_of(values, st.just(_DELETE))), min_size=1,
                       max_size=6))
    def batch(self, ops: list[tuple[str, Any]]) -> None:
        for key, _ in ops:
            self._remember(key)
        with self.s.batch() as b:
            for key, value in ops:
                if value is _DELETE:
                    b.delete(key)
                else:
                    b.put(key, value)
        assert b.result is not None
        self._committed(b.result.lsn)
        for key, value in ops:
            if value is _DELETE:
                self.model.pop(key, None)
            else:
                self.model[key] = value

    @rule(ops=st.lists(st.tuples(keys, values), min_size=1, max_size=4))
    def batch_aborted(self, ops: list[tuple[str, Any]]) -> None:
        def run() -> None:
            with self.s.batch() as b:
                for key, value in ops:
                    b.put(key, value)
                raise KeyboardInterrupt  # any exception discards the batch

        with pytest.raises(KeyboardInterrupt):
            run()
        assert self.s.next_lsn == self.next_lsn

    @rule(key=keys, value=values)
    def cas_right_version(self, key: str, value: Any) -> None:
        current = self.s.get_version(key)
        self._remember(key)
        self._committed(self.s.put(key, value, expect=current).lsn)
        self.model[key] = value

    @rule(key=keys, data=st.data())
    def cas_wrong_version(self, key: str, data: st.DataObject) -> None:
        current = self.s.get_version(key)
        wrong: list[Version | None] = [v for v in self.stale.get(key, []) if v != current]
        if current is not None:
            wrong.append(None)  # "must not exist", but it does
        else:
            wrong.append(Version("elsewhere", 12345, 1, {"elsewhere": 12345}))
        expect = data.draw(st.sampled_from(wrong))
        with pytest.raises(ConflictError) as info:
            self.s.commit([Put("b", "never"), Put(key, "never", expect=expect)])
        assert info.value.key == key
        with pytest.raises(ConflictError):
            self.s.commit([Delete(key, expect=expect)])
        assert self.s.next_lsn == self.next_lsn

    @rule()
    def reopen(self) -> None:
        self.s.close()
        self.store = self._open()
        assert self.s.next_lsn == self.next_lsn
        assert self.s.recovery is not None
        assert self.s.recovery.replayed_records == 0  # a clean close checkpointed

    @rule()
    def checkpoint(self) -> None:
        segments_before = len(StoreLayout(self.path).list_segments())
        result = self.s.checkpoint()
        assert result.lsn == self.next_lsn - 1
        segments_after = len(StoreLayout(self.path).list_segments())
        assert segments_after == segments_before - result.segments_removed
        if self.floor is None:
            assert segments_after <= 1

    @rule(back=st.integers(min_value=0, max_value=20))
    def set_retain_floor(self, back: int) -> None:
        # only LSNs still in the WAL can be retained: the floor is set no lower
        segments = StoreLayout(self.path).list_segments()
        lowest_kept = segments[0][0] if segments else self.next_lsn
        self.floor = max(lowest_kept, self.next_lsn - back)
        self.s.set_retain_floor(self.floor)

    @precondition(lambda self: self.floor is not None)
    @rule()
    def clear_retain_floor(self) -> None:
        self.floor = None
        self.s.set_retain_floor(None)

    # -- invariants -------------------------------------------------------------

    @invariant()
    def reads_match_model(self) -> None:
        if self.store is None:
            return
        s = self.s
        for key in KEYS:
            assert s.get(key, "<absent>") == self.model.get(key, "<absent>"), key
            assert (s.get_version(key) is None) == (key not in self.model)
        expected = sorted(self.model.items(), key=_utf8)
        assert list(s.scan()) == expected
        for prefix in PREFIXES:
            want = [kv for kv in expected if kv[0].startswith(prefix)]
            assert list(s.scan(prefix)) == want, prefix
            assert list(s.scan(prefix, reverse=True)) == want[::-1], prefix
        assert list(s.scan(limit=2)) == expected[:2]
        assert s.next_lsn == self.next_lsn

    @invariant()
    def wal_keeps_the_retain_floor(self) -> None:
        if self.store is None or self.floor is None or self.floor >= self.next_lsn:
            return
        segments = StoreLayout(self.path).list_segments()
        assert segments, "records at or above the retain floor were removed"
        assert segments[0][0] <= self.floor

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


StoreModel.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=35,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_stateful_store_matches_dict_model = StoreModel.TestCase
