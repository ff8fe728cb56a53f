"""The STORE file: what marks a directory as a store, and the few facts that must
survive any snapshot rebuild (FORMAT.md, "STORE file").

JSON, replaced atomically (tmp, fsync, rename, fsync dir) on every change:
the node id and its identity chain, the LSN gaps a repair left, the tokens
sync claimed the node id with, the directory's inode, and whether sync holds
the WAL. Every field is read and written here, under one lock (sync's threads
and the committing ones may rewrite it at once).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from . import _fs
from .errors import CorruptionError, FormatVersionError, StoreNotFoundError, WalsyncError
from .identity import NodeIdentity, chain_to_json, resolve_chain

__all__ = [
    "IDENTITIES",
    "STORE_FORMAT_VERSION",
    "StoreFile",
    "create_store_file",
    "directory_identity",
    "read_store_file",
    "write_store_file",
]

log = logging.getLogger("walsync.store")

#: 2: the STORE file may hold the store's node identities (engine/identity.py), which
#: a reader of store 1 would ignore, shipping records under dots they no longer have
STORE_FORMAT_VERSION = 2
#: the store formats this walsync reads (1: the same file without identities)
_STORE_FORMATS_READ = (1, 2)
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: field (and record-meta name) of the identity chain (engine/identity.py); the record
#: that relabels a renewal carries it too: the WAL, not this file, is its commit point
IDENTITIES = "identities"
#: the tokens sync claimed the current node id with, newest first
_INCARNATIONS = "incarnations"
_INCARNATIONS_KEPT = 64
#: the store directory's inode number, which a copy of the directory (cp -r,
#: rsync, tar, a restored file backup) does not keep
_DIRECTORY = "directory_inode"
#: true once sync holds the WAL, false once it was detached
_SYNC_RETAIN = "sync_retain"
#: what sync pulls (sync/scope.py): its prefixes, group, and the fills a widening left
_SYNC_SCOPE = "sync_scope"


def directory_identity(root: Path) -> int | None:
    """The store directory's inode number (None where the file system has none)."""
    ino = os.stat(root).st_ino
    return ino if ino else None


def read_store_file(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_bytes())
        version = int(meta["format"])
        str(meta["node_id"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WalsyncError(
            f"cannot read store metadata {path}: {exc}",
            hint="the STORE file is damaged; restore it from a backup or `walsync restore`",
        ) from None
    if version not in _STORE_FORMATS_READ:
        raise FormatVersionError(
            f"store format version {version} is not supported by this walsync, which reads "
            f"versions {', '.join(map(str, _STORE_FORMATS_READ))}",
            path=str(path),
        )
    return dict(meta)


def write_store_file(path: Path, meta: dict[str, Any]) -> None:
    """Replace the STORE file atomically (tmp, fsync, rename, fsync dir), in the store
    format this walsync writes (a store 1 file rewritten becomes store 2)."""
    meta["format"] = STORE_FORMAT_VERSION
    _fs.atomic_write(path, json.dumps(meta, indent=1, sort_keys=True).encode())


def create_store_file(root: Path, store_file: Path, wal_dir: Path, node_id: str | None) -> None:
    """Write the STORE file, which marks a directory as a store; it is written first.

    What a creation killed half-way can leave behind (the lock file, a
    temporary STORE, an empty wal/) does not stop the next attempt;
    anything else means the directory is not ours.
    """
    if node_id is not None and not _NODE_ID_RE.match(node_id):
        raise ValueError(f"node id {node_id!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    leftovers = {p.name for p in root.iterdir()} - {"LOCK", "STORE.tmp"}
    if leftovers - {"wal"} or (wal_dir.is_dir() and any(wal_dir.iterdir())):
        raise StoreNotFoundError(
            f"{root} is not empty and holds no walsync store (no STORE file)",
            hint="choose an empty or new directory",
        )
    meta = {
        "format": STORE_FORMAT_VERSION,
        "node_id": node_id or secrets.token_hex(8),
        "created_unix_ms": int(time.time() * 1000),
        "lsn_gaps": [],
        _DIRECTORY: directory_identity(root),
    }
    write_store_file(store_file, meta)


class StoreFile:
    """The STORE file of an open store: read once at open, rewritten on each change."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self._root = root
        self._meta = read_store_file(path)
        #: serialises rewrites from several threads (sync's)
        self._lock = threading.Lock()

    def _write(self) -> None:
        write_store_file(self.path, self._meta)

    @property
    def node_id(self) -> str:
        return str(self._meta["node_id"])

    @property
    def min_next_lsn(self) -> int:
        return int(self._meta.get("min_next_lsn", 1))

    def lsn_gaps(self) -> list[tuple[int, int]]:
        """LSN ranges a repair left out of the log (replay accepts a hole there)."""
        return [(int(a), int(b)) for a, b in self._meta.get("lsn_gaps", [])]

    def set_lsn_gaps(self, gaps: list[tuple[int, int]]) -> None:
        with self._lock:
            self._meta["lsn_gaps"] = [list(g) for g in gaps]
            self._write()

    # -- node identity ---------------------------------------------------------

    def resolve_identities(self, logged: Any, asked: str | None, *,
                           writer: bool) -> tuple[NodeIdentity, ...]:
        """The identity chain at open: this file's, or the one the WAL's last renewal
        record carries (``logged``, its record meta) when a crash came between that
        record and the rewrite of this file (which a ``writer`` then rolls forward).
        ``asked``: the node id the caller opened the store with, if any."""
        try:
            chain, rolled_forward = resolve_chain(self._meta.get(IDENTITIES), self.node_id,
                                                  logged)
        except ValueError as exc:
            raise CorruptionError(f"store {self._root}: its node identities are damaged: {exc}",
                                  hint="`walsync restore` builds a new store from the server"
                                  ) from None
        if rolled_forward:
            log.warning("store %s: node id %s was renewed to %s just before the store closed; "
                        "the STORE file is brought up to date", self._root, self.node_id,
                        chain[-1].node_id)
        if asked is not None and asked not in {i.node_id for i in chain}:
            raise ValueError(f"store {self._root} already has node id {chain[-1].node_id!r}, "
                             f"not {asked!r}")
        if writer and rolled_forward:
            self.record_identities(chain, here=False)
        return chain

    def record_identities(self, chain: tuple[NodeIdentity, ...], *, here: bool) -> None:
        """After a renewal (``here``: this process made it, in this directory) or
        after one found in the WAL (rolled forward on open)."""
        with self._lock:
            self._meta["node_id"] = chain[-1].node_id
            self._meta[IDENTITIES] = chain_to_json(chain)
            self._meta[_INCARNATIONS] = []  # the tokens claimed the old id
            if here:
                self._meta[_DIRECTORY] = directory_identity(self._root)
            self._write()

    def copied_from(self) -> int | None:
        """The directory inode recorded, when it is not the store's directory now."""
        recorded = self._meta.get(_DIRECTORY)
        if recorded is None:
            return None
        here = directory_identity(self._root)
        return None if here is None or here == recorded else int(recorded)

    def record_directory(self) -> None:
        """Take the store's directory as its own, if none is recorded."""
        if self._meta.get(_DIRECTORY) is None:
            with self._lock:
                self._meta[_DIRECTORY] = directory_identity(self._root)
                self._write()

    def incarnation_tokens(self) -> list[str]:
        tokens = self._meta.get(_INCARNATIONS, [])
        return [t for t in tokens if type(t) is str] if isinstance(tokens, list) else []

    def add_incarnation_token(self, token: str) -> None:
        with self._lock:
            tokens = [token, *(t for t in self.incarnation_tokens() if t != token)]
            self._meta[_INCARNATIONS] = tokens[:_INCARNATIONS_KEPT]
            self._write()

    # -- sync's hold on the WAL --------------------------------------------------

    @property
    def sync_retain(self) -> bool | None:
        """Whether sync holds the WAL (None: a store from before the field)."""
        held = self._meta.get(_SYNC_RETAIN)
        return None if held is None else bool(held)

    def set_sync_retain(self, held: bool) -> None:
        """Record whether sync holds the WAL (written only on a change)."""
        with self._lock:
            if self._meta.get(_SYNC_RETAIN, False) is held:
                return
            self._meta[_SYNC_RETAIN] = held
            self._write()

    # -- what sync pulls ----------------------------------------------------------------

    @property
    def sync_scope(self) -> dict[str, Any] | None:
        """Sync's scope document (sync/scope.py reads and checks it; None: every key)."""
        doc = self._meta.get(_SYNC_SCOPE)
        return dict(doc) if isinstance(doc, dict) else None

    def set_sync_scope(self, doc: dict[str, Any] | None) -> None:
        with self._lock:
            if doc is None:
                self._meta.pop(_SYNC_SCOPE, None)
            else:
                self._meta[_SYNC_SCOPE] = doc
            self._write()
