"""Read-only opens: beside a live writer in another process, and on a read-only file
system (a real read-only bind mount of the store's directory).

The read commands (`walsync get`, `scan`, `inspect`, `verify`, `runs list`, `conflicts
list`, `export`) and ``Store.open(readonly=True)`` read a store they cannot write; a
write there is refused with ``ReadOnlyStoreError`` naming the store and the way out,
before anything is touched. Beside a live writer, a reader sees each commit the writer
applied, and never blocks it.

The mount needs root (CAP_SYS_ADMIN). Where it cannot be made, the store's directory is
made read-only by its permissions instead, and the commands run as the unprivileged
user ``nobody`` (root's writes ignore permissions, so a permission-only test run as
root would prove nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from walsync.engine import Store
from walsync.engine.errors import ReadOnlyStoreError
from walsync.engine.workflow import Workflows
from walsync.sync.cli.exits import Exit

REPO = Path(__file__).resolve().parents[2]
WALSYNC = Path(sys.executable).with_name("walsync")
NOBODY = 65534

Run = Callable[..., subprocess.CompletedProcess[str]]


def make_store(path: Path) -> None:
    with Store.open(path, node_id="ro") as store:
        for i in range(20):
            store.put(f"k/{i:02d}", {"i": i})
        with Workflows(store).run("wf", "run-1") as run:
            run.step("one", lambda: 1)
        store.checkpoint()
        store.put("tail", "after the checkpoint")  # in the WAL and the snapshot


@pytest.fixture
def readonly_store(tmp_path: Path) -> Iterator[tuple[Path, Run]]:
    """A store readable at the returned path and not writable there, and the way to run
    a command against it."""
    src = tmp_path / "src"
    src.mkdir()
    make_store(src / "store")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(src), str(mnt)],
                             capture_output=True).returncode == 0
    if mounted:
        remounted = subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)],
                                   capture_output=True)
        assert remounted.returncode == 0, remounted.stderr
        as_user = None
        path = mnt / "store"
    else:  # permissions instead, for a user they bind (see the module's docstring)
        for directory, _dirs, files in os.walk(src):
            for name in files:
                os.chmod(Path(directory) / name, 0o444)
            os.chmod(directory, 0o555)
        os.chmod(tmp_path, 0o755)
        as_user = NOBODY if os.geteuid() == 0 else None
        path = src / "store"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSYNC_", "SUPABASE_"))}
        return subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=60, user=as_user)

    try:
        yield path, run
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        else:
            for directory, _dirs, _files in os.walk(src):
                os.chmod(directory, 0o700)


def walsync(run: Run, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = run(str(WALSYNC), *args)
    assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done


def test_read_commands_on_a_read_only_file_system(readonly_store: tuple[Path, Run],
                                                  tmp_path: Path) -> None:
    path, run = readonly_store
    s = str(path)
    probe = run(sys.executable, "-c", f"open({str(path / 'probe')!r}, 'w')")
    assert probe.returncode != 0, "the store's directory is writable: the test proves nothing"
    assert json.loads(walsync(run, "get", "--store", s, "k/07").stdout) == {"i": 7}
    assert json.loads(walsync(run, "get", "--store", s, "tail").stdout) == "after the checkpoint"
    scanned = [json.loads(line) for line in
               walsync(run, "scan", "--json", "--store", s, "k/").stdout.splitlines()]
    assert [row["key"] for row in scanned] == [f"k/{i:02d}" for i in range(20)]
    assert "LSN" in walsync(run, "inspect", "--store", s).stdout
    assert walsync(run, "verify", "--store", s).stdout.startswith("ok")
    assert "run-1" in walsync(run, "runs", "list", "--store", s).stdout
    walsync(run, "conflicts", "list", "--store", s)
    status = json.loads(walsync(run, "status", "--json", "--store", s, code=Exit.SERVER).stdout)
    assert status["applied_lsn"] > 20  # local facts, though no server is configured
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    walsync(run, "export", "--store", s, str(out / "all.wsx"))
    assert (out / "all.wsx").stat().st_size > 0
    # a write is refused, naming the store and the way out, and changes nothing
    refused = run(str(WALSYNC), "put", "--store", s, "k/00", "1")
    assert refused.returncode != 0
    assert "read-only" in refused.stderr
    assert str(path) in refused.stderr
    assert json.loads(walsync(run, "get", "--store", s, "k/00").stdout) == {"i": 0}
    # the API alike
    api = run(sys.executable, "-c", (
        "import sys\n"
        "from walsync.engine import Store\n"
        "from walsync.engine.errors import ReadOnlyStoreError\n"
        "with Store.open(sys.argv[1], readonly=True) as s:\n"
        "    assert s.get('k/03') == {'i': 3}, s.get('k/03')\n"
        "    assert s.count_keys('k/') == 20\n"
        "try:\n"
        "    Store.open(sys.argv[1])\n"
        "except ReadOnlyStoreError as exc:\n"
        "    print('refused:', exc)\n"), s)
    assert api.returncode == 0, api.stderr
    assert "refused:" in api.stdout
    assert "cannot be written here" in api.stdout


def test_readers_beside_a_live_writer_see_its_commits(tmp_path: Path) -> None:
    """A writer process commits a counter; readers (the API in this process, the CLI)
    read it meanwhile, never blocking it: each read is a value the writer committed,
    and the values they see only grow."""
    path = tmp_path / "store"
    make_store(path)
    script = (
        "import sys, itertools, time\n"
        "from walsync.engine import Store\n"
        "s = Store.open(sys.argv[1], create=False)\n"
        "print('open', flush=True)\n"
        "for i in itertools.count(1):\n"
        "    s.put('counter', i)\n"
        "    time.sleep(0.002)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "open"
        seen: list[Any] = []
        with Store.open(path, readonly=True) as reader:
            deadline = time.monotonic() + 10
            while len({v for v in seen if v is not None}) < 20:
                assert time.monotonic() < deadline, seen[-5:]
                seen.append(reader.get("counter"))
                assert reader.get("k/05") == {"i": 5}
                time.sleep(0.01)
        values = [v for v in seen if v is not None]
        assert values == sorted(values)
        cli = subprocess.run([str(WALSYNC), "get", "--store", str(path), "counter"],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) >= values[-1]
        assert writer.poll() is None, "the writer stopped while readers read"
        with pytest.raises(ReadOnlyStoreError), Store.open(path, readonly=True) as reader:
            reader.put("counter", -1)
    finally:
        writer.kill()
        writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
    shutil.rmtree(path)
