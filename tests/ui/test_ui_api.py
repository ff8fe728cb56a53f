"""`walsync ui`'s JSON API over stores made by the demo: what it reports, what it refuses.

Servers run in this process on a free loopback port and are spoken to over
real HTTP; a writer beside them is a child process holding the writer lock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.ui.conftest import DemoStore, Writer, api, exchange, request
from tests.ui.stores import CONFLICT_KEY, ROOT, SHOWCASE
from walsync.engine.record import SEGMENT_HEADER_BYTES
from walsync.sync.ui import DashboardServer

STATIC = ROOT / "sync" / "ui" / "static"

UI = Callable[..., DashboardServer]


# -- runs ------------------------------------------------------------------------------


def test_ui_runs_list_shows_the_demo_run_with_status_times_and_cost(
        demo_store: DemoStore, ui: UI) -> None:
    server = ui(demo_store.path)
    doc = api(server, "/api/runs")
    assert doc["total"] == doc["matched"] == 1
    (run,) = doc["runs"]
    assert run["run_id"] == demo_store.run_id
    assert (run["workflow"], run["status"]) == ("invoices", "completed")
    assert run["steps_done"] == run["total_steps"] == 5
    assert run["cost"]["usd"] == pytest.approx(demo_store.run_cost.usd)
    assert run["cost"]["usd"] > 0
    assert run["cost"]["tokens_in"] == demo_store.run_cost.tokens_in > 0
    assert run["started_at"]
    assert run["updated_at"]
    assert run["completed_at"]
    assert doc["counts"]["completed"] == 1
    assert sum(doc["counts"].values()) == 1


def test_ui_run_page_shows_the_crashed_and_resumed_step_and_costs(
        demo_store: DemoStore, ui: UI) -> None:
    doc = api(ui(demo_store.path), f"/api/runs/{demo_store.run_id}")
    steps = {s["step_id"]: s for s in doc["steps"]}
    assert [s["step_id"] for s in doc["steps"]] == demo_store.steps == [
        "fetch_orders", "compute_invoices", "summarise", "charge_cards", "email_receipts"]
    charge = steps["charge_cards"]
    # killed inside charge_cards; the resume found it running, not idempotent, and retried it
    assert charge["status"] == "success"
    assert charge["attempts"] == 2
    assert charge["interrupted_at"] is not None
    assert charge["idempotent"] is False
    assert charge["created_at"] < charge["interrupted_at"] < charge["completed_at"]
    assert all(s["attempts"] == 1 and s["interrupted_at"] is None
               for sid, s in steps.items() if sid != "charge_cards")
    for sid, cost in demo_store.step_costs.items():
        assert steps[sid]["cost"]["usd"] == pytest.approx(cost.usd)
    assert steps["summarise"]["cost"]["tokens_out"] > 0
    assert doc["run"]["cost"]["usd"] == pytest.approx(demo_store.run_cost.usd)
    assert [c["name"] for c in doc["checkpoints"]] == ["before-charges"]
    assert doc["checkpoints"][0]["steps"] == 3
    assert doc["needs_attention"] == []
    assert doc["failed"] == []
    assert doc["rollbacks"] == []
    assert doc["span"]["start"] <= charge["created_at"]


def test_ui_runs_filter_by_status_and_search_by_run_id_or_workflow(
        showcase_store: DemoStore, ui: UI) -> None:
    server = ui(showcase_store.path)

    def ids(query: str) -> set[str]:
        return {r["run_id"] for r in api(server, f"/api/runs?{query}")["runs"]}

    assert ids("status=paused") == {SHOWCASE["attention"], SHOWCASE["rolled_back"]}
    assert ids("status=failed,running") == {SHOWCASE["failed"], SHOWCASE["running"]}
    assert ids("status=failed&status=completed") == {
        SHOWCASE["failed"], SHOWCASE["etl"], showcase_store.run_id}
    assert ids("q=TICKET") == {SHOWCASE["attention"]}
    assert ids("q=invoices") == {SHOWCASE["failed"], showcase_store.run_id}  # the workflow
    assert ids("q=invoices&status=failed") == {SHOWCASE["failed"]}
    assert ids("q=no-such-thing") == set()
    doc = api(server, "/api/runs?status=paused")
    assert doc["total"] == 6
    assert doc["matched"] == 2
    assert doc["counts"] == {"cancelled": 0, "completed": 2, "failed": 1, "paused": 2,
                             "pending": 0, "running": 1}
    newest_first = [r["updated_at"] for r in api(server, "/api/runs")["runs"]]
    assert newest_first == sorted(newest_first, reverse=True)


def test_ui_run_page_marks_attention_failures_rollbacks_and_large_outputs(
        showcase_store: DemoStore, ui: UI) -> None:
    server = ui(showcase_store.path)
    attention = api(server, f"/api/runs/{SHOWCASE['attention']}")
    assert attention["needs_attention"] == ["send_reply"]
    assert attention["run"]["status"] == "paused"
    (reply,) = [s for s in attention["steps"] if s["step_id"] == "send_reply"]
    assert reply["interrupted_at"] is not None
    assert reply["idempotent"] is False

    failed = api(server, f"/api/runs/{SHOWCASE['failed']}")
    assert failed["failed"] == ["charge_cards"]
    assert failed["run"]["error"]["type"] == "CardDeclinedError"
    (charge,) = [s for s in failed["steps"] if s["step_id"] == "charge_cards"]
    assert "insufficient funds" in charge["error"]["message"]
    assert "Traceback" in charge["error"]["traceback"]

    rolled = api(server, f"/api/runs/{SHOWCASE['rolled_back']}")
    assert rolled["run"]["rolled_back_to"] == "draft-ready"
    assert [(r["rollback"], [s["step_id"] for s in r["steps"]]) for r in rolled["rollbacks"]] \
        == [(1, ["polish"])]
    assert [s["step_id"] for s in rolled["steps"]] == ["draft"]
    assert rolled["run"]["cost"]["usd"] == pytest.approx(0.0588)  # spent money stays counted

    running = api(server, f"/api/runs/{SHOWCASE['running']}")
    (embed,) = [s for s in running["steps"] if s["step_id"] == "embed"]
    assert (embed["status"], embed["fraction"]) == ("running", 0.45)
    assert json.loads(embed["cursor"]["text"]) == {"chunk": 558}

    etl = api(server, f"/api/runs/{SHOWCASE['etl']}")
    extract = next(s for s in etl["steps"] if s["step_id"] == "extract")
    assert extract["output"]["stored_apart"] is True  # larger than the inline limit
    assert extract["output"]["truncated"] is True
    assert len(extract["output"]["text"]) == 240 < extract["output"]["chars"]
    full = api(server, f"/api/runs/{SHOWCASE['etl']}/steps/extract/output")
    assert full["truncated"] is False
    rows = json.loads(full["text"])
    assert len(rows) == 900
    assert rows[-1] == {"row": 899, "sku": "SKU-00899", "qty": 899 % 7}
    transform = next(s for s in etl["steps"] if s["step_id"] == "transform")
    assert transform["cost"]["counters"] == {"gpu_seconds": 3.5}


def test_ui_unknown_runs_steps_and_routes_are_not_found(demo_store: DemoStore, ui: UI) -> None:
    server = ui(demo_store.path)
    status, doc = request(server, "GET", "/api/runs/no-such-run")
    assert status == 404
    assert "no-such-run" in doc["error"]
    assert doc["hint"]
    status, doc = request(server, "GET", f"/api/runs/{demo_store.run_id}/steps/nope/output")
    assert status == 404
    assert "nope" in doc["error"]
    assert request(server, "GET", "/api/nothing")[0] == 404
    assert request(server, "GET", "/static/../../STORE")[0] == 404
    assert request(server, "GET", "/static/secrets.txt")[0] == 404


# -- read-only by default ----------------------------------------------------------------


def _action_routes(run_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"/api/runs/{run_id}/steps/send_reply/resolve", {"action": "retry"}),
        (f"/api/runs/{run_id}/rollback", {"checkpoint": "draft-ready"}),
        ("/api/conflicts/resolve", {"key": CONFLICT_KEY, "keep": "x:1", "seen": []}),
        ("/api/anything", {}),
    ]


def test_ui_without_allow_actions_refuses_every_write(showcase_store: DemoStore, ui: UI) -> None:
    server = ui(showcase_store.path)
    before = api(server, "/api/health")["applied_lsn"]
    for path, body in _action_routes(SHOWCASE["attention"]):
        status, doc = request(server, "POST", path, body)
        assert status == 405, (path, status, doc)
        assert "read-only" in doc["error"]
        assert "--allow-actions" in doc["hint"]
    for method in ("PUT", "DELETE", "PATCH"):
        status, doc = request(server, method, f"/api/runs/{SHOWCASE['attention']}", {})
        assert status == 405, (method, doc)
    assert api(server, "/api/meta")["actions"] is False
    assert api(server, "/api/health")["applied_lsn"] == before
    attention = api(server, f"/api/runs/{SHOWCASE['attention']}")
    assert attention["needs_attention"] == ["send_reply"]


# -- actions ---------------------------------------------------------------------------------


def test_ui_actions_resolve_roll_back_and_resolve_conflicts(
        showcase_store: DemoStore, store_copy: Callable[[Path], Path], ui: UI) -> None:
    server = ui(store_copy(showcase_store.path), allow_actions=True)
    assert api(server, "/api/meta")["actions"] is True

    status, doc = request(server, "POST",
                          f"/api/runs/{SHOWCASE['attention']}/steps/send_reply/resolve",
                          {"action": "skip"})
    assert status == 200, doc
    assert doc["status"] == "skipped"
    run = api(server, f"/api/runs/{SHOWCASE['attention']}")
    assert run["needs_attention"] == []
    assert {s["step_id"]: s["status"] for s in run["steps"]}["send_reply"] == "skipped"
    status, doc = request(server, "POST",
                          f"/api/runs/{SHOWCASE['attention']}/steps/send_reply/resolve",
                          {"action": "retry"})
    assert status == 409
    assert "not needs_attention" in doc["error"]

    status, doc = request(server, "POST", f"/api/runs/{showcase_store.run_id}/rollback",
                          {"checkpoint": "before-charges"})
    assert status == 200, doc
    assert (doc["rollback"], doc["discarded_steps"]) == (1, ["charge_cards", "email_receipts"])
    run = api(server, f"/api/runs/{showcase_store.run_id}")
    assert run["run"]["status"] == "paused"
    assert run["run"]["rolled_back_to"] == "before-charges"
    assert [s["step_id"] for s in run["steps"]] == ["fetch_orders", "compute_invoices",
                                                    "summarise"]
    assert [(r["rollback"], [s["step_id"] for s in r["steps"]]) for r in run["rollbacks"]] \
        == [(1, ["charge_cards", "email_receipts"])]
    status, doc = request(server, "POST", f"/api/runs/{showcase_store.run_id}/rollback",
                          {"checkpoint": "no-such-checkpoint"})
    assert status == 404
    assert "no-such-checkpoint" in doc["error"]

    (conflict,) = api(server, "/api/replication")["conflicts"]["conflicts"]
    assert conflict["key"] == CONFLICT_KEY
    dots = [s["dot"] for s in conflict["siblings"]]
    remote = next(s for s in conflict["siblings"] if s["origin"] == "node-berlin-2")
    assert json.loads(remote["value"]["text"]) == {"plan": "pro", "usd_per_seat": 14}
    status, doc = request(server, "POST", "/api/conflicts/resolve",
                          {"key": CONFLICT_KEY, "keep": remote["dot"], "seen": dots[:1]})
    assert status == 409
    assert "changed since" in doc["error"]
    status, doc = request(server, "POST", "/api/conflicts/resolve",
                          {"key": CONFLICT_KEY, "keep": remote["dot"], "seen": dots})
    assert status == 200, doc
    assert api(server, "/api/replication")["conflicts"]["conflicts"] == []
    status, doc = request(server, "POST", "/api/conflicts/resolve",
                          {"key": CONFLICT_KEY, "keep": remote["dot"], "seen": dots})
    assert status == 409
    assert "no conflict" in doc["error"]


def test_ui_actions_fail_clearly_while_another_process_is_the_writer(
        showcase_store: DemoStore, store_copy: Callable[[Path], Path], ui: UI,
        writer: Callable[[Path], Writer]) -> None:
    path = store_copy(showcase_store.path)
    server = ui(path, allow_actions=True)
    live = writer(path)
    status, doc = request(server, "POST",
                          f"/api/runs/{SHOWCASE['attention']}/steps/send_reply/resolve",
                          {"action": "retry"})
    assert status == 409, doc
    assert doc["pid"] == live.pid
    assert f"pid {live.pid}" in doc["error"]
    assert "writer lock" in doc["hint"]
    # reading goes on beside the writer, and nothing was changed
    assert api(server, f"/api/runs/{SHOWCASE['attention']}")["needs_attention"] == ["send_reply"]
    live.stop()
    status, doc = request(server, "POST",
                          f"/api/runs/{SHOWCASE['attention']}/steps/send_reply/resolve",
                          {"action": "retry"})
    assert status == 200
    assert doc["status"] == "pending"


def test_ui_actions_refuse_requests_not_made_by_the_page(
        showcase_store: DemoStore, store_copy: Callable[[Path], Path], ui: UI) -> None:
    server = ui(store_copy(showcase_store.path), allow_actions=True)
    path = f"/api/runs/{SHOWCASE['attention']}/steps/send_reply/resolve"
    status, doc = request(server, "POST", path, {"action": "retry"}, token=False)
    assert status == 403
    assert "token" in doc["error"]
    status, doc = request(server, "POST", path, {"action": "retry"},
                          headers={"X-Walsync-Token": "guessed"})
    assert status == 403
    status, doc = request(server, "POST", path, raw=b"action=retry",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    status, doc = request(server, "POST", path, {"action": "retry"},
                          headers={"Origin": "http://evil.example"})
    assert status == 403
    assert "evil.example" in doc["error"]
    status, doc = request(server, "POST", path, {"action": "explode"})
    assert status == 400
    assert "retry" in doc["error"]
    status, doc = request(server, "POST", path, raw=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert status == 400
    # none of it changed anything
    assert api(server, f"/api/runs/{SHOWCASE['attention']}")["needs_attention"] == ["send_reply"]
    status, doc = request(server, "POST", path, {"action": "retry"},
                          headers={"Origin": f"http://127.0.0.1:{server.port}"})
    assert status == 200, doc


def test_ui_answers_only_its_own_host_name(demo_store: DemoStore, ui: UI) -> None:
    """A DNS-rebinding page (evil.example resolving to 127.0.0.1) cannot read the API."""
    server = ui(demo_store.path)
    status, doc = request(server, "GET", "/api/runs", headers={"Host": "evil.example"})
    assert status == 421
    assert "Host" in doc["error"]
    status, _ = request(server, "GET", "/api/runs",
                        headers={"Host": f"evil.example:{server.port}"})
    assert status == 421
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
        assert request(server, "GET", "/api/runs", headers={"Host": host})[0] == 200


# -- beside a live writer ----------------------------------------------------------------------


def test_ui_reads_beside_a_live_writer_and_follows_its_compaction(
        demo_store: DemoStore, store_copy: Callable[[Path], Path], ui: UI,
        writer: Callable[[Path], Writer]) -> None:
    path = store_copy(demo_store.path)
    live = writer(path)
    server = ui(path)  # opened while the writer holds the lock
    health = api(server, "/api/health")
    assert health["writer"] == {"alive": True, "pid": live.pid, "crashed": False}

    def run_ids() -> set[str]:
        return {r["run_id"] for r in api(server, "/api/runs")["runs"]}

    status, headers, _ = exchange(server, "GET", "/api/runs")
    assert status == 200
    idle = exchange(server, "GET", "/api/runs", headers={"If-None-Match": headers["ETag"]})
    assert (idle[0], idle[2]) == (304, "")  # nothing committed: a poll costs no rebuild
    live.send("run late-1")
    assert "late-1" in run_ids()  # the same reader sees the writer's new commit
    status, moved, _ = exchange(server, "GET", "/api/runs",
                                headers={"If-None-Match": headers["ETag"]})
    assert status == 200
    assert moved["ETag"] != headers["ETag"]
    live.send("compact")  # the writer swaps the snapshot directory for a compact copy
    live.send("run late-2")
    assert {"late-1", "late-2", demo_store.run_id} <= run_ids()
    assert api(server, "/api/runs/late-2")["run"]["status"] == "completed"


def test_ui_says_when_the_store_is_gone_and_recovers_when_it_is_back(
        demo_store: DemoStore, store_copy: Callable[[Path], Path], ui: UI) -> None:
    path = store_copy(demo_store.path)
    server = ui(path)
    assert api(server, "/api/runs")["total"] == 1
    away = path.with_name("moved")
    path.rename(away)
    status, doc = request(server, "GET", "/api/runs")
    assert status == 503
    assert "no walsync store" in doc["error"]
    away.rename(path)
    assert api(server, "/api/runs")["total"] == 1


# -- store health and verify -------------------------------------------------------------------


def test_ui_health_reports_sizes_checkpoint_and_writer(demo_store: DemoStore, ui: UI) -> None:
    doc = api(ui(demo_store.path), "/api/health")
    assert doc["applied_lsn"] > 0
    assert doc["keys"] > 0
    assert doc["snapshot_bytes"] > 0
    assert doc["writer"] == {"alive": False, "pid": None, "crashed": False}
    assert doc["last_checkpoint"]["base_lsn"] == doc["applied_lsn"]  # closed cleanly
    assert abs(doc["last_checkpoint"]["at_unix"] - time.time()) < 600
    assert doc["verify"] is None


def test_ui_verify_finds_real_damage_and_is_remembered(
        demo_store: DemoStore, store_copy: Callable[[Path], Path], ui: UI,
        writer: Callable[[Path], Writer]) -> None:
    path = store_copy(demo_store.path)
    live = writer(path)
    live.send("put 50")
    server = ui(path)
    clean = api(server, "/api/verify")
    assert clean["ok"] is True
    assert clean["records"] >= 50
    assert clean["damage"] == []
    assert api(server, "/api/health")["verify"]["ok"] is True
    segment = Path(live.send("segment")["segment"])
    with open(segment, "r+b") as f:  # one byte of an early frame, valid frames after it
        f.seek(SEGMENT_HEADER_BYTES + 1000)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    damaged = api(server, "/api/verify")
    assert damaged["ok"] is False
    assert damaged["damage"]
    assert segment.name in damaged["damage"][0]["message"]
    assert api(server, "/api/health")["verify"]["ok"] is False
    live.proc.send_signal(signal.SIGKILL)  # this store is not to be opened again


# -- replication -------------------------------------------------------------------------------


def test_ui_replication_says_when_sync_is_not_configured(demo_store: DemoStore, ui: UI) -> None:
    doc = api(ui(demo_store.path, environ={}), "/api/replication")
    assert doc["configured"] is False
    assert "WALSYNC_PG_DSN" in doc["reason"]
    assert doc["local"]["synced_before"] is False
    assert doc["conflicts"] == {"conflicts": [], "more": False}


def test_ui_replication_reports_a_config_error_as_not_configured(
        demo_store: DemoStore, ui: UI, tmp_path: Path) -> None:
    config = tmp_path / "walsync.conf"
    config.write_text("SUPABASE_URL=https://example.supabase.co\n")
    doc = api(ui(demo_store.path, environ={"WALSYNC_CONFIG": str(config)}), "/api/replication")
    assert doc["configured"] is False
    assert "SUPABASE_SERVICE_ROLE_KEY" in doc["reason"]


@pytest.mark.postgres
def test_ui_replication_shows_recovery_point_nodes_leases_and_lag(
        demo_store: DemoStore, store_copy: Callable[[Path], Path], ui: UI,
        writer: Callable[[Path], Writer], pg_db: str) -> None:
    from walsync.engine import Store
    from walsync.sync.lease import Leases
    from walsync.sync.migrate import migrate
    from walsync.sync.postgres import PostgresTransport
    from walsync.sync.replicator import Replicator, ReplicatorOptions

    migrate(pg_db)
    path = store_copy(demo_store.path)
    with Store.open(path) as store:
        store.set_retain_floor(1)
        rep = Replicator(store, PostgresTransport(pg_db), ReplicatorOptions(pull=False))
        rep.ship()
        rep.close()
        node, applied = store.node_id, store.applied_lsn
    leases = Leases(PostgresTransport(pg_db), node, ttl_seconds=60)
    leases.acquire(demo_store.run_id)
    leases.transport.close()

    server = ui(path, environ={"WALSYNC_PG_DSN": pg_db})
    doc = api(server, "/api/replication")
    assert doc["configured"] is True
    assert "password" not in json.dumps(doc)
    local, remote = doc["local"], doc["remote"]
    assert remote["error"] is None
    assert local["acked_lsn"] == applied
    assert local["unreplicated_entries"] == 0
    assert local["oldest_unreplicated_age_seconds"] is None
    me = next(n for n in remote["nodes"] if n["this_node"])
    assert me["node_id"] == node
    assert me["acked_lsn"] == applied
    assert abs(me["recovery_point_unix_ms"] / 1000 - time.time()) < 600
    assert remote["head"] > 0
    assert [(lease["run_id"], lease["holder"], lease["live"]) for lease in remote["leases"]] \
        == [(demo_store.run_id, node, True)]

    live = writer(path)  # commits the worker has not shipped: the lag grows
    live.send("put 5")
    time.sleep(0.2)
    lagging = api(server, "/api/replication")["local"]
    assert lagging["unreplicated_entries"] == 5
    assert lagging["oldest_unreplicated_age_seconds"] >= 0.2


def test_ui_replication_survives_an_unreachable_server(demo_store: DemoStore, ui: UI) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ui(demo_store.path, environ={
        "WALSYNC_PG_DSN": f"postgresql://walsync@127.0.0.1:{port}/nowhere?connect_timeout=2"})
    started = time.monotonic()
    doc = api(server, "/api/replication")
    assert time.monotonic() - started < 15
    assert doc["configured"] is True
    assert doc["remote"]["error"]
    assert doc["remote"]["nodes"] == []
    assert doc["local"]["node_id"]
    assert api(server, "/api/runs")["total"] == 1  # the rest of the dashboard is unaffected


# -- assets and the command ----------------------------------------------------------------------


def test_ui_assets_ship_in_the_package_and_fetch_nothing_from_elsewhere(
        demo_store: DemoStore, ui: UI) -> None:
    server = ui(demo_store.path)
    names = sorted(p.name for p in STATIC.iterdir())
    assert names == ["app.css", "app.js", "favicon.svg", "index.html"]
    for name in names:
        status, body = request(server, "GET", f"/static/{name}")
        assert status == 200, name
        assert body == (STATIC / name).read_text(), name
        outside = [u for u in re.findall(r"https?://[^\s\"'`)]+", body)
                   if u != "http://www.w3.org/2000/svg"]
        assert outside == [], (name, outside)
    status, page = request(server, "GET", "/")
    assert status == 200
    assert "<main id=\"view\">" in page
    assert all(ref.startswith(("/", "#")) for ref in re.findall(r'(?:src|href)="([^"]*)"', page))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"ui/static/*"' in pyproject  # shipped as package data


def test_ui_command_serves_until_sigterm_and_refuses_a_missing_store(
        demo_store: DemoStore, tmp_path: Path) -> None:
    import urllib.request

    missing = subprocess.run([sys.executable, "-m", "walsync.sync.cli", "ui",
                              "--store", str(tmp_path / "nothing"), "--port", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 5, missing.stderr
    assert "error: no walsync store" in missing.stderr
    assert "hint:" in missing.stderr

    proc = subprocess.Popen([sys.executable, "-m", "walsync.sync.cli", "ui",
                             "--store", str(demo_store.path), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+/) \(read-only", line)
        assert found, line
        with urllib.request.urlopen(found.group(1) + "api/meta", timeout=10) as response:
            meta = json.loads(response.read())
        assert meta["actions"] is False
        assert meta["store"] == str(demo_store.path)
        assert meta["store_path"] == str(demo_store.path.resolve())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
