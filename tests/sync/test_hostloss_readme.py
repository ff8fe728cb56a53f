"""README's host-loss recipe, run as written: its command block, line by line, against a
real PostgreSQL server, after host A synced a run and was lost.

The one placeholder, ``<A's node id>``, is filled in. A line ending in ``&`` runs in the
background, as the shell runs it: the sync worker, beside the orchestrator of the next
line (`walsync demo` writing the restored store). Before the status line the test
waits until the worker shipped what the orchestrator wrote (the status line then
exits 0); every line must exit 0, and the worker must still run, then stop cleanly.
"""

from __future__ import annotations

import contextvars
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sync._helpers import query, wait_for
from walsync.engine import Store
from walsync.engine.workflow import Workflows
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```sh block after ``heading``, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, f"no sh block under {heading!r}"
    return [line for raw in block.group(1).splitlines()
            if (line := re.sub(r"\s+#.*$", "", raw).strip())]


def lose_host_a(tmp_path: Path, dsn: str) -> None:
    """Host A drives a run halfway, ships it, and is lost with its disk; in a context
    of its own, as a lost process's: the run it never left is no one else's current run."""
    contextvars.copy_context().run(_drive_host_a, tmp_path, dsn)


def _drive_host_a(tmp_path: Path, dsn: str) -> None:
    path = tmp_path / "host-a"
    with Store.open(path, node_id="host-a") as store:
        run = Workflows(store).run("nightly-etl", "etl-1", total_steps=3)
        run.__enter__()  # running: A is lost inside the run, before its next step
        run.step("extract", lambda: {"rows": 3})
        rep = Replicator(store, PostgresTransport(dsn))
        rep.sync_once(60)
        rep.close()
    shutil.rmtree(path)


def test_readme_host_loss_recipe_runs_as_written(tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    lose_host_a(tmp_path, pg_db)
    lines = readme_block("## Recovering from a lost host")
    assert any(line.endswith("&") and "walsync sync" in line for line in lines)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSYNC_", "SUPABASE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["WALSYNC_PG_DSN"] = pg_db
    work = tmp_path / "new-host"
    work.mkdir()
    done: list[str] = []
    worker: subprocess.Popen[str] | None = None
    try:
        for line in lines:
            line = line.replace("<A's node id>", "host-a")
            if line.endswith("&"):
                assert worker is None
                worker = subprocess.Popen(["bash", "-c", "exec " + line[:-1].strip()],
                                          cwd=work, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
                assert worker.stdout is not None
                first = worker.stdout.readline()
                done.append(f"$ {line}\n{first}")
                assert first.startswith("syncing"), "\n".join(done)
                continue
            if line.startswith("walsync status"):
                shipped_all(work / "state", pg_db)
            result = subprocess.run(["bash", "-c", line], cwd=work, env=env,
                                    capture_output=True, text=True, timeout=300, check=False)
            done.append(f"$ {line}\n{result.stdout}{result.stderr}")
            assert result.returncode == 0, "\n".join(done)
            assert "Traceback" not in result.stderr, "\n".join(done)
        assert worker is not None
        assert worker.poll() is None, "the worker stopped beside the orchestrator"
        assert "etl-1" in "\n".join(done)  # the lost host's run, restored and resumable
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker is not None:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()


def shipped_all(path: Path, dsn: str) -> None:
    """Wait until the server acknowledged every record of the restored store (the
    orchestrator's writes included: the worker ships them while it runs)."""
    with Store.open(path, readonly=True) as store:
        node, last = store.node_id, store.applied_lsn
    assert last > 0

    def acked() -> bool:
        rows = query(dsn, "select acked_lsn from walsync.nodes where node_id = %s", (node,))
        return bool(rows) and int(rows[0][0]) >= last

    wait_for(acked, 60, interval=0.1, what=f"the worker to ship LSN {last} of node {node}")
    time.sleep(0.1)
