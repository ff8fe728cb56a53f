"""What keeps the snapshot trustworthy across a power loss: its base copy and the OPEN marker.

LMDB runs without fsync between checkpoints (the WAL is the source of truth).
A *process* crash loses nothing of it: the kernel still holds and writes every
page. A *machine* crash (power loss, kernel panic) can leave the file torn:
pages written since the last sync may be lost or half-written while LMDB's
meta page points at them, and pages freed after the sync may have been
overwritten. Replaying the WAL cannot mend a tree whose pages are garbage.

So every checkpoint writes a compact, synced copy of the snapshot, the base,
into ``snapshot-base/`` and WAL segments are removed only below the base's
LSN: base + WAL always rebuild the state. A writer leaves the ``OPEN`` marker
(with the machine's boot id) while it has the store open and removes it on a
clean close. Opening a store whose marker names another boot means the machine
went down under it: the snapshot is moved to ``quarantine/`` and rebuilt from
the base (or from empty if no checkpoint ever made one) and the WAL. Where the
system gives no boot id, every unclean shutdown is treated that way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import _fs
from .errors import CorruptionError, StoreStateError
from .layout import StoreLayout
from .lock import writer_is_alive
from .snapshot import SnapshotStore
from .snapshot.bulk import copy_to
from .snapshot.env import SnapshotUninitialisedError
from .snapshot.pagecheck import CheckedFile
from .snapshot.seal import REPAIR_HINT, SNAPSHOT_FORMAT_VERSION

__all__ = [
    "BASE_FORMAT_VERSION",
    "SnapshotRebuild",
    "base_outdated",
    "check_base",
    "clear_open_marker",
    "finish_base_swap",
    "read_base_lsn",
    "rebuild_snapshot",
    "trust_snapshot",
    "untrusted_snapshot_reason",
    "write_base",
    "write_open_marker",
]

log = logging.getLogger("walsync.store")

BASE_FORMAT_VERSION = 1
_BASE_INFO = "BASE"


@dataclass(frozen=True)
class SnapshotRebuild:
    """Reported by an open that did not trust the snapshot it found."""

    reason: str
    #: the LSN the base held (0: no checkpoint had made one; rebuilt from empty)
    base_lsn: int
    #: where the untrusted snapshot was moved (never deleted by walsync)
    quarantine: str


def _swap_paths(layout: StoreLayout) -> tuple[Path, Path]:
    base = layout.base_dir
    return base.with_name(base.name + ".tmp"), base.with_name(base.name + ".old")


def write_base(layout: StoreLayout, snapshot: SnapshotStore) -> int:
    """Replace the base with a synced copy of the snapshot; return its LSN.

    Written beside the old one and swapped by two renames: a crash leaves the
    old base, or the complete new one (``finish_base_swap``). Every value of the
    copy is checked before it replaces the old base: a damaged snapshot must not
    take the one good copy with it.
    """
    fresh, old = _swap_paths(layout)
    if fresh.exists():
        _fs.remove_tree(fresh)
    _fs.make_dir(fresh)
    lsn = copy_to(snapshot, fresh)
    _check_copy(fresh, lsn, snapshot.data_file)
    info = {"format": BASE_FORMAT_VERSION, "lsn": lsn, "created_unix_ms": int(time.time() * 1000),
            "snapshot_format": SNAPSHOT_FORMAT_VERSION}
    _fs.atomic_write(fresh / _BASE_INFO, json.dumps(info).encode())
    if layout.base_dir.exists():
        _fs.rename(layout.base_dir, old)
    _fs.rename(fresh, layout.base_dir)
    _fs.fsync_dir(layout.root)
    if old.exists():
        _fs.remove_tree(old)
    return lsn


def _check_copy(directory: Path, lsn: int, source: str) -> None:
    copy = CheckedFile(directory, lock=False)
    try:
        for _ in copy.entries(lookups=False):
            pass
    finally:
        copy.close()
    check = copy.check
    if check.intact and check.applied_lsn != lsn:
        check.add(f"the copy holds LSN {check.applied_lsn}, the snapshot said {lsn}")
    if not check.intact:
        _fs.remove_tree(directory)
        # the copy is gone: name the file it was made of
        found = str(check.problems[0]).replace(check.path, source)
        raise CorruptionError(
            f"the snapshot is damaged, so no base copy was made of it (the old base stays): "
            f"{found}", hint=REPAIR_HINT)


def finish_base_swap(layout: StoreLayout) -> None:
    """Complete or undo a base swap that a crash interrupted."""
    fresh, old = _swap_paths(layout)
    if not layout.base_dir.exists():
        if (fresh / _BASE_INFO).exists():  # written and synced before the swap began
            _fs.rename(fresh, layout.base_dir)
        elif old.exists():
            _fs.rename(old, layout.base_dir)
        _fs.fsync_dir(layout.root)
    for leftover in (fresh, old):
        if leftover.exists():
            _fs.remove_tree(leftover)


def read_base_lsn(layout: StoreLayout) -> int:
    """The LSN the base holds; 0 if there is none yet."""
    path = layout.base_dir / _BASE_INFO
    try:
        info = json.loads(path.read_bytes())
        return int(info["lsn"])
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptionError(f"cannot read the snapshot base's description: {exc}",
                              path=str(path)) from None


def base_outdated(layout: StoreLayout) -> bool:
    """Whether the base holds values of an older snapshot format (written before
    entries were sealed): the writer replaces it with a copy of its sealed snapshot."""
    try:
        info = json.loads((layout.base_dir / _BASE_INFO).read_bytes())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise CorruptionError(f"cannot read the snapshot base's description: {exc}",
                              path=str(layout.base_dir / _BASE_INFO)) from None
    return not isinstance(info, dict) or info.get("snapshot_format", 1) != SNAPSHOT_FORMAT_VERSION


def check_base(layout: StoreLayout) -> None:
    """Read every value of the base and raise the first damage found: a snapshot
    rebuilt from a base is only as good as the base (its checksums, its tree)."""
    lsn = read_base_lsn(layout)
    try:
        base = CheckedFile(layout.base_dir, lock=False)
    except (FileNotFoundError, SnapshotUninitialisedError):
        raise CorruptionError("the snapshot base's data file is missing or empty",
                              path=str(layout.base_dir / "data.mdb"),
                              hint="run `walsync repair`") from None
    try:
        for _ in base.entries():
            pass
    finally:
        base.close()
    check = base.check
    if check.intact and check.applied_lsn != lsn:
        check.add(f"the base holds LSN {check.applied_lsn}, its BASE file says {lsn}")
    if not check.intact:
        first = check.problems[0]
        raise CorruptionError(
            f"the snapshot base cannot be trusted: {first}",
            hint="run `walsync repair`: it rebuilds the snapshot from what checks out in "
            "the base, the snapshot and the WAL, and names anything lost",
        )


def untrusted_snapshot_reason(layout: StoreLayout) -> str | None:
    """Why the snapshot cannot be trusted, or None if the last writer closed
    cleanly or only its process died (same boot: the kernel kept its pages)."""
    try:
        raw = layout.open_marker.read_bytes()
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(raw)
        previous = marker.get("boot_id") if isinstance(marker, dict) else None
        pid = marker.get("pid") if isinstance(marker, dict) else None
    except ValueError:
        previous = pid = None
    now = _fs.boot_id()
    if previous is not None and now is not None and previous == now:
        return None
    if previous is None or now is None:
        return (f"the store was not closed cleanly (writer pid {pid}) and this system "
                "cannot tell whether the machine restarted since")
    return (f"the machine restarted while the store was open (writer pid {pid}): "
            "writes to the snapshot that were never synced may be torn")


def trust_snapshot(layout: StoreLayout, *, readonly: bool) -> SnapshotRebuild | None:
    """What an open does first: a writer rebuilds a snapshot the machine went down
    under from its base (and says so); a reader refuses to read one."""
    if readonly:
        reason = untrusted_snapshot_reason(layout)
        if reason is not None and _fs.boot_id() is None and writer_is_alive(layout.lock_file):
            # no boot id to compare: a marker under a live writer is its own
            reason = None
        if reason is not None:
            raise StoreStateError(
                f"store {layout.root}: {reason}; its snapshot cannot be read safely",
                hint="open it for writing once (e.g. `walsync verify` after `walsync "
                "checkpoint`): the writer rebuilds the snapshot from its last "
                "checkpoint and the WAL",
            )
        return None
    finish_base_swap(layout)
    reason = untrusted_snapshot_reason(layout)
    if reason is None:
        return None
    rebuild = rebuild_snapshot(layout, reason)
    log.warning("store %s: %s; snapshot moved to %s and rebuilt from the base at LSN %d "
                "and the WAL", layout.root, reason, rebuild.quarantine, rebuild.base_lsn)
    return rebuild


def write_open_marker(layout: StoreLayout) -> None:
    info = {"boot_id": _fs.boot_id(), "pid": os.getpid(),
            "opened_unix_ms": int(time.time() * 1000)}
    _fs.atomic_write(layout.open_marker, json.dumps(info).encode())


def clear_open_marker(layout: StoreLayout) -> None:
    if layout.open_marker.exists():
        _fs.unlink(layout.open_marker)
        _fs.fsync_dir(layout.root)


def rebuild_snapshot(layout: StoreLayout, reason: str) -> SnapshotRebuild:
    """Move the untrusted snapshot aside and put a copy of the base in its place.

    Replay then brings it up to the end of the WAL. Idempotent: a crash
    during the rebuild leaves the marker, and the next open rebuilds again.
    The base is checked first; a damaged one leaves everything as it was.
    """
    if read_base_lsn(layout):
        check_base(layout)
    quarantine = layout.new_quarantine_dir()
    if layout.snapshot_dir.exists():
        _fs.rename(layout.snapshot_dir, quarantine / layout.snapshot_dir.name)
        _fs.fsync_dir(quarantine)
        _fs.fsync_dir(layout.root)
    _fs.make_dir(layout.snapshot_dir)
    lsn = read_base_lsn(layout)
    if lsn:
        _fs.copy_file(layout.base_dir / "data.mdb", layout.snapshot_dir / "data.mdb")
        _fs.fsync_dir(layout.snapshot_dir)
    return SnapshotRebuild(reason, lsn, str(quarantine))
