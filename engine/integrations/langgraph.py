"""A LangGraph checkpointer on a walsync store (the ``walsync-store[langgraph]`` extra).

Switching a LangGraph app from ``SqliteSaver`` is one import and one line::

    from walsync.engine.integrations.langgraph import WalsyncSaver

    with WalsyncSaver.from_path("checkpoints") as saver:
        graph = builder.compile(checkpointer=saver)
        graph.invoke(inputs, {"configurable": {"thread_id": "order-42"}})

This is the only module of walsync that imports ``langgraph``. It is one
module of about 1,100 lines, above the project's usual 500, because it is one
class: LangGraph's ``BaseCheckpointSaver``, whose reads, writes and maintenance
calls share one key layout and one lock, and whose async methods build the same
operations and await the store's commit; the pure key and id escapes sit at its end.

What is durable when a call returns: ``put`` commits the checkpoint record,
the channel values that changed (``new_versions``) and its index entries in
one commit; ``put_writes`` commits a task's pending writes in one
batch. With the store's default durability (``local``) both return only after
the WAL is fsynced, so LangGraph's ``durability="sync"`` really is durable: a
process killed with SIGKILL resumes on the next ``invoke(None, config)`` with
the same ``thread_id`` from the last checkpoint, and tasks whose writes were
recorded are not run again. The maintenance calls (``delete_thread``,
``delete_for_runs``, ``copy_thread``, ``prune``) are each one atomic batch too.

Keys, under ``.walsync/`` + ``prefix`` (``root``; by default ``.walsync/lg/``, in
the reserved namespace user keys cannot enter: engine/keyspace.py), one value
per key::

    <root>c/<thread>/<ns>/<checkpoint_id>           the checkpoint (without channel
                                                    values), its metadata and parent id
    <root>b/<thread>/<ns>/<channel>/<version>       one channel value (written once
                                                    per version)
    <root>w/<thread>/<ns>/<checkpoint_id>/<task_id>/<idx>   one pending write
    <root>r/<run_id>/<thread>/<ns>/<checkpoint_id>  index: the checkpoints of a run
    <root>t/<thread>/<checkpoint_id>!<ns>           index: the checkpoints of a thread
                                                    outside the root namespace, in id order
    <root>layout                                    the key layout (3)

So a checkpoint writes only the channels that changed, and ``put_writes``
only its task's writes. The record kind comes before the thread so that
listing checkpoints never walks over writes or channel values. Segments are
escaped so that none contains ``/`` (``%`` -> ``%25``, ``/`` -> ``%2F``,
``~`` -> ``%7E``; a segment longer than 120 bytes becomes ``~`` and a hash,
keeping keys under walsync's 511-byte limit). Checkpoint ids get an
order-preserving escape instead (``.`` -> ``.0``, ``/`` -> ``.1``), so key
order is id order: LangGraph's ids (uuid6) increase with time, hence ``list``
returns newest first and ``get_tuple`` without an id finds the latest by a
reverse scan with limit 1. The raw ids are stored inside the values, so keys
need no parsing (``list(None)`` only sorts ``c`` keys on their last segment).

``list`` reads newest first, a page at a time, and stops at ``limit``, so
``list(config, limit=1)`` reads the same few keys on a thread of ten
checkpoints and on one of a million, and ``alist`` yields each page as it is
read. With ``checkpoint_ns`` in the config it reverse-scans that namespace's
``c`` keys. Without it, it merges two newest-first streams: the root
namespace's ``c`` keys, and the thread index ``t``, whose key puts the id
before the namespace, so that one reverse scan orders all the thread's
subgraph namespaces by id (each entry is then fetched from ``c``). Root
checkpoints, most of a thread's, have no ``t`` entry: a put in the root
namespace writes no key for the index. The id in a ``t`` key is escaped so
that it sorts like the id even though more follows it: characters up to
``"`` become ``"`` and two hex digits, ``.`` -> ``.0``, ``/`` -> ``.1``,
and ``!`` ends it, below every escaped character. ``list(None)`` (every
thread) sorts the keys of ``c``, then reads records lazily.

A walsync before the reserved namespace kept these keys under ``prefix``
itself (``lg/...``), where user keys live now. A saver created on such a store
moves them into the namespace first, kind by kind (``b``, ``w``, ``r``, ``t``,
then ``c``), a thousand keys per commit, each commit putting keys under the
root and deleting them where they were, and the layout key last: a move cut
short is finished by the next saver, and once the layout key is in the
namespace keys under ``prefix`` are the user's and never moved again. A
read-only store is not moved: the saver reads the checkpoints where they are.

An older layout is migrated when a saver is created on the store: every
``c`` record outside the root namespace gets its ``t`` entry (layout 1 had
none; layout 2 also indexed root checkpoints, and those entries go), a
thousand records per commit, and ``lg/layout`` is written last, so a
migration cut short is finished by the next saver. A read-only store is not
migrated; a thread's list then reads and sorts the whole thread. A layout
this walsync does not know is refused. A fresh store gets ``lg/layout`` with
its first checkpoint: making a saver writes nothing.

Values are what LangGraph's serializer (``self.serde``, ``dumps_typed`` /
``loads_typed``; JsonPlusSerializer by default, no pickle) produced, stored as
``[type, bytes]``; walsync compresses large values itself. Every checkpoint
record carries ``format`` (1); a record of an unknown format is refused.

Semantics follow LangGraph's own savers (SqliteSaver, InMemorySaver): a
regular write (index >= 0) already stored for (task_id, idx) is kept, the
special writes of ``WRITES_IDX_MAP`` (error, interrupt, ...) overwrite;
pending writes come back in ``writes_sort_key`` order; ``list`` filters on
top-level metadata keys by equality, ``before`` on checkpoint id, and without
``checkpoint_ns`` in the config lists every namespace of the thread.

Threads: a saver (and its store) may be shared by any number of threads and
asyncio tasks. Concurrent puts share the store's group commit, the awaited
ones too. The async methods build the operations the sync ones do and await
the commit (engine/aio.py: the loop never waits on the disk, and no worker
thread is involved); their reads are the sync reads, which never wait on a
disk either (README, "asyncio"). A cancelled ``aput`` still commits, as any
awaited commit does. Maintenance calls wait for running puts and block new
ones while they run, so that collecting unreferenced channel values never
races a put that references them; an awaited call waits for the lock without
blocking the loop and holds it until its commit is done, even if cancelled.
Reads take no lock; a read concurrent with a maintenance call may see a
checkpoint whose writes are already gone.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import hashlib
import heapq
import random
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint import base as _lg_base
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from ..aio import submit
from ..errors import ConflictError, FormatVersionError
from ..keyspace import RESERVED_PREFIX
from ..options import Durability
from ..store import Delete, Put, ReadView, Store

__all__ = ["DEFAULT_PREFIX", "LAYOUT", "RECORD_FORMAT", "WalsyncSaver"]

#: the saver's keys go under the reserved namespace + this (``.walsync/lg/``)
DEFAULT_PREFIX = "lg/"
#: the format of checkpoint records; bump it (and migrate) when their shape changes
RECORD_FORMAT = 1
#: a key segment longer than this (in UTF-8 bytes) is replaced by its hash
_MAX_SEGMENT_BYTES = 120
#: the key layout (``<prefix>layout``): 1 had no thread index and no layout key,
#: 2 indexed the root namespace too
LAYOUT = 3
#: the most checkpoint records (or index entries) ``list`` reads per scan
_LIST_PAGE = 64
#: the first scan of an unbounded ``list``: small, so the first item comes cheap
_FIRST_PAGE = 4
#: checkpoint records read (and indexed) per commit when migrating an older layout
_MIGRATE_CHUNK = 1000
_STRATEGIES = ("keep_latest", "delete")
#: the order an older walsync's keys are moved into the namespace: the checkpoint
#: records last, so that while any key is left to move, the records say so
_LEGACY_MOVE_ORDER = ("b/", "w/", "r/", "t/", "c/")


def _writes_sort_key_4_2(task_path: str, task_id: str = "", idx: int = 0) -> tuple[str, str, int]:
    """LangGraph's order of a super-step's writes, for langgraph-checkpoint 4.2.

    4.3 names this order (``writes_sort_key``) and requires ``get_tuple`` to
    return pending writes in it; 4.2 has no such function but runs tasks in
    the same order, so returning writes in it there is right too.
    """
    return (task_path, task_id, idx)


#: LangGraph's own key where it has one (it may refine it), else the same order
_writes_sort_key: Callable[[str, str, int], tuple[str, str, int]] = getattr(
    _lg_base, "writes_sort_key", _writes_sort_key_4_2)


class WalsyncSaver(BaseCheckpointSaver[str]):
    """LangGraph's ``BaseCheckpointSaver`` on a walsync :class:`~engine.Store`.

    ``WalsyncSaver(store)`` uses a store the caller opened (and closes);
    ``WalsyncSaver.from_path(path)`` opens and closes one itself.
    ``durability`` overrides the store's default for this saver's commits
    (``"none"`` trades the power-loss guarantee for speed).
    """

    def __init__(
        self,
        store: Store,
        *,
        serde: SerializerProtocol | None = None,
        prefix: str = DEFAULT_PREFIX,
        durability: Durability | str | None = None,
    ) -> None:
        super().__init__(serde=serde)
        if not prefix or not prefix.endswith("/") or prefix.startswith(RESERVED_PREFIX):
            raise ValueError(f"prefix must be non-empty and end with '/', got {prefix!r} (it "
                             f"is taken within walsync's reserved namespace {RESERVED_PREFIX!r})")
        self.store = store
        self.prefix = prefix
        #: where the saver's keys start: ``prefix`` within the reserved namespace (on a
        #: read-only store an older walsync wrote, ``prefix`` itself: see the module doc)
        self.root = RESERVED_PREFIX + prefix
        self.durability = None if durability is None else Durability(durability)
        self._lock = _SharedLock()
        self._layout_key = f"{self.root}layout"
        #: a fresh store's layout key, still to be written with the first put
        self._layout_unwritten = False
        #: False only on a read-only store in an older layout: no trusted thread index
        self._indexed = self._ensure_layout()

    @classmethod
    @contextmanager
    def from_path(
        cls,
        path: str | Path,
        *,
        serde: SerializerProtocol | None = None,
        prefix: str = DEFAULT_PREFIX,
        **store_options: Any,
    ) -> Iterator[WalsyncSaver]:
        """Open (or create) the store at ``path``, yield a saver on it, close the store.

        ``store_options`` go to :meth:`Store.open` (``durability="none"``, ...).
        """
        with Store.open(path, **store_options) as store:
            yield cls(store, serde=serde, prefix=prefix)

    # -- keys ----------------------------------------------------------------

    def _thread_prefix(self, kind: str, thread_id: str) -> str:
        return f"{self.root}{kind}/{_segment(thread_id)}/"

    def _ns_prefix(self, kind: str, thread_id: str, ns: str) -> str:
        return f"{self._thread_prefix(kind, thread_id)}{_segment(ns)}/"

    def _checkpoint_key(self, thread_id: str, ns: str, checkpoint_id: str) -> str:
        return self._ns_prefix("c", thread_id, ns) + _sortable(checkpoint_id)

    def _writes_prefix(self, thread_id: str, ns: str, checkpoint_id: str) -> str:
        return f"{self._ns_prefix('w', thread_id, ns)}{_sortable(checkpoint_id)}/"

    def _blob_key(self, thread_id: str, ns: str, channel: str, version: Any) -> str:
        return self._blob_prefix_key(self._ns_prefix("b", thread_id, ns), channel, version)

    @staticmethod
    def _blob_prefix_key(blobs: str, channel: str, version: Any) -> str:
        return f"{blobs}{_segment(channel)}/{_segment(str(version))}"

    def _run_key(self, run_id: str, thread_id: str, ns: str, checkpoint_id: str) -> str:
        return (f"{self.root}r/{_segment(run_id)}/{_segment(thread_id)}/{_segment(ns)}/"
                f"{_sortable(checkpoint_id)}")

    def _index_key(self, thread_id: str, ns: str, checkpoint_id: str) -> str:
        return f"{self._thread_prefix('t', thread_id)}{_index_id(checkpoint_id)}!{_segment(ns)}"

    def _index_put(self, thread_id: str, ns: str, checkpoint_id: str) -> Put:
        return Put(self._index_key(thread_id, ns, checkpoint_id), [thread_id, ns, checkpoint_id])

    # -- layout --------------------------------------------------------------

    def _ensure_layout(self) -> bool:
        """Bring the store to the current layout unless it is there; False if it
        cannot (read-only): then the thread index is not to be trusted.

        Making a saver on a fresh store writes nothing (the first put writes
        the layout key). A migration commits with durability ``local`` whatever
        the saver's or the store's: it only derives keys from what is stored,
        and must not need a replicator (``remote``) that is attached later.
        """
        if self.store.get(self._layout_key) is None and self._legacy_found():
            if self.store.readonly:
                self.root = self.prefix
                self._layout_key = f"{self.root}layout"
            else:
                self._move_legacy()
        layout_key = self._layout_key
        found = self.store.get(layout_key)
        if found == LAYOUT:
            return True
        if found not in (None, 2):
            raise FormatVersionError(
                f"LangGraph checkpoints under {self.root!r} have key layout {found!r} "
                f"({layout_key!r}); this walsync reads layouts 1 to {LAYOUT}",
            )
        if found is None and not self.store.keys(f"{self.root}c/", limit=1):
            self._layout_unwritten = True
            return True
        if self.store.readonly:
            return False
        start: str | None = None
        while True:
            rows = builtins.list(self.store.scan(f"{self.root}c/", start=start,
                                                 limit=_MIGRATE_CHUNK))
            ops: builtins.list[Put | Delete] = []
            for key, record in rows:
                _check_format(key, record)
                thread_id, ns = record["thread_id"], record["checkpoint_ns"]
                if ns:
                    ops.append(self._index_put(thread_id, ns, record["checkpoint_id"]))
                elif found == 2:  # layout 2 indexed the root namespace too
                    ops.append(Delete(self._index_key(thread_id, ns, record["checkpoint_id"])))
            if len(rows) < _MIGRATE_CHUNK:
                ops.append(Put(layout_key, LAYOUT))
                self.store.commit(ops, durability=Durability.LOCAL, internal=True)
                return True
            if ops:
                self.store.commit(ops, durability=Durability.LOCAL, internal=True)
            start = rows[-1][0] + "\x00"

    def _legacy_found(self) -> bool:
        """Whether an older walsync's checkpoints are under ``prefix`` (outside the
        namespace), or what a move into it cut short left there."""
        old = self.prefix
        if self.store.get(f"{old}layout") is not None:
            return True
        rows = builtins.list(self.store.scan(f"{old}c/", limit=1))
        return bool(rows) and type(rows[0][1]) is dict and "checkpoint_id" in rows[0][1]

    def _move_legacy(self) -> None:
        """Move an older walsync's keys from ``prefix`` into the namespace (module doc):
        each commit moves up to a thousand keys whole, the layout key goes last."""
        old = self.prefix
        for kind in _LEGACY_MOVE_ORDER:
            while True:
                rows = builtins.list(self.store.scan(f"{old}{kind}", limit=_MIGRATE_CHUNK))
                if not rows:
                    break
                ops: builtins.list[Put | Delete] = []
                for key, value in rows:
                    ops += [Put(self.root + key[len(old):], value), Delete(key)]
                self.store.commit(ops, durability=Durability.LOCAL, internal=True)
        layout = self.store.get(f"{old}layout")
        if layout is not None:
            self.store.commit([Put(self._layout_key, layout), Delete(f"{old}layout")],
                              durability=Durability.LOCAL, internal=True)

    # -- reads ---------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint named by ``config``, or the thread's latest if it names none."""
        conf = config["configurable"]
        thread_id = str(conf["thread_id"])
        ns = conf.get("checkpoint_ns", "")
        checkpoint_id = get_checkpoint_id(config)
        # one read transaction for the record, its values and its writes
        with self.store.snapshot() as view:
            if checkpoint_id:
                key = self._checkpoint_key(thread_id, ns, checkpoint_id)
                record = view.get(key)
                if record is None:
                    return None
                return self._tuple(view, key, record, config)
            rows = view.scan(self._ns_prefix("c", thread_id, ns), reverse=True, limit=1)
            if not rows:
                return None
            return self._tuple(view, rows[0][0], rows[0][1], None)

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,  # noqa: A002 - LangGraph's parameter name
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Checkpoints matching ``config``, ``filter`` and ``before``, newest first."""
        if limit is not None and limit <= 0:
            return
        before_id = get_checkpoint_id(before) if before else None
        conf = config["configurable"] if config else {}
        wanted_id = get_checkpoint_id(config) if config else None
        ns = conf.get("checkpoint_ns")
        page = _FIRST_PAGE if filter or limit is None else min(limit, _LIST_PAGE)
        rows: Iterator[tuple[str, Any]]
        if config is None:
            rows = self._all_rows(before_id)
        elif ns is not None:
            rows = self._namespace_rows(str(conf["thread_id"]), ns, wanted_id, before_id, page)
        elif not self._indexed:
            rows = self._scan_sorted(self._thread_prefix("c", str(conf["thread_id"])), before_id)
        else:
            # the root namespace from c, the others through the thread index, merged
            thread_id = str(conf["thread_id"])
            prefix = self._thread_prefix("t", thread_id)
            if wanted_id:
                entries = _newest_first(self.store, f"{prefix}{_index_id(wanted_id)}!", None,
                                        _LIST_PAGE)
            else:
                entries = _newest_first(
                    self.store, prefix, prefix + _index_id(before_id) if before_id else None,
                    page)
            rows = heapq.merge(
                self._namespace_rows(thread_id, "", wanted_id, before_id, page),
                self._records_of(entries, before_id),
                key=lambda row: row[1]["checkpoint_id"], reverse=True)
        for key, record in rows:
            if wanted_id and record["checkpoint_id"] != wanted_id:
                continue
            metadata = None
            if filter:
                metadata = self._metadata(key, record)
                if not all(metadata.get(k) == v for k, v in filter.items()):
                    continue
            with self.store.snapshot() as view:
                found = self._tuple(view, key, record, None, metadata)
            yield found
            if limit is not None:
                limit -= 1
                if limit <= 0:
                    return

    def _namespace_rows(
        self, thread_id: str, ns: str, wanted_id: str | None, before_id: str | None,
        page: int,
    ) -> Iterator[tuple[str, Any]]:
        """One namespace's checkpoint records, newest first (or the one wanted)."""
        if wanted_id:
            key = self._checkpoint_key(thread_id, ns, wanted_id)
            record = self.store.get(key)
            return iter([(key, record)] if record is not None and (
                before_id is None or wanted_id < before_id) else [])
        prefix = self._ns_prefix("c", thread_id, ns)
        return _newest_first(self.store, prefix,
                             prefix + _sortable(before_id) if before_id else None, page)

    def _all_rows(self, before_id: str | None) -> Iterator[tuple[str, Any]]:
        """Every checkpoint record, newest first: the keys sorted, the records read lazily.

        A ``c`` key ends with its id's order-preserving escape, so the keys
        sort on their last segment without reading a record.
        """
        keys = self.store.keys(f"{self.root}c/")
        cut = _sortable(before_id) if before_id is not None else None
        keys = [k for k in keys if cut is None or k.rsplit("/", 1)[1] < cut]
        keys.sort(key=lambda k: k.rsplit("/", 1)[1], reverse=True)
        for key in keys:
            record = self.store.get(key)
            if record is not None:
                yield key, record

    def _records_of(
        self, entries: Iterator[tuple[str, Any]], before_id: str | None
    ) -> Iterator[tuple[str, Any]]:
        """The checkpoint records that thread index entries point at, in their order.

        An entry whose record is gone (deleted after the index was read) is skipped.
        """
        for _, (thread_id, ns, checkpoint_id) in entries:
            if before_id is not None and checkpoint_id >= before_id:
                continue
            key = self._checkpoint_key(thread_id, ns, checkpoint_id)
            record = self.store.get(key)
            if record is not None:
                yield key, record

    def _scan_sorted(self, prefix: str, before_id: str | None) -> Iterator[tuple[str, Any]]:
        """A thread of a read-only store not yet migrated: read it all, sort by id."""
        found = [(key, rec) for key, rec in self.store.scan(prefix)
                 if before_id is None or rec["checkpoint_id"] < before_id]
        found.sort(key=lambda row: row[1]["checkpoint_id"], reverse=True)
        return iter(found)

    def _tuple(
        self,
        view: ReadView,
        key: str,
        record: dict[str, Any],
        config: RunnableConfig | None,
        metadata: CheckpointMetadata | None = None,
    ) -> CheckpointTuple:
        _check_format(key, record)
        thread_id = record["thread_id"]
        ns = record["checkpoint_ns"]
        checkpoint_id = record["checkpoint_id"]
        checkpoint = self.serde.loads_typed(_typed(record["checkpoint"]))
        values: dict[str, Any] = {}
        blobs = self._ns_prefix("b", thread_id, ns)
        for channel, version in checkpoint["channel_versions"].items():
            blob = view.get(self._blob_prefix_key(blobs, channel, version))
            if blob is not None:
                values[channel] = self.serde.loads_typed(_typed(blob))
        parent = record["parent_checkpoint_id"]
        return CheckpointTuple(
            config=config or _config(thread_id, ns, checkpoint_id),
            checkpoint=cast(Checkpoint, {**checkpoint, "channel_values": values}),
            metadata=metadata if metadata is not None else self._metadata(key, record),
            parent_config=_config(thread_id, ns, parent) if parent else None,
            pending_writes=self._pending_writes(view, thread_id, ns, checkpoint_id),
        )

    def _metadata(self, key: str, record: dict[str, Any]) -> CheckpointMetadata:
        _check_format(key, record)
        return cast(CheckpointMetadata, self.serde.loads_typed(_typed(record["metadata"])))

    def _pending_writes(self, view: ReadView, thread_id: str, ns: str,
                        checkpoint_id: str) -> builtins.list[PendingWrite]:
        rows = [rec for _, rec in view.scan(self._writes_prefix(thread_id, ns, checkpoint_id))]
        rows.sort(key=lambda r: _writes_sort_key(r["task_path"], r["task_id"], r["idx"]))
        return [(r["task_id"], r["channel"], self.serde.loads_typed(_typed(r["value"])))
                for r in rows]

    # -- writes --------------------------------------------------------------

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store a checkpoint and the channel values in ``new_versions``, atomically."""
        ops, stored = self._put_ops(config, checkpoint, metadata, new_versions)
        with self._lock.shared():
            self.store.commit(ops, durability=self.durability, internal=True)
        self._layout_unwritten = False
        return stored

    def _put_ops(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> tuple[builtins.list[Put | Delete], RunnableConfig]:
        conf = config["configurable"]
        thread_id = str(conf["thread_id"])
        ns = conf.get("checkpoint_ns", "")
        checkpoint_id = checkpoint["id"]
        values = checkpoint["channel_values"]
        rest = {k: v for k, v in checkpoint.items() if k != "channel_values"}
        full_metadata = get_checkpoint_metadata(config, metadata)
        run_id = full_metadata.get("run_id")
        blobs = self._ns_prefix("b", thread_id, ns)
        ops: builtins.list[Put | Delete] = [
            Put(self._blob_prefix_key(blobs, channel, version),
                list(self.serde.dumps_typed(values[channel])))
            for channel, version in new_versions.items() if channel in values
        ]
        ops.append(Put(self._checkpoint_key(thread_id, ns, checkpoint_id), {
            "format": RECORD_FORMAT,
            "thread_id": thread_id,
            "checkpoint_ns": ns,
            "checkpoint_id": checkpoint_id,
            "parent_checkpoint_id": conf.get("checkpoint_id"),
            "run_id": None if run_id is None else str(run_id),
            "checkpoint": list(self.serde.dumps_typed(rest)),
            "metadata": list(self.serde.dumps_typed(full_metadata)),
        }))
        if ns:
            ops.append(self._index_put(thread_id, ns, checkpoint_id))
        if run_id is not None:
            ops.append(Put(self._run_key(str(run_id), thread_id, ns, checkpoint_id),
                           [thread_id, ns, checkpoint_id]))
        if self._layout_unwritten:
            ops.append(Put(self._layout_key, LAYOUT))
        return ops, _config(thread_id, ns, checkpoint_id)

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes for a checkpoint, atomically.

        A regular write already stored for (task_id, idx) is kept (a retried
        task must not change what was recorded); special writes overwrite.
        """
        prefix, records = self._writes_records(config, writes, task_id, task_path)
        if not records:
            return
        with self._lock.shared():
            # A task's writes are usually new, so no read first: each regular
            # write is put with expect=None, and one already stored (a retried
            # task, or a concurrent writer) fails the commit with ConflictError
            # instead of being overwritten; then what is stored is read once and
            # the rest committed.
            stored: set[str] = set()
            while ops := self._writes_ops(records, stored):
                try:
                    self.store.commit(ops, durability=self.durability, internal=True)
                    return
                except ConflictError as exc:
                    self._writes_conflict(exc, prefix, records, stored)

    def _writes_records(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> tuple[str, dict[str, tuple[int, dict[str, Any]]]]:
        conf = config["configurable"]
        thread_id = str(conf["thread_id"])
        ns = conf.get("checkpoint_ns", "")
        checkpoint_id = str(conf["checkpoint_id"])
        prefix = f"{self._writes_prefix(thread_id, ns, checkpoint_id)}{_segment(task_id)}/"
        records: dict[str, tuple[int, dict[str, Any]]] = {}
        for position, (channel, value) in enumerate(writes):
            idx = WRITES_IDX_MAP.get(channel, position)
            records[f"{prefix}{idx}"] = (idx, {
                "task_id": task_id, "task_path": task_path, "idx": idx, "channel": channel,
                "value": list(self.serde.dumps_typed(value)),
            })
        return prefix, records

    @staticmethod
    def _writes_ops(records: dict[str, tuple[int, dict[str, Any]]],
                    stored: set[str]) -> builtins.list[Put | Delete]:
        """The writes still to commit: the special ones, and the regular ones not stored."""
        return [Put(key, rec, expect=None) if idx >= 0 else Put(key, rec)
                for key, (idx, rec) in records.items() if idx < 0 or key not in stored]

    def _writes_conflict(self, exc: ConflictError, prefix: str,
                         records: dict[str, tuple[int, dict[str, Any]]],
                         stored: set[str]) -> None:
        """A regular write is taken: note it (and, the first time, all stored ones)."""
        # The other write may still be in its group commit, not yet visible to
        # reads: the conflict itself says the key is taken.
        if exc.key in stored or exc.key not in records:
            raise exc
        first = not stored
        stored.add(exc.key)
        if first:
            stored.update(self.store.keys(prefix))

    # -- maintenance ---------------------------------------------------------

    def delete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint, write and channel value of a thread, atomically."""
        with self._lock.exclusive():
            self._commit_ops(self._thread_deletes(str(thread_id)))

    def _for_runs_deletes(self, run_ids: Sequence[str]) -> builtins.list[Put | Delete]:
        doomed: dict[tuple[str, str], set[str]] = {}
        ops: builtins.list[Put | Delete] = []
        for run_id in run_ids:
            for key, (thread_id, ns, checkpoint_id) in self.store.scan(
                    f"{self.root}r/{_segment(str(run_id))}/"):
                ops.append(Delete(key))
                doomed.setdefault((thread_id, ns), set()).add(checkpoint_id)
        for (thread_id, ns), ids in doomed.items():
            records = dict(self._records(thread_id, ns))
            kept = {cid: rec for cid, rec in records.items() if cid not in ids}
            for checkpoint_id in ids & records.keys():
                ops.extend(self._checkpoint_deletes(records[checkpoint_id], run_index=False))
            ops.extend(self._unreferenced_blobs(thread_id, ns, kept.values()))
        return ops

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints (and their writes) of these runs, atomically.

        Channel values no checkpoint of the thread references any more go too.
        As LangGraph warns, deleting a run whose writes a live thread's
        ``DeltaChannel`` is rebuilt from breaks that channel.
        """
        with self._lock.exclusive():
            self._commit_ops(self._for_runs_deletes(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, write and channel value of a thread to another, atomically.

        The whole parent chain is copied, so the target resumes (and rebuilds
        delta channels) exactly like the source. Keys the target already has
        with the same ids are overwritten; its other checkpoints stay.
        """
        with self._lock.exclusive():
            self._commit_ops(self._copy_ops(str(source_thread_id), str(target_thread_id)))

    def _copy_ops(self, source: str, target: str) -> builtins.list[Put | Delete]:
        ops: builtins.list[Put | Delete] = []
        for kind in ("b", "w"):
            src_prefix = self._thread_prefix(kind, source)
            dst_prefix = self._thread_prefix(kind, target)
            for key, value in self.store.scan(src_prefix):
                ops.append(Put(dst_prefix + key[len(src_prefix):], value))
        src_prefix = self._thread_prefix("c", source)
        dst_prefix = self._thread_prefix("c", target)
        for key, record in self.store.scan(src_prefix):
            _check_format(key, record)
            copied = {**record, "thread_id": target}
            ops.append(Put(dst_prefix + key[len(src_prefix):], copied))
            if record["checkpoint_ns"]:
                ops.append(self._index_put(target, record["checkpoint_ns"],
                                           record["checkpoint_id"]))
            if record["run_id"] is not None:
                ops.append(Put(
                    self._run_key(record["run_id"], target, record["checkpoint_ns"],
                                  record["checkpoint_id"]),
                    [target, record["checkpoint_ns"], record["checkpoint_id"]]))
        return ops

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Prune threads, atomically: ``"keep_latest"`` or ``"delete"`` (everything).

        ``keep_latest`` keeps the newest checkpoint of each namespace with its
        writes, and, when the thread uses ``DeltaChannel``, the ancestors (with
        their writes) back to the nearest stored value of every delta channel
        still counting updates (``counters_since_delta_snapshot``), so the
        kept checkpoint rebuilds the same state. Unreferenced channel values go.
        """
        if strategy not in _STRATEGIES:
            raise ValueError(f"unknown prune strategy {strategy!r}; use one of {_STRATEGIES}")
        with self._lock.exclusive():
            self._commit_ops(self._prune_ops(thread_ids, strategy))

    def _prune_ops(self, thread_ids: Sequence[str], strategy: str) -> builtins.list[Put | Delete]:
        ops: builtins.list[Put | Delete] = []
        for thread_id in map(str, thread_ids):
            if strategy == "delete":
                ops.extend(self._thread_deletes(thread_id))
                continue
            by_ns: dict[str, dict[str, dict[str, Any]]] = {}
            for key, record in self.store.scan(self._thread_prefix("c", thread_id)):
                _check_format(key, record)
                by_ns.setdefault(record["checkpoint_ns"], {})[record["checkpoint_id"]] = record
            for ns, records in by_ns.items():
                kept = self._keep_latest(thread_id, ns, records)
                for checkpoint_id, record in records.items():
                    if checkpoint_id not in kept:
                        ops.extend(self._checkpoint_deletes(record, run_index=True))
                ops.extend(self._unreferenced_blobs(
                    thread_id, ns, [records[cid] for cid in kept]))
        return ops

    def _keep_latest(self, thread_id: str, ns: str, records: dict[str, dict[str, Any]]) -> set[
            str]:
        latest = max(records)
        kept = {latest}
        metadata = self.serde.loads_typed(_typed(records[latest]["metadata"]))
        missing = set(metadata.get("counters_since_delta_snapshot") or ())
        current: str | None = latest
        while missing and current is not None and current in records:
            kept.add(current)
            versions = self._checkpoint(records[current])["channel_versions"]
            for channel in list(missing):
                version = versions.get(channel)
                if version is not None and self.store.get(
                        self._blob_key(thread_id, ns, channel, version)) is not None:
                    missing.discard(channel)
            current = records[current]["parent_checkpoint_id"]
        return kept

    def _checkpoint(self, record: dict[str, Any]) -> Any:
        return self.serde.loads_typed(_typed(record["checkpoint"]))

    def _records(self, thread_id: str, ns: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, record in self.store.scan(self._ns_prefix("c", thread_id, ns)):
            _check_format(key, record)
            yield record["checkpoint_id"], record

    def _checkpoint_deletes(self, record: dict[str, Any], *, run_index: bool) -> builtins.list[
            Put | Delete]:
        thread_id, ns, cid = record["thread_id"], record["checkpoint_ns"], record["checkpoint_id"]
        ops: builtins.list[Put | Delete] = [Delete(self._checkpoint_key(thread_id, ns, cid))]
        if ns:
            ops.append(Delete(self._index_key(thread_id, ns, cid)))
        ops.extend(Delete(k) for k in self.store.keys(self._writes_prefix(thread_id, ns, cid)))
        if run_index and record["run_id"] is not None:
            ops.append(Delete(self._run_key(record["run_id"], thread_id, ns, cid)))
        return ops

    def _unreferenced_blobs(
        self, thread_id: str, ns: str, kept: Any
    ) -> builtins.list[Put | Delete]:
        referenced = {
            self._blob_key(thread_id, ns, channel, version)
            for record in kept
            for channel, version in self._checkpoint(record)["channel_versions"].items()
        }
        return [Delete(k) for k in self.store.keys(self._ns_prefix("b", thread_id, ns))
                if k not in referenced]

    def _thread_deletes(self, thread_id: str) -> builtins.list[Put | Delete]:
        ops: builtins.list[Put | Delete] = []
        for key, record in self.store.scan(self._thread_prefix("c", thread_id)):
            ops.append(Delete(key))
            if record.get("run_id") is not None:
                ops.append(Delete(self._run_key(record["run_id"], thread_id,
                                                record["checkpoint_ns"],
                                                record["checkpoint_id"])))
        for kind in ("w", "b", "t"):
            ops.extend(Delete(k) for k in self.store.keys(self._thread_prefix(kind, thread_id)))
        return ops

    def _commit_ops(self, ops: Sequence[Put | Delete]) -> None:
        if ops:
            self.store.commit(ops, durability=self.durability, internal=True)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """``<counter, 32 digits>.<random>``, as LangGraph's SQLite and Postgres savers do."""
        if current is None:
            counter = 0
        elif isinstance(current, int):
            counter = current
        else:
            counter = int(current.split(".")[0])
        return f"{counter + 1:032}.{random.random():016}"

    # -- async twins: the same operations, the commit awaited (engine/aio.py) --

    async def _acommit(self, ops: Sequence[Put | Delete], release: Callable[[], None]) -> None:
        """Commit ``ops`` awaited; ``release`` the lock taken for it once the commit is
        done, not when the awaiting task is cancelled (the commit goes on)."""
        try:
            _, done = submit(self.store, ops, durability=self.durability, internal=True)
        except BaseException:
            release()
            raise
        done.add_done_callback(lambda _: release())
        await asyncio.shield(done)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self.get_tuple(config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,  # noqa: A002 - LangGraph's parameter name
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        # list() reads lazily, a page at a time; the loop runs other tasks
        # between items, so a long thread never holds it
        for item in self.list(config, filter=filter, before=before, limit=limit):
            yield item
            await asyncio.sleep(0)

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        ops, stored = self._put_ops(config, checkpoint, metadata, new_versions)
        await self._lock.acquire_shared_async()
        await self._acommit(ops, self._lock.release_shared)
        self._layout_unwritten = False
        return stored

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        prefix, records = self._writes_records(config, writes, task_id, task_path)
        if not records:
            return
        await self._lock.acquire_shared_async()
        stored: set[str] = set()
        try:
            while ops := self._writes_ops(records, stored):
                try:
                    _, done = submit(self.store, ops, durability=self.durability,
                                     internal=True)
                except ConflictError as exc:
                    self._writes_conflict(exc, prefix, records, stored)
                    continue
                break
            else:
                self._lock.release_shared()
                return
        except BaseException:
            self._lock.release_shared()
            raise
        done.add_done_callback(lambda _: self._lock.release_shared())
        await asyncio.shield(done)

    async def _amaintain(self, ops_of: Callable[[], builtins.list[Put | Delete]]) -> None:
        await self._lock.acquire_exclusive_async()
        try:
            ops = ops_of()
        except BaseException:
            self._lock.release_exclusive()
            raise
        if not ops:
            self._lock.release_exclusive()
            return
        await self._acommit(ops, self._lock.release_exclusive)

    async def adelete_thread(self, thread_id: str) -> None:
        await self._amaintain(lambda: self._thread_deletes(str(thread_id)))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._amaintain(lambda: self._for_runs_deletes(run_ids))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._amaintain(lambda: self._copy_ops(str(source_thread_id),
                                                     str(target_thread_id)))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        if strategy not in _STRATEGIES:
            raise ValueError(f"unknown prune strategy {strategy!r}; use one of {_STRATEGIES}")
        await self._amaintain(lambda: self._prune_ops(thread_ids, strategy))


class _SharedLock:
    """Any number of shared holders at once, or one exclusive holder; not reentrant.

    Puts hold it shared (they still group-commit together); maintenance calls
    hold it exclusively. A waiting exclusive holder keeps new shared holders
    out, so a stream of puts cannot starve it; when it is done, the shared
    holders that were waiting go before the next exclusive one, so a loop of
    maintenance calls cannot starve the puts either. Threads wait on the
    condition; an awaiting task waits on a future of its loop, which every
    change that may let it in resolves (``call_soon_threadsafe``), and counts
    among the waiters as a thread does.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._shared_waiting = 0
        #: shared waiters let in ahead of the next exclusive holder
        self._admitted = 0
        #: tasks waiting: their loop and the future that wakes them
        self._wakers: builtins.list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def _shared_blocked(self) -> bool:
        return self._exclusive or bool(self._exclusive_waiting and not self._admitted)

    def _exclusive_blocked(self) -> bool:
        return self._exclusive or bool(self._shared or self._admitted)

    def _notify(self) -> None:
        """Wake every waiter, threads and tasks, to look again. Holds ``_cv``."""
        self._cv.notify_all()
        wakers, self._wakers = self._wakers, []
        for loop, ready in wakers:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(_resolve, ready)

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            self._shared_waiting += 1
            try:
                while self._shared_blocked():
                    self._cv.wait()
            except BaseException:
                self._admitted = min(self._admitted, self._shared_waiting - 1)
                self._notify()
                raise
            finally:
                self._shared_waiting -= 1
            if self._admitted:
                self._admitted -= 1
            self._shared += 1
        try:
            yield
        finally:
            self.release_shared()

    def release_shared(self) -> None:
        with self._cv:
            self._shared -= 1
            if not self._shared:
                self._notify()

    async def acquire_shared_async(self) -> None:
        """``shared``'s acquisition, awaited; ``release_shared`` ends it."""
        loop = asyncio.get_running_loop()
        with self._cv:
            self._shared_waiting += 1
        try:
            while True:
                with self._cv:
                    if not self._shared_blocked():
                        self._shared_waiting -= 1
                        if self._admitted:
                            self._admitted -= 1
                        self._shared += 1
                        return
                    ready: asyncio.Future[None] = loop.create_future()
                    self._wakers.append((loop, ready))
                await ready
        except BaseException:
            with self._cv:
                self._shared_waiting -= 1
                self._admitted = min(self._admitted, self._shared_waiting)
                self._notify()
            raise

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._exclusive_waiting += 1
            try:
                while self._exclusive_blocked():
                    self._cv.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            self.release_exclusive()

    def release_exclusive(self) -> None:
        with self._cv:
            self._exclusive = False
            self._admitted = self._shared_waiting
            self._notify()

    async def acquire_exclusive_async(self) -> None:
        """``exclusive``'s acquisition, awaited; ``release_exclusive`` ends it."""
        loop = asyncio.get_running_loop()
        with self._cv:
            self._exclusive_waiting += 1
        try:
            while True:
                with self._cv:
                    if not self._exclusive_blocked():
                        self._exclusive_waiting -= 1
                        self._exclusive = True
                        return
                    ready: asyncio.Future[None] = loop.create_future()
                    self._wakers.append((loop, ready))
                await ready
        except BaseException:
            with self._cv:
                self._exclusive_waiting -= 1
                self._notify()
            raise


def _resolve(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


@functools.lru_cache(maxsize=4096)
def _segment(text: str) -> str:
    """A key segment holding no '/': escaped, or hashed when long (cached: ids repeat)."""
    escaped = text.replace("%", "%25").replace("/", "%2F").replace("~", "%7E")
    if len(escaped.encode()) <= _MAX_SEGMENT_BYTES:
        return escaped
    return "~" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _sortable(checkpoint_id: str) -> str:
    """A key segment holding no '/' that sorts exactly like ``checkpoint_id``.

    '.' -> '.0' and '/' -> '.1' is a prefix-free code whose two escapes sit,
    like '.' and '/', between '-' and '0', so key order is id order.
    """
    return checkpoint_id.replace(".", ".0").replace("/", ".1")


#: ``_index_id``'s escapes: every character up to '"' (so '!' can end the id), '.' and '/'
_INDEX_ID_ESCAPES = {c: f'"{c:02x}' for c in range(ord('"') + 1)} | {
    ord("."): ".0", ord("/"): ".1"}
_INDEX_ID_PLAIN = re.compile(r'[^\x00-"./]*')


def _index_id(checkpoint_id: str) -> str:
    """A key part holding no '/' or '!' that sorts like ``checkpoint_id`` when '!' follows.

    Each character maps to a code that sorts like it and is no prefix of
    another (characters up to '"' -> '"' and two hex digits, below '#';
    '.' and '/' -> '.0' and '.1', between '-' and '0'), and '!' sorts below
    every code: so ``_index_id(a) + "!" + x < _index_id(b) + "!" + y``
    whenever ``a < b``, whatever ``x`` and ``y``.
    """
    if _INDEX_ID_PLAIN.fullmatch(checkpoint_id):  # uuids: nothing to escape
        return checkpoint_id
    return checkpoint_id.translate(_INDEX_ID_ESCAPES)


def _newest_first(
    store: Store, prefix: str, end: str | None, page_size: int
) -> Iterator[tuple[str, Any]]:
    """Keys under ``prefix`` below ``end``, last first, read a page at a time.

    Pages grow from ``page_size`` to ``_LIST_PAGE``: a caller that stops
    early read little, one that reads on pays few scans.
    """
    while True:
        rows = builtins.list(store.scan(prefix, end=end, reverse=True, limit=page_size))
        yield from rows
        if len(rows) < page_size:
            return
        end = rows[-1][0]
        page_size = max(page_size, min(2 * page_size, _LIST_PAGE))


def _config(thread_id: str, ns: str, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                             "checkpoint_id": checkpoint_id}}


def _typed(value: Any) -> tuple[str, bytes]:
    """A stored ``[type, bytes]`` back into what ``loads_typed`` takes."""
    return value[0], value[1]


def _check_format(key: str, record: dict[str, Any]) -> None:
    if record.get("format") != RECORD_FORMAT:
        raise FormatVersionError(
            f"LangGraph checkpoint record {key!r} has format {record.get('format')!r}; "
            f"this walsync reads format {RECORD_FORMAT}",
        )
