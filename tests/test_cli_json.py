"""Values in and out of the CLI are strict JSON (RFC 8259).

Python's json module reads NaN, Infinity and 1e999 (as infinity) and writes
NaN and Infinity back, which no JSON parser reads; a deeply nested array and an
integer of more digits than Python converts raised tracebacks. Input that is
not strict JSON is a usage error (exit 2) naming what is wrong, and nothing is
written; a stored value JSON cannot hold (a non-finite float or a huge integer
put through the library) is an error (exit 1) naming the key and where in the
value, printed before any output.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_cli import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_USAGE, assert_error, cli, ok
from walsync.engine import Store


def strict_loads(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in the CLI's output")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def store(tmp_path: Path) -> str:
    path = str(tmp_path / "store")
    ok("init", path)
    return path


@pytest.mark.parametrize(("text", "words"), [
    ("NaN", "NaN is not JSON"),
    ("Infinity", "Infinity is not JSON"),
    ("-Infinity", "-Infinity is not JSON"),
    ("[NaN]", "NaN is not JSON"),
    ('{"a": {"b": Infinity}}', "Infinity is not JSON"),
    ("1e999", "1e999 is beyond a double's range"),
    ("-1e400", "-1e400 is beyond a double's range"),
    ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ("1" * 5000, "an integer of 5000 digits"),
    ("-" + "9" * 5000, "an integer of 5000 digits"),
    ("{'a': 1}", "not JSON"),
], ids=["nan", "inf", "-inf", "nested-nan", "nested-inf", "overflow", "-overflow", "deep",
        "long-int", "-long-int", "python-literal"])
def test_cli_json_input_that_is_not_strict_json_is_a_usage_error(
    store: str, text: str, words: str
) -> None:
    result = cli("put", "-s", store, "k", "--", text)  # ("--": "-Infinity" is no option)
    assert result.exit_code == EXIT_USAGE, result.output
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert cli("get", "-s", store, "k").exit_code == EXIT_NOT_FOUND  # nothing written
    result = cli("conflicts", "resolve", "-s", store, "k", "--", text)
    assert result.exit_code == EXIT_USAGE, result.output
    assert words in result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["put", "k", "[" * 200 + "]" * 200], "nested deeper than 128"),
    (["put", "", "1"], "key is empty"),
    (["put", "k", "--string", "\udcff"], "not valid UTF-8"),  # undecodable bytes in argv
])
def test_cli_json_input_the_store_refuses_is_a_usage_error(
    store: str, args: list[str], words: str
) -> None:
    result = cli(args[0], "-s", store, *args[1:])
    assert_error(result, EXIT_USAGE, words)


def test_cli_json_long_integers_within_the_limit_round_trip(store: str) -> None:
    digits = "7" * (sys.get_int_max_str_digits() - 1)
    ok("put", "-s", store, "big", digits)
    assert ok("get", "-s", store, "big").stdout.strip() == digits
    [line] = ok("scan", "-s", store, "--json").stdout.splitlines()
    assert strict_loads(line) == {"key": "big", "value": int(digits)}


@pytest.mark.parametrize(("value", "where"), [
    (math.nan, "value is nan"),
    ({"a": [1, math.inf]}, "value['a'][1] is inf"),
    ([-math.inf], "value[0] is -inf"),
    (10**5000, "value is an integer of about 5001 digits"),
    ({"n": -(10**6000)}, "value['n'] is an integer of about 6001 digits"),
], ids=["nan", "inf", "-inf", "int", "nested-int"])
def test_cli_json_stored_values_json_cannot_hold_are_errors_naming_where(
    tmp_path: Path, value: Any, where: str
) -> None:
    path = tmp_path / "s"
    with Store.open(path) as s:
        s.put("a", 1)
        s.put("k", value)
        s.put("z", 2)
    for args in (["get", "k"], ["get", "k", "--json"], ["scan"], ["scan", "--json"]):
        result = cli(args[0], "-s", str(path), *args[1:])
        assert_error(result, EXIT_ERROR, "the value of key 'k' cannot be printed as JSON",
                     where)
        assert result.stdout == ""  # not half a listing
    assert strict_loads(ok("get", "-s", str(path), "a", "--json").stdout)["value"] == 1
    assert ok("scan", "-s", str(path), "--keys-only").stdout.split() == ["a", "k", "z"]


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                                                                 allow_infinity=False),
              st.text()),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_cli_json_what_put_takes_get_prints_back_as_strict_json(store: str, value: Any) -> None:
    ok("put", "-s", store, "k", "--", json.dumps(value))
    assert strict_loads(ok("get", "-s", store, "k").stdout) == value
    assert strict_loads(ok("get", "-s", store, "k", "--json").stdout)["value"] == value
    [line] = ok("scan", "-s", store, "k", "--json").stdout.splitlines()
    assert strict_loads(line) == {"key": "k", "value": value}
