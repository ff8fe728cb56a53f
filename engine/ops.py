"""What a caller hands a store and what it gets back, and the checks of every
argument that reaches the disk.

The operations (``Put``, ``Delete``, ``expect=ANY``), the results (``CommitResult``
and the rest) and ``Batch`` are the store's vocabulary; the checks run before
anything is written: a key, fence or value accepted here and unreadable later
would fail every read, write and sync of that key for good.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import cbor2

from .errors import ConflictError, InvalidKeyError, InvalidValueError, ValueTooLargeError
from .keyspace import RESERVED_PREFIX, reserved_refusal
from .options import Durability, StoreOptions
from .record import CODEC_NONE, compress_value
from .values import value_problem
from .versions import Sibling, Version, winner

if TYPE_CHECKING:
    from .events import Event

__all__ = [
    "ANY",
    "FENCE_LIMIT",
    "Batch",
    "CheckpointResult",
    "CommitResult",
    "CompactResult",
    "Delete",
    "Put",
    "StoreInfo",
    "VersionedValue",
    "check_expect",
    "check_fence",
    "check_key",
    "durability_of",
    "operations",
    "prepare",
]


class _Any:
    """The default of ``expect=``: no check."""

    def __repr__(self) -> str:
        return "ANY"


#: ``expect=ANY`` (the default) checks nothing; ``expect=None`` means the key
#: must not exist; ``expect=<Version>`` means it must still be that version.
ANY: Any = _Any()

#: fencing tokens are PostgreSQL bigints on the sync server
FENCE_LIMIT = 1 << 63


@dataclass(frozen=True)
class Put:
    key: str
    value: Any
    expect: Any = ANY
    fence: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    expect: Any = ANY
    fence: int = 0


@dataclass(frozen=True)
class CommitResult:
    lsn: int
    hlc: int
    durability: Durability


@dataclass(frozen=True)
class CheckpointResult:
    lsn: int
    segments_removed: int
    bytes_removed: int


@dataclass(frozen=True)
class CompactResult:
    checkpoint_lsn: int
    snapshot_bytes_before: int
    snapshot_bytes_after: int


@dataclass(frozen=True)
class VersionedValue:
    value: Any
    version: Version


@dataclass(frozen=True)
class StoreInfo:
    path: str
    node_id: str
    applied_lsn: int
    checkpoint_lsn: int
    next_lsn: int
    retain_floor: int | None
    segments: int
    wal_bytes: int
    snapshot_bytes: int
    keys: int
    #: WAL kept only because the server has not acknowledged it (the retain floor)
    wal_bytes_held_for_sync: int = 0


class _Committer(Protocol):
    """What a Batch commits through (the Store)."""

    def commit(self, ops: Sequence[Put | Delete], *, durability: Durability | str | None = None,
               notes: Sequence[Event] = (), internal: bool = False) -> CommitResult: ...


class Batch:
    """Operations committed together, atomically: all or none survive a crash.

    Use as ``with store.batch() as b: b.put(...); b.delete(...)``; it commits
    when the block exits without an exception (``b.result`` then holds the
    CommitResult) and discards everything otherwise.
    """

    def __init__(self, store: _Committer, durability: Durability | str | None,
                 fence: int = 0, internal: bool = False) -> None:
        self._store = store
        self._durability = durability
        self._fence = fence
        #: walsync's own layers' door into the reserved namespace (engine/keyspace.py)
        self._internal = internal
        self.ops: list[Put | Delete] = []
        #: events published with the commit, after its CommitEvent (see Store.commit)
        self.notes: list[Event] = []
        self.result: CommitResult | None = None

    def put(self, key: str, value: Any, *, expect: Any = ANY, fence: int | None = None) -> None:
        self.ops.append(Put(key, value, expect, self._fence if fence is None else fence))

    def delete(self, key: str, *, expect: Any = ANY, fence: int | None = None) -> None:
        self.ops.append(Delete(key, expect, self._fence if fence is None else fence))

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and self.ops:
            self.result = self._store.commit(self.ops, durability=self._durability,
                                             notes=self.notes, internal=self._internal)


# -- checks ------------------------------------------------------------------


def check_key(key: Any, max_bytes: int) -> None:
    """A key a write may use: a non-empty string of valid UTF-8, without NUL (the
    sync server stores keys as text, which cannot hold it), at most ``max_bytes``."""
    if type(key) is not str:
        raise InvalidKeyError(f"key {key!r:.60} is not a string but {type(key).__name__}")
    if not key:
        raise InvalidKeyError("key is empty")
    try:
        size = len(key.encode())
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r:.60} is not valid UTF-8: {exc.reason}") from None
    if size > max_bytes:
        raise InvalidKeyError(f"key {key[:40]!r}... is {size} bytes, above the limit of "
                              f"{max_bytes}")
    if "\x00" in key:
        raise InvalidKeyError(f"key {key!r:.60} holds a NUL character, which the sync server "
                              "cannot store")


def check_fence(fence: Any, where: str) -> None:
    if type(fence) is not int:
        raise TypeError(f"fence= for {where} takes an int (a lease's fencing token), not "
                        f"{type(fence).__name__} ({fence!r:.60})")
    if not 0 <= fence < FENCE_LIMIT:
        raise ValueError(f"fence= for {where} is {fence}, outside 0..2**63-1 (the sync "
                         "server's range); nothing was written")


def durability_of(value: Any) -> Durability:
    if isinstance(value, Durability):
        return value
    if type(value) is str:
        try:
            return Durability(value)
        except ValueError:
            pass
    else:
        raise TypeError(f"durability= takes 'none', 'local', 'remote' or a Durability, not "
                        f"{type(value).__name__} ({value!r:.60})")
    raise ValueError(f"durability= takes 'none', 'local' or 'remote', not {value!r:.60}")


def operations(ops: Any) -> list[Put | Delete]:
    """The operations of a commit as a list (a generator is read once)."""
    if isinstance(ops, Put | Delete | str | bytes) or not hasattr(ops, "__iter__"):
        raise TypeError(f"commit takes a list of Put and Delete operations, not "
                        f"{type(ops).__name__} ({ops!r:.60})")
    return ops if type(ops) is list else list(ops)


def prepare(op: Put | Delete, options: StoreOptions,
            internal: bool = False) -> tuple[int, bytes | None]:
    """Check an operation and encode its value (codec, bytes; None for a delete),
    before anything is written or locked. Only ``internal`` writes (walsync's own
    layers) may enter the reserved namespace (engine/keyspace.py)."""
    if type(op) is not Put and type(op) is not Delete:
        raise TypeError(f"a commit takes Put and Delete operations, not "
                        f"{type(op).__name__} ({op!r:.60})")
    key = op.key
    check_key(key, options.max_key_bytes)
    if not internal and key.startswith(RESERVED_PREFIX):
        raise InvalidKeyError(reserved_refusal(key) or key,
                              hint=f"keys starting with {RESERVED_PREFIX!r} are walsync's")
    check_fence(op.fence, f"key {key!r}")
    expect = op.expect
    if expect is not ANY and expect is not None and not isinstance(expect, Version):
        raise TypeError(f"expect= for key {key!r} takes a Version, None or ANY, not "
                        f"{type(expect).__name__} ({expect!r:.60})")
    if isinstance(op, Delete):
        return CODEC_NONE, None
    value = op.value
    problem = value_problem(value, options.max_value_bytes)
    if problem is not None:
        raise InvalidValueError(
            f"value for key {key!r} cannot be stored: {problem}; nothing was written"
        )
    try:
        encoded = cbor2.dumps(value)
    except (cbor2.CBOREncodeError, TypeError, ValueError, RecursionError) as exc:
        problem = value_problem(value, options.max_value_bytes, thorough=True)
        raise InvalidValueError(
            f"value for key {key!r} cannot be encoded: {problem or exc}; nothing was written"
        ) from None
    if len(encoded) > options.max_value_bytes:
        raise ValueTooLargeError(key, len(encoded), options.max_value_bytes)
    if len(encoded) > options.compress_above_bytes:
        return compress_value(encoded, options.compress_level)
    return CODEC_NONE, encoded


def check_expect(key: str, expect: Any, current: list[Sibling]) -> None:
    """``expect=`` against the key's current siblings: ConflictError if it no longer holds."""
    best = winner(current) if current else None
    actual = None if best is None or best.deleted else best.version
    if expect is None:
        if actual is not None:
            raise ConflictError(key, None, actual)
        return
    if not isinstance(expect, Version):
        raise TypeError(f"expect= takes a Version, None or ANY, not {type(expect).__name__}")
    if actual is None or (actual.origin, actual.lsn) != (expect.origin, expect.lsn):
        raise ConflictError(key, expect, actual)
