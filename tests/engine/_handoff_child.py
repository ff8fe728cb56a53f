"""Child processes for tests/engine/test_handoff.py: a writer merging the inbox, or a
sync worker handing pulled pages over, SIGKILLed at a named step of the hand-off.

    python tests/engine/_handoff_child.py apply STORE POINT NTH
        opens STORE as its writer: the open merges the pages waiting in the inbox
        (engine/handoff.py); killed at the NTH hit of kill point POINT.

    python tests/engine/_handoff_child.py pull STORE POINT NTH FIRST COUNT
        opens STORE as a sync worker (engine/worker.py) and hands pages FIRST ..
        FIRST+COUNT-1 over (``page_items``), one ``apply_remote`` each: with no
        writer open, the worker merges each itself. Killed like ``apply``.

POINT ``none`` kills nowhere. Exit status 0 once done.
"""

from __future__ import annotations

import os
import signal
import sys

import cbor2

from walsync.engine import Store, handoff
from walsync.engine.record import CODEC_NONE
from walsync.engine.versions import Sibling, Version
from walsync.engine.worker import open_sync_worker

#: keys per page, and the node the pages' versions come from
PAGE_KEYS = 3
REMOTE = "remote-node"


def page_items(page: int) -> list[tuple[str, Sibling]]:
    """Page ``page``'s versions: PAGE_KEYS new keys and one more version of ``shared``
    (each page's dominates the last: a key that moves with every page)."""
    items = []
    for j in range(PAGE_KEYS):
        lsn = page * (PAGE_KEYS + 1) + j + 1
        items.append((f"r/{page}/{j}", _sibling(lsn, {"page": page, "j": j})))
    lsn = page * (PAGE_KEYS + 1) + PAGE_KEYS + 1
    items.append(("shared", _sibling(lsn, {"page": page})))
    return items


def page_cursor(page: int) -> int:
    """The server position a page reaches."""
    return (page + 1) * 10


def _sibling(lsn: int, value: object) -> Sibling:
    return Sibling(Version(REMOTE, lsn, (1_700_000_000_000 + lsn) << 16, {REMOTE: lsn}),
                   CODEC_NONE, cbor2.dumps(value))


def _arm(point: str, nth: int) -> None:
    seen = {"n": 0}

    def kill_point(name: str) -> None:
        if name == point:
            seen["n"] += 1
            if seen["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    handoff.kill_point = kill_point


def main(argv: list[str]) -> int:
    mode, store_path, point, nth = argv[0], argv[1], argv[2], int(argv[3])
    if point != "none":
        _arm(point, nth)
    if mode == "apply":
        Store.open(store_path, create=False).close()
        return 0
    if mode == "pull":
        first, count = int(argv[4]), int(argv[5])
        worker = open_sync_worker(store_path)
        try:
            for page in range(first, first + count):
                worker.apply_remote(page_items(page), pull_cursor=page_cursor(page))
        finally:
            worker.close()
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
