"""`walsync export` and `walsync import` (sync/cli/store_cmds.py): JSON, progress, exit codes.

Exit codes as in sync/cli/exits.py's table: 0 ok, 1 error, 2 usage, 3 damaged file,
5 not found (the run, the export file, the store). Errors print ``error:`` and
``hint:`` lines on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from click.testing import CliRunner, Result

from walsync.engine import Store
from walsync.engine.versions import Sibling, Version
from walsync.engine.workflow import Workflows
from walsync.sync.cli import main

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DAMAGE, EXIT_NOT_FOUND = 0, 1, 2, 3, 5


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def ok(*args: str) -> Result:
    result = cli(*args)
    assert result.exit_code == EXIT_OK, (args, result.output, result.stderr)
    return result


def assert_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors, result.stderr
    assert any(line.startswith("hint: ") for line in lines), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def state(path: str) -> list[tuple[str, list[list[Any]]]]:
    with Store.open(path, create=False) as store:
        return [(k, [s.to_wire() for s in sibs]) for k, sibs in store.iter_siblings()]


@pytest.fixture
def source(tmp_path: Path) -> str:
    path = str(tmp_path / "source")
    with Store.open(path, node_id="src") as store:
        run = Workflows(store).run("invoice", "r1")
        run.step("fetch", lambda: {"rows": 3})
        store.put("other/1", "not part of the run")
        store.delete("other/2")
        store.apply_remote([
            ("other/1", Sibling(Version("node-x", 3, 1 << 16, {"node-x": 3}), 0,
                                cbor2.dumps("concurrent"))),
        ])
    return path


def test_export_then_import_moves_a_run_and_twice_changes_nothing(
    source: str, tmp_path: Path
) -> None:
    file = str(tmp_path / "r1.wsx")
    out = json.loads(ok("export", "-s", source, file, "--run", "r1", "--json").stdout)
    assert out["header"]["scope"] == "run"
    assert out["header"]["node_id"] == "src"
    assert out["keys"] == 3  # the run's record, its index entry, its step "fetch"
    target = str(tmp_path / "target")
    ok("init", target, "--node-id", "dst")
    first = json.loads(ok("import", "-s", target, file, "--json").stdout)
    assert first["lsn"] == 1
    assert (first["keys"], first["source_node"]) == (3, "src")
    moved = [(k, s) for k, s in state(source) if "r1" in k]
    assert state(target) == moved
    second = ok("import", "-s", target, file)
    assert "nothing new" in second.stdout
    assert state(target) == moved
    shown = json.loads(ok("runs", "show", "-s", target, "r1", "--json").stdout)
    assert shown["steps"][0]["output"] == {"rows": 3}


def test_whole_store_export_carries_siblings_and_tombstones(
    source: str, tmp_path: Path
) -> None:
    file = str(tmp_path / "all.wsx")
    result = ok("export", "--store", source, file)
    assert "exported 5 keys" in result.stdout
    assert result.stderr == ""  # no progress bar where stderr is not a terminal
    target = str(tmp_path / "target")
    imported = ok("import", "-s", target, file, "--create")
    assert imported.stderr == ""
    assert "of the whole store" in imported.stdout
    assert state(target) == state(source)
    conflicts = ok("conflicts", "list", "-s", target, "other/", "--json").stdout
    assert len(json.loads(conflicts)["siblings"]) == 2


def test_export_refusals(source: str, tmp_path: Path) -> None:
    file = tmp_path / "x.wsx"
    assert_error(cli("export", "-s", source, str(file), "--run", "nope"), EXIT_NOT_FOUND,
                 "'nope'")
    assert not file.exists()
    assert cli("export", "-s", source, str(file), "--run", "r1", "--prefix", "a").exit_code \
        == EXIT_USAGE
    assert_error(cli("export", "-s", str(tmp_path / "none"), str(file)), EXIT_NOT_FOUND,
                 "no walsync store")
    file.write_text("keep me")
    assert_error(cli("export", "-s", source, str(file)), EXIT_ERROR, "exists")
    assert file.read_text() == "keep me"
    ok("export", "-s", source, str(file), "--force")
    assert file.read_bytes().startswith(b"walsyncX")


def test_import_refusals_leave_the_store_as_it_was(source: str, tmp_path: Path) -> None:
    file = tmp_path / "all.wsx"
    ok("export", "-s", source, str(file))
    target = str(tmp_path / "target")
    ok("init", target)
    with Store.open(target) as store:
        store.put("mine", 1)
    before = state(target)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged = tmp_path / "damaged.wsx"
    damaged.write_bytes(bytes(data))
    assert_error(cli("import", "-s", target, str(damaged)), EXIT_DAMAGE, str(damaged),
                 "offset")
    truncated = tmp_path / "truncated.wsx"
    truncated.write_bytes(bytes(data[:-3]))
    assert_error(cli("import", "-s", target, str(truncated)), EXIT_DAMAGE, "truncated")
    assert_error(cli("import", "-s", target, str(tmp_path / "absent.wsx")), EXIT_NOT_FOUND,
                 "absent.wsx")
    assert_error(cli("import", "-s", str(tmp_path / "none"), str(file)), EXIT_NOT_FOUND,
                 "no walsync store")
    assert not (tmp_path / "none").exists()
    assert state(target) == before
