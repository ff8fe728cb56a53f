"""The LMDB side of a store: the only package that imports ``lmdb``.

The snapshot holds the current siblings of every key and the applied LSN
(``SnapshotStore``, snapshot_store.py). Beside it: the seal every value
carries (seal.py), opening LMDB files and what its errors mean (env.py), the
thread gate a map resize waits on (gate.py), the conflicts table (conflicts.py),
whole-file work such as the base copy, compaction and a repair's load
(bulk.py), and the page-by-page check verify and repair use (pagecheck.py).
"""

from .snapshot_store import ApplyPuts, Entry, SnapshotStore

__all__ = ["ApplyPuts", "Entry", "SnapshotStore"]
