"""The verbs and options operators asked for, and the messages that misled them:
delete, values from stdin or a file, --lock-timeout, scan's help, init on an existing
store, repair with nothing to repair, import --create of a damaged file, what an export
names, conflicts resolve on a key without a conflict, empty lists said so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.test_cli import (
    EXIT_DAMAGE,
    EXIT_ERROR,
    EXIT_LOCKED,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    ROOT,
    WALSYNC,
    assert_error,
    cli,
    flip_byte,
    json_lines,
    ok,
)
from walsync.engine import Store


def test_delete_writes_a_tombstone_and_says_when_nothing_is_there(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    ok("init", path)
    ok("put", "-s", path, "k", '{"a": 1}')
    [done] = json_lines(ok("delete", "-s", path, "k", "--json"))
    assert done["lsn"] == 2
    assert cli("get", "-s", path, "k").exit_code == EXIT_NOT_FOUND
    with Store.open(path, readonly=True) as store:
        [tombstone] = store.get_versions("k")
        assert tombstone.version.deleted
    assert_error(cli("delete", "-s", path, "k"), EXIT_NOT_FOUND, "no key 'k'")
    assert_error(cli("delete", "-s", path, ".walsync/runs/x"), EXIT_NOT_FOUND)


def test_put_takes_a_multi_megabyte_value_from_stdin_or_a_file(tmp_path: Path) -> None:
    """Too large for a command line ("Argument list too long"), not for stdin or --file."""
    path = str(tmp_path / "s")
    ok("init", path)
    value = {"rows": ["x" * 1000] * 4000, "n": 7}  # about 4 MiB of JSON
    text = json.dumps(value)
    big = tmp_path / "big.json"
    big.write_text(text)
    for how in (["--file", str(big)], ["-"]):
        done = subprocess.run([str(WALSYNC), "put", "-s", path, f"k{len(how)}", *how],
                              input=text if how == ["-"] else None, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
    with Store.open(path, readonly=True) as store:
        assert store.get("k1") == value
        assert store.get("k2") == value
    ok("put", "-s", path, "plain", "-", "--string")  # stdin, kept as a string
    assert cli("put", "-s", path, "s", "-", "--string", stdin="héllo\n").exit_code == 0
    assert json.loads(ok("get", "-s", path, "s").stdout) == "héllo\n"


def test_put_input_refusals_are_usage_errors(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    ok("init", path)
    (tmp_path / "v.json").write_text("1")
    both = cli("put", "-s", path, "k", "2", "--file", str(tmp_path / "v.json"))
    assert both.exit_code == EXIT_USAGE
    assert "not both" in both.stderr
    neither = cli("put", "-s", path, "k")
    assert neither.exit_code == EXIT_USAGE
    assert "'-' for standard input" in neither.stderr
    (tmp_path / "bad.bin").write_bytes(b'"\xff\xfe"')
    binary = cli("put", "-s", path, "k", "--file", str(tmp_path / "bad.bin"))
    assert binary.exit_code == EXIT_USAGE
    assert "not UTF-8 text" in binary.stderr
    assert cli("put", "-s", path, "k", "--file", str(tmp_path / "nope")).exit_code == EXIT_USAGE
    assert cli("get", "-s", path, "k").exit_code == EXIT_NOT_FOUND  # nothing written


def test_scan_keys_only_has_help() -> None:
    text = " ".join(ok("scan", "--help").stdout.split())
    assert "--keys-only Print only the keys, one a line" in text


def test_init_on_an_existing_store_says_so(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    first = ok("init", path, "--node-id", "n-1")
    assert first.stdout.startswith(f"created store {path}")
    again = ok("init", path)
    assert again.stdout == f"store {path} already exists (node n-1); left as it is\n"
    other = cli("init", path, "--node-id", "n-2")
    assert_error(other, EXIT_USAGE, "n-1", "n-2")


def test_repair_without_damage_asks_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    ok("init", path)
    ok("put", "-s", path, "k", "1")
    result = cli("repair", "-s", path, stdin="")  # no answer to give: it must not ask
    assert result.exit_code == 0, result.output
    assert result.stdout == f"no damage found in {path}: nothing to repair\n"
    assert "[y/N]" not in result.output


def test_repair_with_damage_still_asks(tmp_path: Path) -> None:
    from tests.test_cli import sealed_store

    path = tmp_path / "s"
    segments = sealed_store(path)
    flip_byte(segments[1], 64 + 3)
    result = cli("repair", "-s", str(path), stdin="n\n")
    assert result.exit_code == EXIT_ERROR
    assert "damage:" in result.stdout
    assert "repair " in result.output
    assert not (path / "quarantine").exists()


def test_import_create_of_a_damaged_file_creates_nothing(tmp_path: Path) -> None:
    source = str(tmp_path / "src")
    ok("init", source)
    for i in range(20):
        ok("put", "-s", source, f"k{i}", str(i))
    file = tmp_path / "all.wsx"
    exported = ok("export", "-s", source, str(file))
    assert "of the whole store" in exported.stdout
    assert "''" not in exported.stdout
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))
    target = tmp_path / "target"
    result = cli("import", "-s", str(target), str(file), "--create")
    assert_error(result, EXIT_DAMAGE)
    assert not target.exists()


def test_export_names_what_it_holds(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    ok("init", path)
    ok("put", "-s", path, "a/1", "1")
    by_prefix = ok("export", "-s", path, str(tmp_path / "a.wsx"), "--prefix", "a/")
    assert "of prefix 'a/'" in by_prefix.stdout
    imported = ok("import", "-s", str(tmp_path / "t"), str(tmp_path / "a.wsx"), "--create")
    assert "of prefix 'a/'" in imported.stdout


def _two_sided(tmp_path: Path) -> str:
    """A store holding key "doc" in conflict: written on two stores, one imported."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ok("init", a, "--node-id", "A")
    ok("init", b, "--node-id", "B")
    ok("put", "-s", a, "doc", '{"by": "A"}')
    ok("put", "-s", a, "calm", "1")
    ok("put", "-s", b, "doc", '{"by": "B"}')
    ok("export", "-s", b, str(tmp_path / "b.wsx"))
    ok("import", "-s", a, str(tmp_path / "b.wsx"))
    return a


def test_conflicts_resolve_refuses_a_key_without_a_conflict(tmp_path: Path) -> None:
    store = _two_sided(tmp_path)
    assert_error(cli("conflicts", "resolve", "-s", store, "nosuch", "1"), EXIT_NOT_FOUND,
                 "no key 'nosuch'")
    calm = cli("conflicts", "resolve", "-s", store, "calm", "2")
    assert_error(calm, EXIT_ERROR, "has no conflict")
    assert "walsync put calm" in calm.stderr
    with Store.open(store, readonly=True) as s:
        assert s.get("calm") == 1  # nothing written
        assert s.get("nosuch") is None
    [done] = json_lines(ok("conflicts", "resolve", "-s", store, "doc", '{"by": "both"}',
                           "--json"))
    assert (done["key"], done["siblings_replaced"]) == ("doc", 2)
    assert isinstance(done["lsn"], int)
    assert ok("conflicts", "list", "-s", store).stdout == f"no conflicts in {store}\n"
    assert ok("conflicts", "list", "-s", store, "--json").stdout == ""


def test_lock_timeout_waits_for_the_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    ok("init", path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom walsync.engine import Store\n"
         "s = Store.open(sys.argv[1])\nprint('ready', flush=True)\ntime.sleep(1.5)\n"
         "s.close()", path], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        refused = cli("put", "-s", path, "k", "1")
        assert_error(refused, EXIT_LOCKED, "locked")
        assert "--lock-timeout SECONDS" in refused.stderr
        assert "lock_timeout_seconds" not in refused.stderr  # the library's name
        started = time.monotonic()
        waited = ok("put", "-s", path, "k", "1", "--lock-timeout", "30")
        assert time.monotonic() - started < 30
        assert waited.stdout == "committed at LSN 1\n"
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert cli("put", "-s", path, "k", "2", env={"WALSYNC_LOCK_TIMEOUT": "1"}).exit_code == 0


def test_empty_lists_say_so_for_people_and_print_nothing_for_scripts(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    ok("init", path)
    assert ok("runs", "list", "-s", path).stdout == f"no runs in {path}\n"
    assert ok("runs", "resumable", "-s", path).stdout == f"no resumable runs in {path}\n"
    for args in (["runs", "list"], ["runs", "resumable"], ["conflicts", "list"]):
        assert ok(*args, "-s", path, "--json").stdout == ""
