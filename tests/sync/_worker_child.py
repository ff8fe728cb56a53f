"""The orchestrator of tests/sync/test_worker_beside_writer.py: a process that embeds a
store WITHOUT a replicator of its own while `walsync sync` syncs the same store.

    python tests/sync/_worker_child.py orchestrate STORE LOG

Opens STORE as its writer (waiting out a sync worker's hand-off of the writer lock),
resumes run ``job`` and drives its steps ``s00000``, ``s00001``, ... for ever (until
SIGKILLed). Each step's body logs ``start I``; once ``run.step`` returned (the step's
success is durable) it logs ``done I``. After each step it puts ``w/I`` (once: a key
already there was put before a kill), every fourth one with durability ``remote``
(the sync worker's acknowledgement, engine/handoff.py), and logs ``ack I LSN HOW``:
HOW is ``remote`` (the server acknowledged it), ``local`` (no worker ran: refused
before anything was written, then put locally) or ``unreplicated`` (durable here,
the worker did not acknowledge in time or was killed). Every ten steps it logs
``seen N``, the number of keys under ``c/`` (another node's writes, which the worker
pulls and this process merges). Every log line is appended and fsynced before the
next action, so the log holds everything acknowledged at the moment of a SIGKILL.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

from walsync.engine import Store
from walsync.engine.errors import NoReplicatorError, NotReplicatedError
from walsync.engine.workflow import Workflows

RUN_ID = "job"


class Log:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __call__(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode())
        os.fsync(self._fd)


def orchestrate(store_path: str, log_path: str) -> int:
    log = Log(log_path)
    # no lock timeout of its own: a worker's hand-off of the writer lock is waited out
    # all the same (engine/lock.py), anything else would fail the test
    store = Store.open(store_path, create=False, remote_timeout_seconds=3.0)
    log(f"opened {os.getpid()}")

    def body(i: int) -> int:
        log(f"start {i}")
        return i * 2

    with Workflows(store).run("orchestrated", RUN_ID) as run:
        for i in itertools.count():
            assert run.step(f"s{i:05d}", body, i) == i * 2
            log(f"done {i}")
            key = f"w/{i:05d}"
            if store.get(key) is None:
                how = "local"
                try:
                    if i % 4 == 3:
                        how = "remote"
                        lsn = store.put(key, i, durability="remote").lsn
                    else:
                        lsn = store.put(key, i).lsn
                except NoReplicatorError:
                    how = "local"
                    lsn = store.put(key, i).lsn
                except NotReplicatedError as exc:
                    how, lsn = "unreplicated", exc.lsn
                log(f"ack {i} {lsn} {how}")
            if i % 10 == 9:
                log(f"seen {len(store.keys('c/'))}")
            time.sleep(0.005)
    return 0


if __name__ == "__main__":
    if sys.argv[1] != "orchestrate":
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
    sys.exit(orchestrate(sys.argv[2], sys.argv[3]))
