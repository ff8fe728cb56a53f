"""README's CLI sections, run as written: every line of the CLI's command block, then of
the replication and the lost-host blocks, in order, in an empty directory, with the
installed `walsync` against a real PostgreSQL server.

The placeholders are the only thing filled in: RUN_ID (the demo's run, read from the
store once the demo has run), DIR (a new directory), the lost host's node id and the
example DSN (the test server's). Each line must exit 0; the sync worker runs until
`walsync status` finds nothing unreplicated, then gets SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from walsync.engine import Store
from walsync.engine.workflow import Workflows

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```sh block after ``heading``, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, f"no sh block under {heading!r}"
    lines = []
    for raw in block.group(1).splitlines():
        line = re.sub(r"\s+#.*$", "", raw).strip()
        if line:
            lines.append(line)
    return lines


@pytest.mark.timeout(900)  # some thirty commands, each a process of its own
def test_readme_cli_block_runs_as_written(tmp_path: Path, pg_db: str) -> None:
    lines = readme_block("## The CLI\n")
    assert len(lines) >= 25
    words = {word for line in lines for word in re.findall(r"\bwalsync (\w+)", line)}
    from walsync.sync.cli import demo, runs_cmds, store_cmds, sync_cmds, ui_cmd

    # every command of the block's topics appears in it (others have sections of their own)
    topics = {c.name for m in (store_cmds, runs_cmds, sync_cmds, ui_cmd, demo)
              for c in m.COMMANDS}
    assert topics <= words, topics - words
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WALSYNC_", "SUPABASE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["WALSYNC_PG_DSN"] = pg_db
    work = tmp_path / "work"
    work.mkdir()
    done: list[str] = []
    shell_state = ""  # exports carried from line to line
    for line in lines:
        if "RUN_ID" in line:
            with Store.open(work / "state", readonly=True) as store:
                [run] = Workflows(store).list_runs(workflow="invoices")
            line = line.replace("RUN_ID", run.run_id)
        line = line.replace("DIR", str(tmp_path / "restored"))
        done.append(run_line(line, work, env, shell_state))
        if line.startswith("export "):
            shell_state += line + "\n"
    assert (tmp_path / "restored" / "STORE").is_file()
    assert (work / "copy" / "STORE").is_file()

    # the replication section, its placeholder DSN for this server's
    for line in readme_block("## Replication to Supabase / PostgreSQL"):
        if line.startswith("export WALSYNC_PG_DSN="):
            continue  # the environment holds this server's DSN
        done.append(run_line(line, work, env, ""))
    # host A (the store above) is lost; a new host restores its runs
    with Store.open(work / "state", readonly=True) as store:
        lost = store.node_id
    new_host = tmp_path / "host-b"
    new_host.mkdir()
    for line in readme_block("## Recovering from a lost host"):
        done.append(run_line(line.replace("<A's node id>", lost), new_host, env, ""))
    with Store.open(new_host / "state", readonly=True) as store:
        assert store.node_id != lost
        assert Workflows(store).list_runs(workflow="invoices")


def run_line(line: str, cwd: Path, env: dict[str, str], shell_state: str) -> str:
    """One README line in bash (0 expected); the sync worker (`walsync sync` without
    --once) is stopped with SIGTERM once `walsync status` finds nothing unreplicated."""
    if re.fullmatch(r"walsync sync --store \S+( &)?", line):
        # (in the background, as in the host-loss recipe: tests/sync/test_hostloss_readme.py
        # runs that one with the orchestrator beside the worker)
        return run_worker(line.removesuffix(" &"), cwd, env)
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", f"set -e -o pipefail\n{shell_state}\n{line}"],
                            cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    said = f"$ {line}  ({time.monotonic() - started:.1f} s)\n{result.stdout}{result.stderr}"
    assert result.returncode == 0, said
    assert "Traceback" not in result.stderr, said
    return said


def run_worker(line: str, cwd: Path, env: dict[str, str]) -> str:
    store = line.split()[-1]
    with subprocess.Popen(["bash", "-c", f"exec {line} --status-every 0"], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            started = proc.stdout.readline()  # its signal handlers are in place from here
            assert started.startswith("syncing "), started + proc.communicate()[1]
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.communicate()
                status = subprocess.run(["walsync", "status", "--store", store, "--json"],
                                        cwd=cwd, env=env, capture_output=True, text=True,
                                        timeout=60, check=False)
                if status.returncode == 0 and \
                        json.loads(status.stdout)["unreplicated_entries"] == 0:
                    break
                assert time.monotonic() < deadline, status.stdout + status.stderr
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    said = f"$ {line}\n{started}{out}{err}"
    assert proc.returncode == 0, said
    assert "stopping (SIGTERM)" in out, said
    return said


def test_readme_moving_a_run_block_runs_with_a_copy_for_scp(tmp_path: Path) -> None:
    """The export / import lines as written (the two hosts share a directory, so the
    `scp` between them is the one line left out)."""
    lines = readme_block("### Moving a run between stores")
    with Store.open(tmp_path / "host-a" / "state", node_id="a") as store:
        run = Workflows(store).run("invoices", "invoice-42", total_steps=1)
        with run:
            run.step("fetch", lambda: {"orders": 3})
    Store.open(tmp_path / "host-b" / "state", node_id="b").close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALSYNC_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for line in lines:
        if line.startswith("scp "):
            continue  # both "hosts" share this directory: the file is already there
        result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, (line, result.stdout, result.stderr)
    with Store.open(tmp_path / "host-b" / "state", readonly=True) as store:
        assert Workflows(store).get_run("invoice-42").output("fetch") == {"orders": 3}
