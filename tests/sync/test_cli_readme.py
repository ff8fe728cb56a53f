"""README's CLI section, run as written: every line of its command block, in order, in an
empty directory, with the installed `walsync` against a real PostgreSQL server.

The block's placeholders are the only thing filled in: RUN_ID (the demo's run, read
from the store once the demo has run) and DIR (a new directory). Each line must exit 0;
its output is kept for the assertion message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
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
        result = subprocess.run(["bash", "-c", f"set -e -o pipefail\n{shell_state}\n{line}"],
                                cwd=work, env=env, capture_output=True, text=True,
                                timeout=300, check=False)
        done.append(f"$ {line}\n{result.stdout}{result.stderr}")
        assert result.returncode == 0, "\n".join(done)
        assert "Traceback" not in result.stderr, "\n".join(done)
        if line.startswith("export "):
            shell_state += line + "\n"
    assert (tmp_path / "restored" / "STORE").is_file()
    assert (work / "copy" / "STORE").is_file()


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
