"""Version vectors, siblings, the winner rule and the hybrid logical clock. Pure.

A key holds the *maximal* versions ever seen for it (an antichain under
version-vector order). Storing exactly the maximal elements of the set of all
versions received makes merging order-independent: any delivery order, with
duplicates, yields the same antichain. Siblings whose values are identical are
collapsed only when they are *shown* (``visible_siblings``), never in storage,
because collapsing in storage would make the result depend on arrival order.

The sync layer's SQL functions implement the same rules; both are checked
against one shared file of test vectors.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HLC_LOGICAL_BITS",
    "VV",
    "HybridClock",
    "Sibling",
    "Version",
    "compare_vv",
    "dominates_or_equal",
    "join_vv",
    "make_sibling",
    "merge_sibling",
    "visible_siblings",
    "winner",
]

VV = Mapping[str, int]

#: the low 16 bits of an HLC value are its logical counter
HLC_LOGICAL_BITS = 16


def compare_vv(a: VV, b: VV) -> str:
    """'equal', 'before' (a < b), 'after' (a > b) or 'concurrent'. Missing = 0."""
    a_le_b = all(v <= b.get(k, 0) for k, v in a.items())
    b_le_a = all(v <= a.get(k, 0) for k, v in b.items())
    if a_le_b and b_le_a:
        return "equal"
    if a_le_b:
        return "before"
    if b_le_a:
        return "after"
    return "concurrent"


def dominates_or_equal(a: VV, b: VV) -> bool:
    """a ≥ b component-wise."""
    return all(v <= a.get(k, 0) for k, v in b.items())


def join_vv(vectors: Iterable[VV]) -> dict[str, int]:
    out: dict[str, int] = {}
    for vv in vectors:
        for k, v in vv.items():
            if v > out.get(k, 0):
                out[k] = v
    return out


@dataclass(frozen=True, slots=True)
class Version:
    """Where and when one value of a key was written.

    ``origin``/``lsn`` is the write's dot: the node that made it and the LSN of
    its record there. ``vv`` is the version vector over the dot's causal
    context. ``fence`` is the lease fencing token the write carried (0: none).
    """

    origin: str
    lsn: int
    hlc: int
    vv: Mapping[str, int] = field(hash=False, compare=True)
    fence: int = 0
    deleted: bool = False

    @property
    def order_key(self) -> tuple[int, int, str, int]:
        """The winner rule: highest fence, then HLC, then origin, then LSN."""
        return (self.fence, self.hlc, self.origin, self.lsn)

    @property
    def hlc_unix_ms(self) -> int:
        return self.hlc >> HLC_LOGICAL_BITS


@dataclass(frozen=True, slots=True)
class Sibling:
    """One stored version with its encoded value (``data`` None: a tombstone)."""

    version: Version
    codec: int
    data: bytes | None

    @property
    def deleted(self) -> bool:
        return self.data is None

    def to_wire(self) -> list[Any]:
        v = self.version
        return [self.data, self.codec, dict(v.vv), v.hlc, v.origin, v.lsn, v.fence]

    @staticmethod
    def from_wire(item: list[Any]) -> Sibling:
        data, codec, vv, hlc, origin, lsn, fence = item
        return Sibling(Version(origin, lsn, hlc, vv, fence, data is None), codec, data)


_new = object.__new__
_set = object.__setattr__


def make_sibling(origin: str, lsn: int, hlc: int, vv: Mapping[str, int], fence: int,
                 codec: int, data: bytes | None) -> Sibling:
    """``Sibling(Version(origin, lsn, hlc, vv, fence, data is None), codec, data)``,
    built without the frozen dataclasses' generated ``__init__`` (one ``__setattr__``
    call per field through a global): a pull builds one per received entry, and those
    initializers cost more than reading the entry's row. Neither class has a
    ``__post_init__`` or defaults it would skip; a test holds the two constructions
    equal field for field, so a field added to either class must be added here."""
    v = _new(Version)
    _set(v, "origin", origin)
    _set(v, "lsn", lsn)
    _set(v, "hlc", hlc)
    _set(v, "vv", vv)
    _set(v, "fence", fence)
    _set(v, "deleted", data is None)
    s = _new(Sibling)
    _set(s, "version", v)
    _set(s, "codec", codec)
    _set(s, "data", data)
    return s


def winner(siblings: Iterable[Sibling]) -> Sibling:
    return max(siblings, key=lambda s: s.version.order_key)


def merge_sibling(current: list[Sibling], incoming: Sibling) -> list[Sibling] | None:
    """Add one version to a key's antichain; None when it changes nothing.

    Ignored if some sibling dominates or equals it; otherwise it replaces the
    siblings it dominates and joins the rest.
    """
    new_vv = incoming.version.vv
    for s in current:
        if dominates_or_equal(s.version.vv, new_vv):
            return None
    kept = [s for s in current if not dominates_or_equal(new_vv, s.version.vv)]
    kept.append(incoming)
    kept.sort(key=lambda s: s.version.order_key)
    return kept


def visible_siblings(stored: list[Sibling], decode: Any = None) -> list[Sibling]:
    """The siblings a reader sees: identical values collapsed into one.

    The collapsed sibling keeps the winner's metadata and the join of the
    group's version vectors. Values are compared on their encoded bytes after
    ``decode`` (a function from Sibling to comparable bytes; default: the raw
    stored bytes with their codec).
    """
    if len(stored) < 2:
        return list(stored)
    groups: dict[Any, list[Sibling]] = {}
    for s in stored:
        ident = decode(s) if decode is not None else (s.codec, s.data)
        groups.setdefault(ident, []).append(s)
    out = []
    for group in groups.values():
        best = winner(group)
        if len(group) > 1:
            v = best.version
            vv = join_vv(s.version.vv for s in group)
            best = Sibling(Version(v.origin, v.lsn, v.hlc, vv, v.fence, v.deleted), best.codec,
                           best.data)
        out.append(best)
    out.sort(key=lambda s: s.version.order_key)
    return out


class HybridClock:
    """Physical milliseconds in the high bits, a logical counter in the low 16.

    ``tick`` gives every local event a value above both the wall clock and
    every value seen before (``max(now << 16, last + 1)``: a counter overflow
    carries into the milliseconds); ``observe`` folds in a remote value, so a
    host whose clock runs behind still orders its new writes after what it
    has seen. Not thread-safe: the store calls it under its commit lock.
    """

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def tick(self) -> int:
        now = (time.time_ns() // 1_000_000) << HLC_LOGICAL_BITS
        self.last = now if now > self.last else self.last + 1
        return self.last

    def observe(self, remote: int) -> None:
        if remote > self.last:
            self.last = remote
