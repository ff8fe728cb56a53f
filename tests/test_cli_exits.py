"""One exit-code table for every command (sync/cli/exits.py, README's table): each
command walked through its not-found, usage and unreachable-server paths, and Ctrl-C
(a real SIGINT to a child process) ending any command with 130 and no traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from tests.pg import free_port
from tests.terminal import WALSYNC
from tests.test_cli import ROOT, _command_paths
from walsync.engine import Store
from walsync.engine.workflow import Workflows
from walsync.sync.cli import main
from walsync.sync.cli.exits import MEANING, Exit

#: a server address nothing listens on: every command that needs the server fails
UNREACHABLE = f"host=127.0.0.1 port={free_port()} dbname=walsync user=walsync connect_timeout=2"
ENV_NO_SERVER = {"WALSYNC_PG_DSN": None, "SUPABASE_URL": None, "SUPABASE_SERVICE_ROLE_KEY": None,
                 "WALSYNC_CONFIG": None, "WALSYNC_STORE": None}


def run(*args: str, env: dict[str, str | None] | None = None, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={**ENV_NO_SERVER, **(env or {})},
                              input=stdin, catch_exceptions=False)


def assert_exit(result: Result, code: Exit, args: tuple[str, ...]) -> None:
    assert result.exit_code == code, (args, result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr, args
    if args[0] == "status" and code == Exit.SERVER:  # its table holds the error and hint
        rows = [line.split(None, 1)[0] for line in result.stdout.splitlines() if line[:1] != " "]
        assert {"health", "hint"} <= set(rows), result.stdout
    elif code not in (Exit.USAGE, Exit.OK):  # click prints its own usage errors
        lines = result.stderr.splitlines()
        assert any(line.startswith("error: ") for line in lines), (args, result.stderr)
        assert any(line.startswith("hint: ") for line in lines), (args, result.stderr)


@pytest.fixture
def store(tmp_path: Path) -> str:
    path = tmp_path / "s"
    with Store.open(path, node_id="n1") as s:
        s.put("k", 1)
        run_ = Workflows(s).run("w", "r1", total_steps=1)
        with run_:
            run_.step("one", lambda: 1)
        run_.checkpoint("cp")
    return str(path)


#: every command, as the words that invoke it, with arguments for its not-found case
#: (STORE: an existing store, MISSING: a path with none; FILE: an export file)
NOT_FOUND: dict[tuple[str, ...], list[list[str]]] = {
    ("init",): [],  # creates what is missing
    ("get",): [["-s", "MISSING", "k"], ["-s", "STORE", "nosuch"]],
    ("put",): [["-s", "MISSING", "k", "1"]],
    ("delete",): [["-s", "MISSING", "k"], ["-s", "STORE", "nosuch"]],
    ("scan",): [["-s", "MISSING"]],
    ("inspect",): [["-s", "MISSING"]],
    ("verify",): [["-s", "MISSING"]],
    ("repair",): [["-s", "MISSING", "--yes"], ["-s", "MISSING"]],
    ("checkpoint",): [["-s", "MISSING"]],
    ("compact",): [["-s", "MISSING"]],
    ("export",): [["-s", "MISSING", "FILE"], ["-s", "STORE", "FILE", "--run", "nosuch"]],
    ("import",): [["-s", "STORE", "nosuch.wsx"], ["-s", "MISSING", "FILE"]],
    ("runs",): [],
    ("runs", "list"): [["-s", "MISSING"]],
    ("runs", "resumable"): [["-s", "MISSING"]],
    ("runs", "show"): [["-s", "MISSING", "r1"], ["-s", "STORE", "nosuch"]],
    ("checkpoints",): [],
    ("checkpoints", "list"): [["-s", "MISSING", "r1"], ["-s", "STORE", "nosuch"]],
    ("checkpoints", "rollback"): [["-s", "STORE", "nosuch", "cp"],
                                  ["-s", "STORE", "r1", "nosuch"]],
    ("conflicts",): [],
    ("conflicts", "list"): [["-s", "MISSING"]],
    ("conflicts", "resolve"): [["-s", "MISSING", "k", "1"], ["-s", "STORE", "nosuch", "1"]],
    ("status",): [["-s", "MISSING"]],
    ("detach",): [["-s", "MISSING"]],
    ("sync",): [["-s", "MISSING", "--once"]],
    ("ui",): [["-s", "MISSING", "--port", "0"]],
    ("demo",): [],  # creates its own store
    ("migrate",): [],
    ("restore",): [],
    ("leases",): [],
    ("nodes",): [],
    ("nodes", "label"): [],
    ("scope",): [],
    ("scope", "show"): [["-s", "MISSING"]],
    ("scope", "set"): [["-s", "MISSING", "--every-key"]],
    ("scope", "group"): [],
    ("retention",): [],
}

#: commands that ask the server, with their arguments (STORE / DIR filled in)
UNREACHABLE_ARGS: dict[tuple[str, ...], list[str]] = {
    ("migrate",): [],
    ("sync",): ["-s", "STORE", "--once", "--timeout", "1"],
    ("status",): ["-s", "STORE"],
    ("restore",): ["--to", "DIR"],
    ("leases",): [],
    ("nodes",): [],
    ("nodes", "label"): ["n1", "a-label"],
    ("retention",): [],
}

#: commands whose first argument is a key, a prefix or a run id (non-UTF-8: usage)
KEY_ARGS: dict[tuple[str, ...], list[str]] = {
    ("get",): ["-s", "STORE", "KEY"],
    ("put",): ["-s", "STORE", "KEY", "1"],
    ("delete",): ["-s", "STORE", "KEY"],
    ("scan",): ["-s", "STORE", "KEY"],
    ("runs", "show"): ["-s", "STORE", "KEY"],
    ("checkpoints", "list"): ["-s", "STORE", "KEY"],
    ("checkpoints", "rollback"): ["-s", "STORE", "KEY", "cp"],
    ("conflicts", "list"): ["-s", "STORE", "KEY"],
    ("conflicts", "resolve"): ["-s", "STORE", "KEY", "1"],
    ("export",): ["-s", "STORE", "FILE", "--prefix", "KEY"],
}

#: the commands the group has (the tables above may name some a build lacks)
COMMANDS = set(_command_paths(main))


def registered(table: dict[tuple[str, ...], list[list[str]]] | dict[tuple[str, ...], list[str]]
               ) -> list[tuple[str, ...]]:
    return sorted(words for words in table if words in COMMANDS)


def fill(args: list[str], store: str, tmp_path: Path) -> list[str]:
    names = {"STORE": store, "MISSING": str(tmp_path / "missing"),
             "FILE": str(tmp_path / "x.wsx"), "DIR": str(tmp_path / "restored"),
             "KEY": os.fsdecode(b"k\xff\xfe")}
    return [names.get(a, a) for a in args]


def test_every_command_is_walked() -> None:
    """A new command must say here how it ends when what it names is missing."""
    assert set(NOT_FOUND) >= COMMANDS, COMMANDS - set(NOT_FOUND)


@pytest.mark.parametrize("words", registered(NOT_FOUND), ids=" ".join)
def test_not_found_exits_5(words: tuple[str, ...], store: str, tmp_path: Path) -> None:
    if words == ("export",) or words == ("import",):
        Path(fill(["FILE"], store, tmp_path)[0]).unlink(missing_ok=True)
        if words == ("import",):
            assert run("export", "-s", store, str(tmp_path / "x.wsx")).exit_code == 0
    for args in NOT_FOUND[words]:
        filled = fill(args, store, tmp_path)
        assert_exit(run(*words, *filled), Exit.NOT_FOUND, (*words, *filled))
    assert not (tmp_path / "missing").exists()  # nothing was created on the way


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=" ".join)
def test_an_unknown_option_is_a_usage_error(words: tuple[str, ...]) -> None:
    result = run(*words, "--no-such-option")
    assert result.exit_code == Exit.USAGE, (words, result.output)
    assert "No such option" in result.output + result.stderr


@pytest.mark.parametrize("words", registered(KEY_ARGS), ids=" ".join)
def test_a_key_that_is_not_utf8_is_a_usage_error_showing_its_bytes(
        words: tuple[str, ...], store: str, tmp_path: Path) -> None:
    filled = fill(KEY_ARGS[words], store, tmp_path)
    result = run(*words, *filled)
    assert_exit(result, Exit.USAGE, words)
    text = result.output + result.stderr
    assert r"b'k\xff\xfe' is not UTF-8" in text, text
    assert "\\udc" not in text


@pytest.mark.parametrize("words", registered(UNREACHABLE_ARGS), ids=" ".join)
def test_an_unreachable_server_exits_6(words: tuple[str, ...], store: str,
                                       tmp_path: Path) -> None:
    args = fill(UNREACHABLE_ARGS[words], store, tmp_path)
    result = run(*words, *args, env={"WALSYNC_PG_DSN": UNREACHABLE})
    assert_exit(result, Exit.SERVER, words)
    assert "cannot reach the database (Connection refused)" in " ".join(
        (result.output + result.stderr).split())
    unconfigured = run(*words, *args)
    assert_exit(unconfigured, Exit.SERVER, words)
    assert "WALSYNC_PG_DSN" in unconfigured.output + unconfigured.stderr


def test_an_unreadable_dsn_names_the_setting_not_the_wal(store: str) -> None:
    for words in (("status", "-s", store), ("leases",), ("migrate",)):
        result = run(*words, env={"WALSYNC_PG_DSN": "host=x password=hunter2 bogus"})
        assert result.exit_code == Exit.SERVER, result.output
        text = result.output + result.stderr
        assert "cannot be read" in text
        assert "ProgrammingError" not in text
        assert "local WAL" not in text  # (the hint of an entry the server refused)
        assert "hunter2" not in text


def test_readme_documents_every_code_and_its_meaning() -> None:
    readme = (ROOT / "README.md").read_text()
    for code, meaning in MEANING.items():
        assert f"| {code.value} | {meaning} |" in readme


# -- Ctrl-C: a real SIGINT to the process ------------------------------------------------


def interrupt(args: list[str], cwd: Path, *, after: str | None = None,
              wait_seconds: float = 0.5) -> subprocess.CompletedProcess[str]:
    """Start ``walsync args``, wait for ``after`` in its stdout (or ``wait_seconds``),
    send SIGINT; its exit code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSYNC_", "SUPABASE_"))}
    proc = subprocess.Popen([str(WALSYNC), *args], cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = ""
    try:
        if after is not None:
            deadline = time.monotonic() + 60
            while after not in seen:
                assert time.monotonic() < deadline, seen
                line = proc.stdout.readline()
                assert line, (seen, proc.poll())
                seen += line
        time.sleep(wait_seconds)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, seen + out, err)


def assert_interrupted(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == Exit.INTERRUPTED, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert "KeyboardInterrupt" not in done.stderr
    assert "Aborted" not in done.stderr


def test_ctrl_c_while_put_waits_for_stdin_exits_130(store: str, tmp_path: Path) -> None:
    done = interrupt(["put", "-s", store, "k", "-"], tmp_path, wait_seconds=1.0)
    assert_interrupted(done)
    assert done.stderr.strip().endswith("interrupted")
    with Store.open(store, readonly=True) as s:
        assert s.get("k") == 1  # nothing written
        assert not (Path(store) / "OPEN").exists() or s.readonly


def test_ctrl_c_on_the_dashboard_exits_130(store: str, tmp_path: Path) -> None:
    done = interrupt(["ui", "-s", store, "--port", "0"], tmp_path, after="walsync ui on")
    assert_interrupted(done)
    assert "stopping (SIGINT)" in done.stdout


def test_ctrl_c_in_the_demo_exits_130_and_the_next_run_says_resumed(tmp_path: Path) -> None:
    done = interrupt(["demo", "-s", "d", "--delay", "0.4"], tmp_path, after="new run",
                     wait_seconds=1.0)
    assert_interrupted(done)
    assert "`walsync demo` resumes the run" in done.stderr
    with Store.open(tmp_path / "d", readonly=True) as s:
        [rec] = Workflows(s).list_runs(workflow="invoices")
        run_ = Workflows(s).get_run(rec.run_id)
        assert run_.steps["fetch_orders"].status == "cancelled"
    again = subprocess.run([str(WALSYNC), "demo", "-s", "d", "--delay", "0"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    [line] = [line for line in again.stdout.splitlines() if "fetch_orders" in line]
    assert " resumed " in line, line
    assert "from its cursor after cancelled (attempt 2)" in line
    assert " ran " not in line


def test_ctrl_c_while_the_command_loads_exits_130(tmp_path: Path) -> None:
    """Loading the CLI's modules takes a moment; a Ctrl-C then ends it the same way. The
    script's entry is run with SIGINT already pending, so it lands in the import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALSYNC_")}
    code = ("import os, signal, sys; sys.argv = ['walsync', '--version']; "
            "import walsync.sync.console as c; "
            "import builtins; real = builtins.__import__\n"
            "def slow(name, *a, **k):\n"
            "    if name == 'cli' or name.endswith('sync.cli'):\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = slow\n"
            "c.main()")
    done = subprocess.run([str(WALSYNC.with_name("python")), "-c", code], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert_interrupted(done)
    assert done.stderr == "interrupted\n"


def test_click_abort_is_not_what_ctrl_c_prints() -> None:
    """click turns Ctrl-C into 'Aborted!' and exit 1 by default; the group does not."""
    @click.command()
    def slow() -> None:
        raise KeyboardInterrupt

    main.add_command(slow, "slow-for-test")
    try:
        result = CliRunner().invoke(main, ["slow-for-test"])
    finally:
        main.commands.pop("slow-for-test")
    assert result.exit_code == Exit.INTERRUPTED
    assert "Aborted" not in result.output
