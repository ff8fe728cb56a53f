"""`walsync nodes` and `walsync restore --lost-node / --all-keys / --at / --lsn` from the
command line, against a real PostgreSQL server: README's block run as written, an
unknown node (exit 5, the known ones listed) and an ambiguous label (exit 2, the
matches listed), the table for people and the JSON for scripts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.sync.test_cli_readme import readme_block
from walsync.engine import Store
from walsync.engine.workflow import Workflows
from walsync.engine.workflow import keys as run_keys
from walsync.sync.cli import main
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent
ONCE = ReplicatorOptions(pull=False, retry_initial_seconds=0.02, retry_max_seconds=0.3)


def env_for(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSYNC_", "SUPABASE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["WALSYNC_PG_DSN"] = dsn
    return env


def cli(dsn: str, *args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(main, list(args), env=env_for(dsn), catch_exceptions=False)
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result


def ship(store: Store, dsn: str) -> None:
    transport = PostgresTransport(dsn)
    try:
        rep = Replicator(store, transport, ONCE)
        rep.run_once()
        rep.stop()
    finally:
        transport.close()


def host_a(path: Path) -> tuple[str, list[int]]:
    """A's store: a run, a user key, a later write; the LSNs of its writes."""
    lsns = []
    with Store.open(path, create=True) as store:
        with Workflows(store).run("invoices", "inv-1", total_steps=1) as run:
            run.step("fetch", lambda: {"orders": 3})
        lsns.append(store.put("notes/a", "first").lsn)
        return store.node_id, lsns


def test_readme_nodes_block_runs_as_written(tmp_path: Path, pg_db: str) -> None:
    from walsync.sync.migrate import migrate

    migrate(pg_db)
    lines = readme_block("### Nodes, and restoring a point in time")
    work = tmp_path / "work"
    work.mkdir()
    node, lsns = host_a(work / "state")
    done: list[str] = []
    outputs: list[str] = []
    for line in lines:
        if "--at TIME" in line:
            # between A's first writes and its later one: the later one is left out
            with Store.open(work / "state", create=False) as store:
                cut_ms = int(time.time() * 1000)
                time.sleep(0.01)
                store.put("notes/a", "second")
                ship(store, pg_db)
            line = line.replace("TIME", str(cut_ms))
        line = line.replace("NODE", node).replace("LSN", str(lsns[-1]))
        result = subprocess.run(["bash", "-c", f"set -e -o pipefail\n{line}"], cwd=work,
                                env=env_for(pg_db), capture_output=True, text=True,
                                timeout=300, check=False)
        done.append(f"$ {line}\n{result.stdout}{result.stderr}")
        assert result.returncode == 0, "\n".join(done)
        assert "Traceback" not in result.stderr, "\n".join(done)
        outputs.append(result.stdout)
    listing = outputs[1].splitlines()
    assert listing[0].split()[:2] == ["NODE", "LABEL"], outputs[1]
    assert any(row.startswith(node) and socket.gethostname() in row for row in listing[1:]), \
        outputs[1]  # labelled with the host's name by the sync
    with Store.open(work / "lost", readonly=True) as store:
        assert Workflows(store).get_run("inv-1").output("fetch") == {"orders": 3}
        assert store.get("notes/a") == "first"  # --all-keys: its keys outside the runs
    with Store.open(work / "then", readonly=True) as store:
        assert store.get("notes/a") == "first"
        assert Workflows(store).get_run("inv-1").output("fetch") == {"orders": 3}
    report = json.loads(outputs[-1])
    assert (report["point"]["last_node"], report["point"]["last_lsn"]) == (node, lsns[-1])
    with Store.open(work / "at-lsn", readonly=True) as store:
        assert store.get("notes/a") == "first"


def test_nodes_unknown_node_exits_5_listing_the_known_and_a_shared_label_exits_2(
        tmp_path: Path, pg_db: str) -> None:
    from walsync.sync.migrate import migrate

    migrate(pg_db)
    ids = []
    for name in ("a", "b"):
        with Store.open(tmp_path / name, create=True) as store:
            store.put(f"{name}/k", 1)
            ship(store, pg_db)
            ids.append(store.node_id)
    # a typo used to restore nothing and exit 0
    typo = cli(pg_db, "restore", "--to", str(tmp_path / "r1"), "--lost-node", ids[0] + "x",
               code=5)
    assert f"no node {ids[0] + 'x'!r}" in typo.stderr
    assert ids[0] in typo.stderr
    assert ids[1] in typo.stderr
    assert "walsync nodes" in typo.stderr  # the hint
    assert not (tmp_path / "r1").exists()
    lsn_typo = cli(pg_db, "restore", "--to", str(tmp_path / "r2"), "--lsn", "nobody:1", code=5)
    assert ids[0] in lsn_typo.stderr
    # one label on both: ambiguous, both listed; by id it works
    cli(pg_db, "nodes", "label", ids[0], "twin")
    cli(pg_db, "nodes", "label", ids[1], "twin")
    twin = cli(pg_db, "restore", "--to", str(tmp_path / "r3"), "--lost-node", "twin", code=2)
    assert "names 2 nodes" in twin.stderr
    assert ids[0] in twin.stderr
    assert ids[1] in twin.stderr
    cli(pg_db, "nodes", "label", "twin", "other", code=2)
    cli(pg_db, "nodes", "label", ids[1], "--clear")
    done = cli(pg_db, "restore", "--to", str(tmp_path / "r4"), "--lost-node", "twin",
               "--all-keys", "--json")
    report = json.loads(done.stdout)
    assert (report["lost_node"], report["lost_node_label"], report["other_keys"]) == (
        ids[0], "twin", 1)
    assert "its other keys (1)" in report["covers"]
    # without --all-keys the report says what it covers and what it left
    runs_only = cli(pg_db, "restore", "--to", str(tmp_path / "r5"), "--lost-node", ids[1])
    assert "not its other keys" in runs_only.stdout
    assert "--all-keys" in runs_only.stdout
    with Store.open(tmp_path / "r5", readonly=True) as store:
        assert store.get("b/k") is None
    # the listing: a table for people, one object a line for scripts
    table = cli(pg_db, "nodes").stdout.splitlines()
    assert table[0].split()[:3] == ["NODE", "LABEL", "FIRST"]
    # columns aligned: every column starts at its header's place on every row
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", table[0])]
    assert len(starts) == 8, table[0]
    for row in table[1:]:
        assert all(row[s - 2:s] == "  " for s in starts[1:]), (table[0], row)
    assert any("s ago" in line for line in table[1:]), table
    rows = [json.loads(line) for line in cli(pg_db, "nodes", "--json").stdout.splitlines()]
    assert [r["node_id"] for r in rows] == sorted(ids)
    by_id = {r["node_id"]: r for r in rows}
    assert by_id[ids[0]]["label"] == "twin"
    assert by_id[ids[1]]["label"] is None
    assert by_id[ids[0]]["acked_lsn"] >= 1
    assert by_id[ids[0]]["first_push_at"]
    assert by_id[ids[0]]["last_push_seconds_ago"] >= 0


def test_restore_lost_node_covers_its_runs_in_both_spellings_and_only_its_own(
        tmp_path: Path, pg_db: str) -> None:
    """A's runs (those whose index entry it wrote last) with all their keys, never a
    run whose id extends one of them, nor another node's run."""
    from walsync.sync.migrate import migrate

    migrate(pg_db)
    with Store.open(tmp_path / "a", create=True) as a:
        for run_id in ("r", "r2"):
            with Workflows(a).run("w", run_id, total_steps=1) as run:
                run.step("s", lambda: 1)
        a.put(run_keys.LEGACY.index("old"), {"legacy": True})
        a.put(run_keys.LEGACY.run("old"), {"run": "old"})
        ship(a, pg_db)
        a_id = a.node_id
    with Store.open(tmp_path / "b", create=True) as b:
        with Workflows(b).run("w", "r22", total_steps=1) as run:
            run.step("s", lambda: 2)
        ship(b, pg_db)
    report = json.loads(cli(pg_db, "restore", "--to", str(tmp_path / "out"), "--lost-node",
                            a_id, "--json").stdout)
    assert sorted(report["runs"]) == ["old", "r", "r2"]
    with Store.open(tmp_path / "out", readonly=True) as store:
        keys = [k for k, _ in store.iter_siblings("")]
    assert not any("r22" in k for k in keys), keys
    assert run_keys.LEGACY.run("old") in keys
    assert run_keys.CURRENT.run("r2") in keys


def test_leases_take_a_holder_by_label_too(tmp_path: Path, pg_db: str) -> None:
    from walsync.sync.migrate import migrate

    migrate(pg_db)
    with Store.open(tmp_path / "a", create=True) as a:
        a.put("k", 1)
        ship(a, pg_db)
        node = a.node_id
    transport = PostgresTransport(pg_db)
    try:
        assert transport.lease_acquire("run-1", node, 600).acquired
        assert transport.lease_acquire("run-2", "never-synced", 600).acquired
    finally:
        transport.close()
    cli(pg_db, "nodes", "label", node, "billing")
    by_label = [json.loads(line) for line in
                cli(pg_db, "leases", "--holder", "billing", "--json").stdout.splitlines()]
    assert [(r["run_id"], r["holder"]) for r in by_label] == [("run-1", node)]
    # a holder the server has no node row of (it never synced) is still a holder
    other = [json.loads(line) for line in
             cli(pg_db, "leases", "--holder", "never-synced", "--json").stdout.splitlines()]
    assert [r["run_id"] for r in other] == ["run-2"]
