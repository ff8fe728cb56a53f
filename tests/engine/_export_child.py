"""Child process for the import crash tests: import one export file, to be SIGKILLed.

``python -m tests.engine._export_child STORE FILE``. Failpoints come from
``WALSYNC_FAILPOINTS`` (e.g. ``wal.after_write=kill``). Each line is one
``os.write`` to stdout, so the parent sees it even if a kill follows::

    S            the store is open; the import starts now
    A <lsn>      the import returned (its LSN, or - if it wrote nothing)
"""

from __future__ import annotations

import os
import sys

from walsync.engine import Store
from walsync.engine.export import import_file


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def main(store_path: str, export_path: str) -> None:
    with Store.open(store_path, create=False) as store:
        _say("S")
        report = import_file(store, export_path)
        _say(f"A {report.lsn if report.lsn is not None else '-'}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
