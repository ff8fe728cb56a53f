"""The snapshot's conflicts table: the keys whose entry holds more than one sibling.

Kept in the same LMDB transaction as the entries it lists, by every writer of
the data table (commit, merge, replay, repair, tombstone purge), so listing
the store's conflicts costs what they are, not the store's size (FORMAT.md,
table ``conflicts``). A snapshot from before the table is read entry by entry
until its next writer's open builds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import lmdb

from .seal import CONFLICTS_BUILT_NAME, CONFLICTS_DB, holds_siblings, seal, unseal

if TYPE_CHECKING:
    from .snapshot_store import SnapshotStore

__all__ = ["ConflictsTable", "listed_conflicts", "open_table"]


class ConflictsTable:
    """The table's handle (None: a reader of a snapshot without it), and whether it
    may hold keys (true until a transaction saw it empty)."""

    __slots__ = ("handle", "listed")

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.listed = True

    def index(self, txn: lmdb.Transaction,
              puts: Iterable[tuple[bytes, bytes | list[bytes]]]) -> None:
        """Keep the table in step with entries written in ``txn`` (the empty key, a
        record's meta op, is no entry): every entry holding siblings is listed.
        Local writes leave one sibling: while the table is empty (the usual case,
        remembered between transactions) they cost no LMDB call. A key listed though
        its entry no longer holds siblings (left by a transaction that was aborted
        after the table was seen empty) is harmless: readers check the entry."""
        table = self.handle
        if table is None:
            return
        listed = self.listed
        for key, entry in puts:
            if not key:
                continue
            if holds_siblings(entry):
                txn.put(key, b"", db=table)
                listed = True
            elif listed:
                txn.delete(key, db=table)
        if listed:
            self.listed = int(txn.stat(table)["entries"]) > 0


def open_table(snapshot: SnapshotStore, *, build: bool) -> ConflictsTable:
    """The table of an opened snapshot (its handle None: a reader of a snapshot
    without it). With ``build`` (a writer's open), the table is built first where
    it is missing or incomplete: a snapshot from before it existed."""
    try:
        table = snapshot.env.open_db(CONFLICTS_DB, create=not snapshot.readonly)
    except lmdb.NotFoundError:
        return ConflictsTable(None)
    if build and snapshot.get_meta(CONFLICTS_BUILT_NAME) is None:
        def transaction() -> None:
            with snapshot.env.begin(write=True, db=snapshot.data_db) as txn:
                _build(txn, table, snapshot.meta_db)
        snapshot.write("conflicts table build", transaction)
    return ConflictsTable(table)


def _build(txn: lmdb.Transaction, table: Any, meta_db: Any) -> None:
    """List every key whose entry holds siblings, in the write transaction ``txn``
    of the data table. An entry whose seal fails is listed too: listing it reads
    it, and says it is damaged."""
    txn.drop(table, delete=False)
    for raw_key, raw in txn.cursor():
        key = bytes(raw_key)
        entry = unseal(key, raw)
        if entry is None or holds_siblings(entry):
            txn.put(key, b"", db=table)
    txn.put(CONFLICTS_BUILT_NAME, seal(CONFLICTS_BUILT_NAME, b"\x01"), db=meta_db)


def listed_conflicts(
    snapshot: SnapshotStore, txn: lmdb.Transaction, start: bytes, stop: bytes | None
) -> Iterator[tuple[bytes, bytes]]:
    """Keys in [start, stop) whose entry holds more than one sibling, in key
    order, with their entries (checked): from the conflicts table, or by reading
    every entry where no writer has built it yet (a reader of an older store)."""
    table = snapshot.conflicts.handle
    if table is None or snapshot.get_meta(CONFLICTS_BUILT_NAME, txn) is None:
        for key, entry in snapshot.iter_range(txn, start, stop, False):
            if holds_siblings(entry):
                yield key, entry
        return
    cur = txn.cursor(db=table)
    if not cur.set_range(start):
        return
    for raw_key in cur.iternext(keys=True, values=False):
        key = bytes(raw_key)
        if stop is not None and key >= stop:
            return
        listed = snapshot.entry_in(txn, key)
        if listed is not None and holds_siblings(listed):
            yield key, listed
