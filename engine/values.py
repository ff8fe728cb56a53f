"""The values a store takes: a closed set of types, those cbor2 reads back equal and
of the same type (FORMAT.md, "Values").

``put`` refuses anything else with InvalidValueError naming the key and the
path inside the value, before anything is written: a value stored and read
back as something else (a subclass as its base, a zone as an offset) would
break the workflow code that wrote it, silently. The check is a fast walk over
the value's types; ``thorough`` also says where a refused value went wrong.
Pure, no I/O.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import cbor2

__all__ = ["MAX_VALUE_DEPTH", "value_problem"]


#: containers a value may nest. cbor2 decodes at most 400 levels (a tagged value
#: takes two) and its encoder crashes the process on some thousands, so deeper
#: values are refused before they are encoded.
MAX_VALUE_DEPTH = 128
#: the scalars that round-trip through cbor2 exactly, whatever their value
#: (exact types: a subclass, say an IntEnum, would come back as its base)
_PLAIN = frozenset({str, bytes, int, float, bool, type(None)})
_ONE_MINUTE = datetime.timedelta(minutes=1)


def _special_ok(value: Any) -> bool:
    """The scalars beyond JSON's that round-trip only within limits (see FORMAT.md)."""
    t = type(value)
    if t is datetime.datetime:
        # cbor2 writes the ISO form and reads it back with a fixed offset: a zone
        # (ZoneInfo) would come back as an offset, a naive time cannot be written,
        # and an offset with seconds cannot be read back
        tz = value.tzinfo
        return type(tz) is datetime.timezone and tz.utcoffset(None) % _ONE_MINUTE == \
            datetime.timedelta(0)
    if t is decimal.Decimal:
        # infinities and NaN come back as floats, -0 as 0
        return bool(value.is_finite() and not (value.is_zero() and value.is_signed()))
    return t is datetime.date or t is uuid.UUID


_SPECIAL = frozenset({datetime.datetime, datetime.date, decimal.Decimal, uuid.UUID})


def value_problem(value: Any, max_items: int, *, thorough: bool = False) -> str | None:
    """Why the store could not give ``value`` back exactly as it was put, or None.

    The store takes a closed set of types (FORMAT.md, "Values"): what cbor2
    writes and reads back equal and of the same type. Checked before a value is
    encoded, so that nothing the store cannot read back is ever acknowledged
    (cbor2 happily writes tags it then refuses to read, tuples that come back as
    lists, ...). ``max_items`` bounds the containers' members counted in all (a
    value with more cannot fit the size limit anyway; it also stops cycles and
    shared references that would multiply the work). The common case is a walk
    over exact types; only a refused value is walked again, for the message.
    ``thorough`` (for a value the encoder then refused) also checks that every
    string is valid UTF-8, to name the one that is not.
    """
    if not thorough and _fits(value, max_items):
        return None
    problem = _describe_problem(value, max_items)
    if problem is None and not thorough:  # the two walks apply the same rules
        raise AssertionError(f"value refused without a reason: {value!r:.200}")
    return problem


def _fits(value: Any, max_items: int) -> bool:
    t = type(value)
    if t in _PLAIN:
        return True
    if t is not dict and t is not list:
        return t in _SPECIAL and _special_ok(value)
    plain, special = _PLAIN, _SPECIAL
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        obj, depth = stack.pop()
        items += len(obj)
        if depth > MAX_VALUE_DEPTH or items > max_items:
            return False
        if type(obj) is dict:
            for k, v in obj.items():
                tk = type(k)
                if tk is not str and tk is not int:
                    return False
                tv = type(v)
                if tv in plain:
                    continue
                if tv is dict or tv is list:
                    stack.append((v, depth + 1))
                elif tv not in special or not _special_ok(v):
                    return False
        else:
            for v in obj:
                tv = type(v)
                if tv in plain:
                    continue
                if tv is dict or tv is list:
                    stack.append((v, depth + 1))
                elif tv not in special or not _special_ok(v):
                    return False
    return True


def _describe_problem(value: Any, max_items: int) -> str | None:
    """The first part of ``value`` outside the set, by its path, and what to do."""
    seen = 0
    stack: list[tuple[Any, str, int]] = [(value, "value", 1)]
    while stack:
        obj, path, depth = stack.pop()
        t = type(obj)
        if t is str and not _utf8(obj):
            return f"{path} is a string that is not valid UTF-8 (a lone surrogate)"
        if t in _PLAIN or (t in _SPECIAL and _special_ok(obj)):
            continue
        if t is dict or t is list:
            if depth > MAX_VALUE_DEPTH:
                return (f"{path} is nested deeper than {MAX_VALUE_DEPTH} levels (or is "
                        "cyclic): cbor2 could not read it back")
            seen += len(obj)
            if seen > max_items:
                return (f"{path} holds more than {max_items} members in all (or shares or "
                        "cycles through containers): it cannot fit max_value_bytes")
            if t is list:
                stack.extend((v, f"{path}[{i}]", depth + 1)
                             for i, v in reversed(list(enumerate(obj))))
                continue
            for k in obj:
                if type(k) is not str and type(k) is not int:
                    return (f"{path} has a key of type {type(k).__name__} ({k!r:.40}): "
                            "dictionary keys are str or int")
                if type(k) is str and not _utf8(k):
                    return f"{path} has a key that is not valid UTF-8 (a lone surrogate)"
            stack.extend((v, f"{path}[{k!r}]", depth + 1) for k, v in reversed(obj.items()))
            continue
        return f"{path} is {_what(obj)}"
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _what(obj: Any) -> str:
    """What is wrong with a value that is not in the set, and the way out."""
    t = type(obj)
    if t is datetime.datetime:
        if obj.tzinfo is None:
            return "a naive datetime: give it a timezone (e.g. datetime.timezone.utc)"
        return (f"a datetime with tzinfo {obj.tzinfo!r}, which would come back as another: "
                "use a fixed offset of whole minutes (dt.astimezone(datetime.timezone.utc))")
    if t is decimal.Decimal:
        return f"Decimal({str(obj)!r}), which would come back as another value: use a float"
    if t is tuple:
        return "a tuple, which would come back as a list: store a list"
    if t in (set, frozenset):
        return f"a {t.__name__}: store a list (sorted, if order should not matter)"
    if t in (bytearray, memoryview):
        return f"a {t.__name__}: store bytes(...)"
    if isinstance(obj, cbor2.CBORTag):
        return (f"a CBOR tag ({obj.tag}), which the store may not read back: store the "
                "tagged value as plain data")
    for base in (int, float, str, bytes, dict, list):
        if isinstance(obj, base):
            return (f"a {t.__name__} (a subclass of {base.__name__}, which would come back "
                    f"as a plain {base.__name__}): store {base.__name__}(...)")
    return (f"of type {t.__module__}.{t.__qualname__}: values are dict, list, str, bytes, int, "
            "float, bool, None, datetime (fixed offset), date, Decimal or UUID")
