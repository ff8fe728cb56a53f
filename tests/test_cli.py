"""The `walsync` command line (sync/cli/): every command, its JSON, its exit codes.

Most tests drive the click group in-process with CliRunner; a few run the
installed console script or hold the store's lock from another process.
Exit codes are the table in sync/cli/exits.py: 0 ok, 1 error, 2 usage,
3 damage, 4 locked, 5 not found, 6 server unreachable, 7 server behind, 8 lagging,
130 interrupted. Errors print ``error:`` and ``hint:`` lines
on stderr.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from walsync.engine import Store
from walsync.engine.record import FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES
from walsync.sync.cli import main
from walsync.sync.cli.exits import MEANING, Exit, markdown_table

ROOT = Path(__file__).resolve().parent.parent
WALSYNC = Path(sys.executable).with_name("walsync")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DAMAGE, EXIT_LOCKED, EXIT_NOT_FOUND = 0, 1, 2, 3, 4, 5
EXIT_SERVER, EXIT_BEHIND, EXIT_LAGGING, EXIT_INTERRUPTED = 6, 7, 8, 130


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, env=env, catch_exceptions=False)


def ok(*args: str) -> Result:
    result = cli(*args)
    assert result.exit_code == EXIT_OK, (args, result.output, result.stderr)
    return result


def json_lines(result: Result) -> list[Any]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def assert_error(result: Result, code: int, *fragments: str) -> None:
    """Exit ``code`` with ``error:`` and ``hint:`` lines on stderr containing ``fragments``."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    hints = [line for line in lines if line.startswith("hint: ")]
    assert errors, result.stderr
    assert hints, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.fixture
def store(tmp_path: Path) -> str:
    path = str(tmp_path / "store")
    ok("init", path, "--node-id", "node-1")
    return path


@pytest.fixture
def filled(store: str) -> str:
    for key, value in [("a/1", '{"n": 1}'), ("a/2", "[1, 2]"), ("a/3", '"three"'),
                       ("b/1", "null"), ("c", "4.5")]:
        ok("put", "-s", store, key, value)
    return store


def sealed_store(path: Path, records: int = 40) -> list[Path]:
    """A store whose WAL keeps several segments (a retain floor stops checkpoints
    from removing them); the segments, oldest first."""
    with Store.open(path, segment_bytes=4096, node_id="node-1") as s:
        s.set_retain_floor(1)
        for i in range(records):
            s.put(f"k/{i:03d}", "v" * 300)
    segments = sorted((path / "wal").glob("*.wal"))
    assert len(segments) >= 3
    return segments


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# -- init -------------------------------------------------------------------------------


def test_init_creates_a_store(tmp_path: Path) -> None:
    path = tmp_path / "new"
    result = ok("init", str(path))
    assert "created store" in result.stdout
    assert (path / "STORE").is_file()
    assert (path / "wal").is_dir()


def test_init_json(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    assert json_lines(ok("init", path, "--node-id", "n-7", "--json")) == [
        {"path": path, "node_id": "n-7", "created": True}
    ]
    assert json_lines(ok("init", path, "--json")) == [
        {"path": path, "node_id": "n-7", "created": False}
    ]


def test_init_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "something").write_text("not a store")
    assert_error(cli("init", str(tmp_path / "x")), EXIT_NOT_FOUND, "not empty")


def test_init_takes_the_path_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "from-env"
    result = cli("init", env={"WALSYNC_STORE": str(path)})
    assert result.exit_code == EXIT_OK, result.output
    assert (path / "STORE").is_file()


# -- put / get --------------------------------------------------------------------------


def test_put_json_and_get(store: str) -> None:
    result = ok("put", "-s", store, "run/1", '{"step": "fetch", "tries": [1, 2], "ok": true}')
    assert result.stdout.strip() == "committed at LSN 1"
    got = ok("get", "-s", store, "run/1")
    assert json.loads(got.stdout) == {"step": "fetch", "tries": [1, 2], "ok": True}


def test_put_string(store: str) -> None:
    ok("put", "-s", store, "greeting", "hello, world", "--string")
    assert json.loads(ok("get", "-s", store, "greeting").stdout) == "hello, world"
    # a string that happens to be JSON stays a string
    ok("put", "-s", store, "num", "42", "--string")
    assert json.loads(ok("get", "-s", store, "num").stdout) == "42"


def test_put_json_output(store: str) -> None:
    [out] = json_lines(ok("put", "-s", store, "k", "1", "--json"))
    assert out["lsn"] == 1
    assert out["durability"] == "local"
    assert isinstance(out["hlc"], int)
    [out] = json_lines(ok("put", "-s", store, "k", "2", "--json"))
    assert out["lsn"] == 2


def test_put_not_json_is_a_usage_error(store: str) -> None:
    result = cli("put", "-s", store, "k", "not json")
    assert result.exit_code == EXIT_USAGE
    assert "--string" in result.stderr
    assert cli("get", "-s", store, "k").exit_code == EXIT_NOT_FOUND  # nothing written


def test_get_json_has_value_and_version(store: str) -> None:
    ok("put", "-s", store, "k", '{"a": 1}')
    [put] = json_lines(ok("put", "-s", store, "k", '{"a": 2}', "--json"))
    [out] = json_lines(ok("get", "-s", store, "k", "--json"))
    assert out["key"] == "k"
    assert out["value"] == {"a": 2}
    version = out["version"]
    assert version["origin"] == "node-1"
    assert version["lsn"] == put["lsn"] == 2
    assert version["hlc"] == put["hlc"]
    assert version["vv"] == {"node-1": 2}
    assert version["fence"] == 0
    assert version["deleted"] is False


def test_get_missing_key_exits_5(store: str) -> None:
    result = cli("get", "-s", store, "absent")
    assert_error(result, EXIT_NOT_FOUND, "absent")
    assert result.stdout == ""
    assert cli("get", "-s", store, "absent", "--json").exit_code == EXIT_NOT_FOUND


# -- scan -------------------------------------------------------------------------------


def test_scan_prefix(filled: str) -> None:
    lines = ok("scan", "-s", filled, "a/").stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["a/1", "a/2", "a/3"]
    assert [json.loads(line.split("\t")[1]) for line in lines] == [{"n": 1}, [1, 2], "three"]


def test_scan_everything_in_key_order(filled: str) -> None:
    keys = ok("scan", "-s", filled, "--keys-only").stdout.split()
    assert keys == ["a/1", "a/2", "a/3", "b/1", "c"]


def test_scan_limit(filled: str) -> None:
    assert ok("scan", "-s", filled, "--limit", "2", "--keys-only").stdout.split() == ["a/1", "a/2"]
    assert ok("scan", "-s", filled, "a/", "--limit", "1", "--keys-only").stdout.split() == ["a/1"]
    assert cli("scan", "-s", filled, "--limit", "0").exit_code == EXIT_USAGE


def test_scan_keys_only(filled: str) -> None:
    assert ok("scan", "-s", filled, "b/", "--keys-only").stdout.splitlines() == ["b/1"]


def test_scan_json_lines(filled: str) -> None:
    assert json_lines(ok("scan", "-s", filled, "a/", "--json")) == [
        {"key": "a/1", "value": {"n": 1}},
        {"key": "a/2", "value": [1, 2]},
        {"key": "a/3", "value": "three"},
    ]
    assert json_lines(ok("scan", "-s", filled, "--json", "--keys-only", "--limit", "2")) == [
        {"key": "a/1"},
        {"key": "a/2"},
    ]


def test_scan_start_end_and_empty(filled: str) -> None:
    keys = ok("scan", "-s", filled, "--start", "a/2", "--end", "c", "--keys-only").stdout.split()
    assert keys == ["a/2", "a/3", "b/1"]
    assert ok("scan", "-s", filled, "zzz").stdout == ""


# -- inspect / verify -----------------------------------------------------------------


INSPECT_FIELDS = {
    "path", "node_id", "applied_lsn", "first_lsn", "last_lsn", "records", "wal_bytes",
    "segments", "lsn_gaps", "torn_tail", "damage",
}


def test_inspect_json_fields(tmp_path: Path) -> None:
    path = tmp_path / "s"
    segments = sealed_store(path)
    [info] = json_lines(ok("inspect", "-s", str(path), "--json"))
    assert set(info) >= INSPECT_FIELDS
    assert info["path"] == str(path)
    assert info["node_id"] == "node-1"
    assert info["applied_lsn"] == 40
    assert info["first_lsn"] == 1
    assert info["last_lsn"] == 40
    assert info["records"] == 40
    assert info["wal_bytes"] == sum(p.stat().st_size for p in segments)
    assert [s["name"] for s in info["segments"]] == [p.name for p in segments]
    assert set(info["segments"][0]) == {"name", "first_lsn", "last_lsn", "records", "size_bytes"}
    assert sum(s["records"] for s in info["segments"]) == 40
    assert info["lsn_gaps"] == []
    assert info["torn_tail"] is None
    assert info["damage"] == []


def test_inspect_human(filled: str) -> None:
    out = ok("inspect", "-s", filled).stdout
    assert "node       node-1" in out
    assert "applied    LSN 5" in out


def test_verify_clean_store(tmp_path: Path) -> None:
    path = tmp_path / "s"
    sealed_store(path)
    result = ok("verify", "-s", str(path))
    assert "ok: 40 records" in result.stdout
    assert "damage" not in result.stdout
    [out] = json_lines(ok("verify", "-s", str(path), "--json"))
    assert out["ok"] is True
    assert out["records"] == 40
    assert out["damage"] == []
    assert out["last_lsn"] == 40


def test_verify_finds_a_flipped_byte_in_a_sealed_segment(tmp_path: Path) -> None:
    path = tmp_path / "s"
    segments = sealed_store(path)
    flip_byte(segments[0], SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + 5)  # first record
    result = cli("verify", "-s", str(path))
    assert result.exit_code == EXIT_DAMAGE, result.output
    assert "damage" in result.stdout
    assert "DAMAGED" in result.stdout
    assert segments[0].name in result.stdout

    result = cli("verify", "-s", str(path), "--json")
    assert result.exit_code == EXIT_DAMAGE
    [out] = json_lines(result)
    assert out["ok"] is False
    [damage] = out["damage"]
    assert damage["path"] == str(segments[0])
    assert damage["offset"] == SEGMENT_HEADER_BYTES
    assert damage["lsn"] == 1
    # inspect reports it too, but only verify turns it into an exit code
    assert "damage:" in ok("inspect", "-s", str(path)).stdout


def test_repair_then_verify_ok(tmp_path: Path) -> None:
    path = tmp_path / "s"
    segments = sealed_store(path)
    flip_byte(segments[1], SEGMENT_HEADER_BYTES + 3)  # the checksum of the 2nd segment's 1st frame
    assert cli("verify", "-s", str(path)).exit_code == EXIT_DAMAGE

    result = ok("repair", "-s", str(path), "--yes")
    assert "damage:" in result.stdout
    assert "quarantine" in result.stdout
    moved = list((path / "quarantine").glob("*/*.wal"))
    assert {p.name for p in moved} == {p.name for p in segments[1:]}

    result = ok("verify", "-s", str(path))
    assert result.stdout.startswith("ok:") or "\nok:" in result.stdout
    # the store opens and works: the values are in the snapshot, new LSNs skip the lost ones
    assert json.loads(ok("get", "-s", str(path), "k/039").stdout) == "v" * 300
    [put] = json_lines(ok("put", "-s", str(path), "after", "1", "--json"))
    assert put["lsn"] > 40
    assert ok("repair", "-s", str(path), "--yes").stdout.startswith("no damage")


def test_repair_json(tmp_path: Path) -> None:
    path = tmp_path / "s"
    segments = sealed_store(path)
    flip_byte(segments[0], SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + 5)
    [out] = json_lines(ok("repair", "-s", str(path), "--json"))
    assert out["damaged"] is True
    assert out["segment"] == segments[0].name
    assert out["first_lost_lsn"] == 1
    assert out["moved"] == [p.name for p in segments]
    assert ok("verify", "-s", str(path), "--json").exit_code == EXIT_OK


def test_repair_asks_first(tmp_path: Path) -> None:
    path = tmp_path / "s"
    segments = sealed_store(path)
    flip_byte(segments[0], SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + 5)
    result = cli("repair", "-s", str(path), stdin="n\n")
    assert result.exit_code == EXIT_ERROR  # click's Abort
    assert not (path / "quarantine").exists()
    assert cli("verify", "-s", str(path)).exit_code == EXIT_DAMAGE


# -- checkpoint -------------------------------------------------------------------------


def test_checkpoint_json(filled: str) -> None:
    [out] = json_lines(ok("checkpoint", "-s", filled, "--json"))
    assert set(out) == {"lsn", "segments_removed", "bytes_removed"}
    assert out["lsn"] == 5
    assert "checkpointed at LSN 5" in ok("checkpoint", "-s", filled).stdout


def test_checkpoint_keeps_what_the_retain_floor_needs(tmp_path: Path) -> None:
    path = tmp_path / "s"
    segments = sealed_store(path)
    [out] = json_lines(ok("checkpoint", "-s", str(path), "--json"))
    assert out == {"lsn": 40, "segments_removed": 0, "bytes_removed": 0}
    assert sorted((path / "wal").glob("*.wal")) == segments


# -- errors: not found, locked, damaged metadata ----------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["get", "k"],
        ["put", "k", "1"],
        ["scan"],
        ["inspect"],
        ["verify"],
        ["repair", "--yes"],
        ["checkpoint"],
    ],
    ids=lambda a: a[0],
)
def test_missing_store_exits_5(tmp_path: Path, args: list[str]) -> None:
    missing = str(tmp_path / "nothing-here")
    result = cli(args[0], "-s", missing, *args[1:])
    assert_error(result, EXIT_NOT_FOUND, "no walsync store", missing)
    assert not Path(missing).exists()  # nothing was created on the way


HOLDER = """
import sys
from walsync.engine import Store
store = Store.open(sys.argv[1], create=False)
print("ready", flush=True)
sys.stdin.read()
store.close()
"""


@pytest.fixture
def lock_holder(filled: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the store open as its writer until the test ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, filled],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0


def test_put_on_a_locked_store_exits_4_naming_the_pid(
    filled: str, lock_holder: subprocess.Popen[str]
) -> None:
    result = cli("put", "-s", filled, "k", "1")
    assert_error(result, EXIT_LOCKED, f"pid {lock_holder.pid}", "locked")
    assert re.search(r"hint: .*one writer process per store", result.stderr)
    assert cli("checkpoint", "-s", filled).exit_code == EXIT_LOCKED
    assert cli("repair", "-s", filled, "--yes").exit_code == EXIT_LOCKED


def test_reads_work_while_another_process_writes(
    filled: str, lock_holder: subprocess.Popen[str]
) -> None:
    """get and scan fall back to read-only instead of failing on the lock."""
    assert json.loads(ok("get", "-s", filled, "a/1").stdout) == {"n": 1}
    assert ok("scan", "-s", filled, "--keys-only").stdout.split() == [
        "a/1", "a/2", "a/3", "b/1", "c"
    ]
    assert ok("verify", "-s", filled).exit_code == EXIT_OK


def test_store_of_a_newer_format_is_refused_with_exit_3(store: str) -> None:
    meta_path = Path(store) / "STORE"
    meta = json.loads(meta_path.read_text())
    meta["format"] = 99
    meta_path.write_text(json.dumps(meta))
    assert_error(cli("put", "-s", store, "k", "1"), EXIT_DAMAGE, "version 99")
    assert_error(cli("verify", "-s", store), EXIT_DAMAGE, "version 99")


def test_damaged_store_metadata_is_an_error(store: str) -> None:
    (Path(store) / "STORE").write_text("{not json")
    assert_error(cli("get", "-s", store, "k"), EXIT_ERROR, "cannot read store metadata")


# -- help, version, README ------------------------------------------------------------


def test_top_level_help_lists_every_command() -> None:
    out = ok("--help").stdout
    for name in main.commands:
        assert name in out


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand, as the words that invoke it."""
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(_command_paths(command, (*prefix, name)))
    return paths


@pytest.mark.parametrize("words", _command_paths(main), ids=" ".join)
def test_every_command_has_help(words: tuple[str, ...]) -> None:
    for flag in ("--help", "-h"):
        result = ok(*words, flag)
        usage = re.search(r"Usage: (\S+) (.*)", result.stdout)
        assert usage, result.stdout
        assert usage.group(2).startswith(" ".join(words)), usage.group(0)


def test_version() -> None:
    assert re.search(r"version \d+\.\d+", ok("--version").stdout)


def test_unknown_command_is_a_usage_error() -> None:
    assert cli("frobnicate").exit_code == EXIT_USAGE


def test_readme_mentions_every_command() -> None:
    """Every `walsync NAME` command is documented in README.md (as ``walsync NAME``)."""
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing: it must document every walsync command"
    text = readme.read_text()
    missing = [
        name for name in sorted(main.commands)
        if not re.search(rf"\bwalsync\s+{re.escape(name)}\b", text)
    ]
    assert not missing, f"README.md does not mention: {', '.join('walsync ' + n for n in missing)}"


def test_readme_exit_codes_are_the_cli_table() -> None:
    """README's exit-code table is the one the commands follow, code for code."""
    assert markdown_table() in (ROOT / "README.md").read_text()
    assert [int(code) for code in Exit] == [EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DAMAGE,
                                            EXIT_LOCKED, EXIT_NOT_FOUND, EXIT_SERVER,
                                            EXIT_BEHIND, EXIT_LAGGING, EXIT_INTERRUPTED]
    assert set(MEANING) == set(Exit)


#: what a command module must not do itself: a library function does it (a typed
#: answer from the transport, the replicator's public methods, sync/status.py)
_LIBRARY_WORK = {
    r"\.call\(": "a raw server call",
    r"\b_with_retries\b|\brep\._": "a private method of the replicator",
    r"\bsync_state\(|\brecord_meta\(": "reading the sync state's bytes",
    r">>\s*16\b": "decoding a hybrid-clock value",
    r"\bjson\.(loads|dumps)\(": "JSON not through the one formatter (values.py)",
}


def test_commands_leave_the_work_to_the_library() -> None:
    cli_dir = ROOT / "sync" / "cli"
    found = []
    for path in sorted(cli_dir.glob("*.py")):
        if path.name == "values.py":  # the strict JSON in and out itself
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in _LIBRARY_WORK.items():
                if re.search(pattern, line):
                    found.append(f"{path.name}:{n}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_every_command_module_is_registered() -> None:
    """Each topic's COMMANDS are the group's commands, and no command is left out."""
    from walsync.sync.cli import (
        demo,
        nodes_cmds,
        runs_cmds,
        scope_cmds,
        store_cmds,
        sync_cmds,
        ui_cmd,
    )

    registered = [c for m in (store_cmds, runs_cmds, sync_cmds, nodes_cmds, scope_cmds, ui_cmd,
                              demo)
                  for c in m.COMMANDS]
    assert sorted(c.name or "" for c in registered) == sorted(main.commands)
    assert all(main.commands[c.name or ""] is c for c in registered)


# -- the installed console script -------------------------------------------------------


def test_console_script_end_to_end(tmp_path: Path) -> None:
    assert WALSYNC.is_file(), f"the walsync console script is not installed at {WALSYNC}"
    path = str(tmp_path / "s")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(WALSYNC), *args], capture_output=True, text=True, timeout=120, check=False
        )

    assert run("init", path, "--node-id", "cli-node").returncode == EXIT_OK
    put = run("put", "--store", path, "job/1", '{"state": "running"}', "--json")
    assert put.returncode == EXIT_OK, put.stderr
    assert json.loads(put.stdout)["lsn"] == 1
    got = run("get", "--store", path, "job/1", "--json")
    assert got.returncode == EXIT_OK, got.stderr
    out = json.loads(got.stdout)
    assert out["value"] == {"state": "running"}
    assert out["version"]["origin"] == "cli-node"
    missing = run("get", "--store", path, "job/2")
    assert missing.returncode == EXIT_NOT_FOUND
    assert "error:" in missing.stderr
    assert "hint:" in missing.stderr
    assert run("verify", "--store", path).returncode == EXIT_OK
    assert run("--help").returncode == EXIT_OK
