"""The postgres transport's jsonb loader for binary results (a pull page's version
vectors) gives what psycopg's own loader gives: each value, or the error, for any
jsonb text, including what orjson declines (integers past 64 bits, numbers past a
double, nesting past its depth, lone surrogates)."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.types.json import JsonbBinaryLoader

from walsync.sync.postgres import _JsonbBinaryLoader

_OID = psycopg.postgres.types["jsonb"].oid


def _outcome(loader: Any, data: bytes | memoryview) -> tuple[str, Any]:
    try:
        return "value", loader.load(data)
    except (ValueError, RecursionError, psycopg.Error) as exc:
        return "error", type(exc)


def _same(data: bytes) -> None:
    ours, theirs = _JsonbBinaryLoader(_OID), JsonbBinaryLoader(_OID)
    expected = _outcome(theirs, data)
    for given_as in (data, memoryview(data)):
        got = _outcome(ours, given_as)
        assert got == expected, (data[:60], got)
        assert type(got[1]) is type(expected[1]), (data[:60], got)


_EDGES = [b'{"A": 1}', b'{}', b'{"A": 9223372036854775807}', b'{"A": 9223372036854775808}',
          b'{"A": 18446744073709551616}', b'{"A": -9223372036854775809}', b'{"A": 1.5}',
          b'{"A": 1' + b'0' * 400 + b'}', b'1e400', b'{"A": true, "B": null}',
          b'"\\ud800"', b'"\xc3\xa9"', b'"\xff"', b'[' * 5000 + b']' * 5000,
          b'[' * 1020 + b']' * 1020, b'{"A": 1} x', b'', b'NaN', b'{"A": 1, "A": 2}',
          b'\xef\xbb\xbf{"A": 1}', '{"A": 1}'.encode("utf-16"), b' {"A": 1} ',
          b'{"A": -1, "B": 0}', b'{"A": {"B": 1}}', b'{"A": [1]}']


@pytest.mark.parametrize("text", _EDGES)
def test_edges_load_as_psycopg_loads_them(text: bytes) -> None:
    _same(b"\x01" + text)


def test_unknown_version_byte_is_a_data_error() -> None:
    _same(b"\x02{}")
    _same(b"")
    with pytest.raises(psycopg.DataError):
        _JsonbBinaryLoader(_OID).load(b"\x02{}")


_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.integers(-(2**65), -(2**63)) | st.integers(2**63, 2**65),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_json | st.dictionaries(st.text(max_size=4), st.integers(-(2**66), 2**66), max_size=4))
def test_any_json_value_loads_as_psycopg_loads_it(value: Any) -> None:
    _same(b"\x01" + json.dumps(value).encode())
