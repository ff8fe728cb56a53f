"""The values a store takes: a closed set, each read back exactly as it was put.

cbor2 writes more than it reads back as it was: tags it then refuses to decode
(a bignum tag around a string, an epoch datetime around text, a shared
reference, a rational), tuples that come back as lists, frozensets as sets,
subclasses as their base, zoned datetimes as fixed offsets. A value accepted
and then unreadable fails every read, scan and sync of its key, so the store
refuses at ``put`` (InvalidValueError, naming the key and where in the value)
whatever is outside the set FORMAT.md lists, before anything is written.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import math
import uuid
import zoneinfo
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walsync import engine
from walsync.engine import InvalidValueError, Put, Store

FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "s", durability="none") as s:
        yield s


# -- what is accepted -----------------------------------------------------------

_offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m)))
_decimals = st.decimals(allow_nan=False, allow_infinity=False).filter(
    lambda d: not (d.is_zero() and d.is_signed()))
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(), st.binary(),
    st.datetimes(timezones=_offsets), st.dates(), _decimals, st.uuids(),
)
accepted = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=5),
    ),
    max_leaves=25,
)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (NaN equals NaN, -0.0 is not 0.0,
    a datetime keeps its offset)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a)
                                                      == math.copysign(1, b))
    if isinstance(a, dt.datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@FAST
@given(value=accepted)
def test_values_every_accepted_value_reads_back_exactly(store: Store, value: Any) -> None:
    store.put("v", value)
    assert _same(store.get("v"), value)
    assert _same(dict(store.scan("v"))["v"], value)


def test_values_read_back_exactly_after_reopening(tmp_path: Path) -> None:
    values = {
        "big-int": 2**200, "negative-big-int": -(2**70), "nan": math.nan, "inf": -math.inf,
        "negative-zero": -0.0, "utc": dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC),
        "offset": dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5,
                                                                           minutes=-30))),
        "date": dt.date(1, 1, 1), "decimal": decimal.Decimal("1.10"),
        "uuid": uuid.UUID(int=7), "int-keys": {1: "a", -2: ["b"], "3": None},
        "bytes": b"\x00\xff", "nested": {"a": [1, {"b": [dt.date(2026, 5, 5)]}]},
    }
    with Store.open(tmp_path / "s") as s:
        for key, value in values.items():
            s.put(key, value)
    with Store.open(tmp_path / "s") as s:
        for key, value in values.items():
            assert _same(s.get(key), value), key
    assert engine.verify(tmp_path / "s").ok


# -- what is refused ----------------------------------------------------------------


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


class Ratio(float):
    pass


#: (a value outside the set, the words the error uses for it)
BAD_LEAVES: list[tuple[Any, str]] = [
    (cbor2.CBORTag(2, "x"), "CBOR tag (2)"),  # bignum around text: does not decode
    (cbor2.CBORTag(1, "x"), "CBOR tag (1)"),  # epoch datetime around text
    (cbor2.CBORTag(29, 1), "CBOR tag (29)"),  # a shared reference to nothing
    (cbor2.CBORTag(30, [1]), "CBOR tag (30)"),  # a rational of one number
    (cbor2.CBORTag(258, [1, 1]), "CBOR tag (258)"),  # a set: comes back as a set
    (cbor2.CBORTag(4000, "x"), "CBOR tag (4000)"),
    ((1, 2), "a tuple"),
    ({1, 2}, "a set"),
    (frozenset({1}), "a frozenset"),
    (bytearray(b"x"), "a bytearray"),
    (memoryview(b"x"), "a memoryview"),
    (dt.datetime(2026, 1, 1), "naive datetime"),
    (dt.datetime(2026, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")), "tzinfo"),
    (dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(seconds=30))), "tzinfo"),
    (decimal.Decimal("NaN"), "Decimal('NaN')"),
    (decimal.Decimal("-Infinity"), "Decimal('-Infinity')"),
    (decimal.Decimal("-0"), "Decimal('-0')"),
    (Colour.RED, "a Colour (a subclass of int"),
    (Name("n"), "a Name (a subclass of str"),
    (Ratio(0.5), "a Ratio (a subclass of float"),
    (dt.time(1, 2), "of type datetime.time"),
    (cbor2.undefined, "of type"),
    (object(), "of type builtins.object"),
    ({(1, 2): 1}, "a key of type tuple"),
    ({1.5: 1}, "a key of type float"),
    ({None: 1}, "a key of type NoneType"),
    ({True: 1}, "a key of type bool"),
    ("\ud800", "not valid UTF-8"),
    ({"\udfff": 1}, "not valid UTF-8"),
]


def _within(leaf: Any) -> st.SearchStrategy[tuple[Any, str]]:
    """A valid value holding ``leaf`` somewhere, with the path to it."""
    def wrap(inner: tuple[Any, str], how: tuple[int, Any]) -> tuple[Any, str]:
        value, path = inner
        kind, filler = how
        if kind == 0:
            return [filler, value], f"[1]{path}"
        return {"a": filler, "b": value}, f"['b']{path}"

    base: st.SearchStrategy[tuple[Any, str]] = st.integers(0, 0).map(lambda _: (leaf, ""))
    return st.recursive(base, lambda inner: st.builds(
        wrap, inner, st.tuples(st.integers(0, 1), scalars)), max_leaves=4)


@FAST
@given(case=st.integers(0, len(BAD_LEAVES) - 1).flatmap(  # (a CBORTag cannot be hashed)
    lambda i: _within(BAD_LEAVES[i][0]).map(lambda placed: (*placed, BAD_LEAVES[i][1]))))
def test_values_outside_the_set_are_refused_before_anything_is_written(
    store: Store, case: tuple[Any, str, str]
) -> None:
    value, path, words = case
    store.put("before", 1)
    lsn, wal = store.next_lsn, store.wal_end_bytes
    with pytest.raises(InvalidValueError) as info:
        store.put("runs/1", value)
    message = str(info.value)
    assert "'runs/1'" in message
    assert f"value{path} " in message
    assert words in message
    assert "nothing was written" in message
    assert (store.next_lsn, store.wal_end_bytes) == (lsn, wal)
    assert store.get("runs/1") is None
    store.put("after", {"ok": True})  # the store still works
    assert dict(store.scan()) == {"after": {"ok": True}, "before": 1}


@pytest.mark.parametrize("tag", [1, 2, 29, 30, 258])
def test_values_undecodable_tags_leave_scans_and_verify_working(tmp_path: Path, tag: int) -> None:
    """The tags cbor2 writes and then cannot read back (or not as written): refused, and
    the prefix they would have broken still scans."""
    path = tmp_path / "s"
    with Store.open(path) as s:
        s.put("p/a", 1)
        with pytest.raises(InvalidValueError, match=r"CBOR tag"):
            s.put("p/b", cbor2.CBORTag(tag, "x"))
        with pytest.raises(InvalidValueError):
            s.commit([Put("p/c", 2), Put("p/d", [cbor2.CBORTag(tag, "x")])])
        assert dict(s.scan("p/")) == {"p/a": 1}
    assert engine.verify(path).ok


def test_values_depth_and_member_limits(tmp_path: Path) -> None:
    """Too deep, or more members in all than bytes allowed (shared references are
    followed, as cbor2 follows them: 2**40 members here), is refused, and quickly."""
    with Store.open(tmp_path / "s", max_value_bytes=1 << 20) as store:
        deep: Any = 0
        for _ in range(200):
            deep = [deep]
        with pytest.raises(InvalidValueError, match=r"value\['x'\](\[0\])+ is nested deeper "
                           "than 128"):
            store.put("deep", {"x": deep})
        shared: list[Any] = [0]
        for _ in range(40):
            shared = [shared, shared]
        with pytest.raises(InvalidValueError, match="more than 1048576 members in all"):
            store.put("shared", shared)
        assert store.next_lsn == 1


def test_values_check_is_cheap_next_to_encoding() -> None:
    """The walk over a 1 KiB dict costs about what encoding it does, a few microseconds
    against a durable commit's hundreds (measured side by side: only the ratio counts
    on a shared machine)."""
    import timeit

    from walsync.engine.values import value_problem

    value: dict[str, Any] = {f"field{i}": ("x" * 30 if i % 3 == 0 else i * 1000 if i % 3 == 1
                                           else [1.5, None, True]) for i in range(30)}
    value["nested"] = {"a": [1, 2, 3], "b": {"c": "d" * 200}}
    assert 900 <= len(cbor2.dumps(value)) <= 1100

    def best(fn: Callable[[], Any]) -> float:
        return min(timeit.repeat(fn, number=2000, repeat=7))

    walk = best(lambda: value_problem(value, 1 << 26))
    encode = best(lambda: cbor2.dumps(value))
    assert walk < 2 * encode, (walk, encode)


def test_values_format_md_states_the_limits_the_code_applies() -> None:
    import re

    from walsync.engine import values

    text = Path(values.__file__).with_name("FORMAT.md").read_text()
    section = text.split("## Values", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"nest at most\s+(\d+)\s+deep", section)
    assert m, "FORMAT.md's Values section no longer states the depth limit"
    assert int(m.group(1)) == values.MAX_VALUE_DEPTH
    for name in ("`list`", "`dict`", "`datetime.datetime`", "`datetime.date`", "`uuid.UUID`",
                 "`decimal.Decimal`", "`bytes`", "tuples", "sets", "CBOR"):
        assert name in section, name
