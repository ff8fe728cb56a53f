"""Strict JSON in and out (RFC 8259), for values on the command line.

Python's json module is not strict on either side: ``json.dumps`` writes NaN
and Infinity, which no JSON parser reads, and ``json.loads`` takes them, takes
numbers that overflow to infinity and raises raw errors on deep nesting or
long integers. The CLI promises strict JSON both ways, so both go through here.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, is_dataclass
from typing import Any

import click

from walsync.engine.values import MAX_VALUE_DEPTH

from .exits import Exit, fail

__all__ = ["jsonable", "parse_value", "text_of"]


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON's types: dataclasses as objects, bytes as ``{"$bytes": hex}``,
    anything else unknown as its ``str``."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return {"$bytes": obj.hex()}
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def text_of(obj: Any, *, key: str | None = None, indent: int | None = None) -> str:
    """``obj`` as strict JSON text. A stored value JSON cannot hold (a non-finite
    float, an integer too long to print) ends the command with an error naming the
    key and where in the value it is (``obj`` is the value, or an object holding it
    under "value")."""
    try:
        return json.dumps(jsonable(obj), sort_keys=True, indent=indent, allow_nan=False)
    except ValueError:
        inner = obj.get("value") if key is not None and isinstance(obj, dict) else None
        where = (inner is not None and _not_json(inner, "value")) or _not_json(obj, "value") \
            or "a part of it"
        of = f"the value of key {key!r}" if key is not None else "the output"
        fail(f"{of} cannot be printed as JSON: {where}",
             "read it through the library (Store.get); the CLI prints strict JSON only",
             Exit.ERROR)


def _not_json(obj: Any, path: str) -> str | None:
    """Where in ``obj`` strict JSON fails: a non-finite float or an integer past the
    digits Python prints (sys.get_int_max_str_digits)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{path} is {obj!r}, which JSON does not have"
    if isinstance(obj, int) and not isinstance(obj, bool):
        try:
            str(obj)  # refused at once when too long (the check goes by the bit length)
        except ValueError:
            return (f"{path} is an integer of about {int(obj.bit_length() * 0.30103) + 1} "
                    f"digits, more than the {sys.get_int_max_str_digits()} Python prints")
        return None
    if is_dataclass(obj) and not isinstance(obj, type):
        return _not_json(asdict(obj), path)
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _not_json(k, f"{path} (a key)") or _not_json(v, f"{path}[{k!r:.40}]")
            if found:
                return found
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            found = _not_json(v, f"{path}[{i}]")
            if found:
                return found
    return None


def parse_value(text: str, what: str = "VALUE", *, plain_hint: str = "") -> Any:
    """``text`` parsed as strict JSON; anything else is a usage error on ``what``."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                          parse_int=_printable_int)
    except json.JSONDecodeError as exc:
        message = f"not JSON ({exc}){plain_hint}"
    except RecursionError:
        message = "JSON nested too deeply to read (the store takes at most " \
                  f"{MAX_VALUE_DEPTH} levels)"
    except ValueError as exc:
        message = f"not strict JSON: {exc}"
    raise click.BadParameter(message, param_hint=what)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (JSON numbers are finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond a double's range (it would be read as "
                         f"{value})")
    return value


def _printable_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits: at most "
                         f"{sys.get_int_max_str_digits()} are read (and printed)") from None
