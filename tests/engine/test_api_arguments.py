"""Every argument that reaches the disk is checked at the API boundary.

A fence that is not an int was once written into the key's entry, after which
every put, delete and get_version of that key raised CorruptionError; a fence of
2**63 was accepted locally and then stopped replication (PostgreSQL's bigint).
Keys, fences, ``expect=``, durability and the operations of a commit are each
refused with a TypeError or ValueError (InvalidKeyError for keys) that names the
key and the reason, before anything is written; the store and the key go on
working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from walsync.engine import ANY, Delete, InvalidKeyError, Put, Store
from walsync.engine.versions import Version

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "s", durability="none", max_key_bytes=64) as s:
        s.put("k", "before")
        yield s


bad_keys = st.one_of(
    st.integers(), st.binary(), st.none(), st.lists(st.text(), max_size=2), st.just(""),
    st.text(min_size=65, max_size=80).filter(lambda k: len(k.encode()) > 64),
    st.builds(lambda a, b: a + "\ud800" + b, st.text(max_size=3), st.text(max_size=3)),
    st.builds(lambda a, b: a + "\x00" + b, st.text(max_size=3), st.text(max_size=3)),
)
bad_fences = st.one_of(
    st.text(), st.floats(), st.none(), st.lists(st.integers(), max_size=2), st.booleans(),
    st.integers(max_value=-1), st.integers(min_value=2**63),
)
bad_expects = st.one_of(st.text(), st.integers(), st.floats(), st.booleans(),
                        st.dictionaries(st.text(), st.integers(), max_size=2),
                        st.tuples(st.text(), st.integers()))
bad_durabilities = st.one_of(st.text().filter(lambda d: d not in ("none", "local", "remote")),
                             st.integers(), st.booleans(), st.floats(), st.just(b"local"))
bad_ops = st.one_of(st.text(min_size=1), st.integers(), st.none(),
                    st.lists(st.one_of(st.text(), st.integers(), st.none(),
                                       st.tuples(st.text(), st.integers())), min_size=1,
                             max_size=3),
                    st.just(Put("k", 1)), st.just(Delete("k")))

#: how each bad argument reaches the store: (name, call)
Call = Callable[[Store, Any], Any]
KEY_CALLS: list[tuple[str, Call]] = [
    ("put", lambda s, k: s.put(k, 1)),
    ("delete", lambda s, k: s.delete(k)),
    ("commit", lambda s, k: s.commit([Put("ok", 1), Put(k, 1)])),
    ("batch", lambda s, k: _batch(s, lambda b: (b.put("ok", 1), b.delete(k)))),
]
FENCE_CALLS: list[tuple[str, Call]] = [
    ("put", lambda s, f: s.put("k", 1, fence=f)),
    ("delete", lambda s, f: s.delete("k", fence=f)),
    ("commit", lambda s, f: s.commit([Put("ok", 1), Delete("k", fence=f)])),
    ("batch", lambda s, f: _batch(s, lambda b: b.put("k", 1), fence=f)),
    ("batch op", lambda s, f: _batch(s, lambda b: b.put("k", 1, fence=f))),
]
EXPECT_CALLS: list[tuple[str, Call]] = [
    ("put", lambda s, e: s.put("k", 1, expect=e)),
    ("delete", lambda s, e: s.delete("k", expect=e)),
    ("commit", lambda s, e: s.commit([Put("ok", 1), Put("k", 2, expect=e)])),
]
DURABILITY_CALLS: list[tuple[str, Call]] = [
    ("put", lambda s, d: s.put("k", 1, durability=d)),
    ("delete", lambda s, d: s.delete("k", durability=d)),
    ("commit", lambda s, d: s.commit([Put("k", 1)], durability=d)),
    ("batch", lambda s, d: _batch(s, lambda b: b.put("k", 1), durability=d)),
]


def _batch(store: Store, fill: Callable[[Any], Any], **kwargs: Any) -> None:
    with store.batch(**kwargs) as b:
        fill(b)


def _refused(store: Store, call: Call, arg: Any, errors: tuple[type[Exception], ...],
             words: str) -> str:
    """The call is refused with one of ``errors`` saying ``words``; nothing is written;
    the store and key "k" go on working. Returns the message."""
    lsn, wal = store.next_lsn, store.wal_end_bytes
    with pytest.raises(errors) as info:
        call(store, arg)
    message = str(info.value)
    assert words in message, message
    assert (store.next_lsn, store.wal_end_bytes) == (lsn, wal)
    assert store.get("ok") is None
    assert store.get("k") == "before"
    version = store.get_version("k")
    assert version is not None
    store.put("k", "again", expect=version)
    store.put("k", "before")
    return message


@FAST
@given(key=bad_keys, how=st.sampled_from(KEY_CALLS))
def test_arguments_bad_keys_are_refused(store: Store, key: Any, how: tuple[str, Call]) -> None:
    message = _refused(store, how[1], key, (InvalidKeyError,), "key")
    assert "key" in message


@FAST
@given(fence=bad_fences, how=st.sampled_from(FENCE_CALLS))
def test_arguments_bad_fences_are_refused(store: Store, fence: Any, how: tuple[str, Call]) -> None:
    assume(not (how[0] == "batch op" and fence is None))  # None: the batch's own fence
    _refused(store, how[1], fence, (TypeError, ValueError), "fence=")


@FAST
@given(expect=bad_expects, how=st.sampled_from(EXPECT_CALLS))
def test_arguments_bad_expects_are_refused(store: Store, expect: Any,
                                           how: tuple[str, Call]) -> None:
    message = _refused(store, how[1], expect, (TypeError,), "expect=")
    assert "'k'" in message
    assert "Version, None or ANY" in message


@FAST
@given(durability=bad_durabilities, how=st.sampled_from(DURABILITY_CALLS))
def test_arguments_bad_durabilities_are_refused(store: Store, durability: Any,
                                                how: tuple[str, Call]) -> None:
    _refused(store, how[1], durability, (TypeError, ValueError), "durability=")


@FAST
@given(ops=bad_ops)
def test_arguments_bad_operations_are_refused(store: Store, ops: Any) -> None:
    _refused(store, lambda s, o: s.commit(o), ops, (TypeError,), "Put and Delete")


def test_arguments_a_bad_fence_no_longer_poisons_its_key(tmp_path: Path) -> None:
    """The reported case: fence="x" (or 1.5, None, [1], True) was written, and every
    later put, delete and get_version of the key raised CorruptionError."""
    path = tmp_path / "s"
    with Store.open(path) as s:
        s.put("k", 0)
        for fence in ("x", 1.5, None, [1], True, -1, 2**63):
            with pytest.raises((TypeError, ValueError), match="fence= for key 'k'"):
                s.put("k", 1, fence=fence)
        s.put("k", 2, fence=2**63 - 1)  # the largest token the server holds
        assert s.get_version("k") is not None
        s.delete("k")
        assert s.get_version("k") is None
    with Store.open(path) as s:
        assert s.get("k") is None


def test_arguments_messages_name_what_is_expected(store: Store) -> None:
    with pytest.raises(TypeError, match=r"commit takes a list of Put and Delete operations, "
                                        r"not str"):
        store.commit("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"a commit takes Put and Delete operations, not str"):
        store.commit(["x"])  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError, match="NUL character"):
        store.put("a\x00b", 1)
    with pytest.raises(ValueError, match=r"durability= takes 'none', 'local' or 'remote', "
                                         r"not 'durable'"):
        store.put("k", 1, durability="durable")
    # what is valid stays valid
    store.commit((Put("t1", 1), Delete("t2", expect=None), Put("t3", 3, expect=ANY)))
    store.commit(op for op in [Put("g", 1)])  # a generator is read once
    version = store.get_version("t1")
    assert isinstance(version, Version)
    store.put("t1", 2, expect=version, durability="local", fence=0)
    assert store.get("g") == 1
