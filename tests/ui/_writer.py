"""A writer process beside the dashboard: holds the store's writer lock and commits on request.

Commands on stdin, one a line; each answered with one JSON line on stdout:
``run ID`` (a run with one completed step), ``compact``, ``put N`` (N small
keys), ``segment`` (the active WAL segment's path), ``quit``.
"""

from __future__ import annotations

import json
import os
import sys

from walsync.engine import Store
from walsync.engine.workflow import Workflows


def main(path: str) -> None:
    store = Store.open(path)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "run":
            run = Workflows(store).run("late-work", run_id=words[1], total_steps=1)
            with run:
                run.step("only", lambda: "done")
            answer: dict[str, object] = {"lsn": store.applied_lsn}
        elif words[0] == "compact":
            result = store.compact()
            answer = {"after": result.snapshot_bytes_after}
        elif words[0] == "put":
            for i in range(int(words[1])):
                store.put(f"filler/{i:04d}", {"i": i, "pad": "x" * 200})
            answer = {"lsn": store.applied_lsn}
        elif words[0] == "segment":
            segments = sorted(os.listdir(os.path.join(path, "wal")))
            answer = {"segment": os.path.join(path, "wal",
                                              [s for s in segments if s.endswith(".wal")][-1])}
        else:
            break
        print(json.dumps(answer), flush=True)
    store.close()


if __name__ == "__main__":
    main(sys.argv[1])
