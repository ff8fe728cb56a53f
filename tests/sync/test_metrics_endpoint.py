"""The Prometheus endpoint (sync/metrics.py) scraped during replication to a real PostgreSQL.

In process: counters and histograms move as commits and pushes happen, lag rises
with unshipped commits and falls back to 0 once the server acknowledged them,
pulls and conflicts count what another node wrote. As a process: ``walsync sync
--metrics-port`` serves every documented name with its type, and stops cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from tests.sync._helpers import wait_for
from walsync.engine import ConflictError, Store
from walsync.engine.record import SEGMENT_HEADER_BYTES
from walsync.sync.cli import main
from walsync.sync.metrics import EXPOSED_LATENCY_BOUNDS_SECONDS, MetricsServer, serve
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

ROOT = Path(__file__).resolve().parents[2]
WALSYNC = Path(sys.executable).with_name("walsync")
FAST = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                         retry_initial_seconds=0.02, retry_max_seconds=0.3)

#: every family the endpoint serves for a store with a replicator, and its type
FAMILIES = {
    "walsync_commit_duration_seconds": "histogram",
    "walsync_commits": "counter",
    "walsync_wal_bytes_written": "counter",
    "walsync_wal_syncs": "counter",
    "walsync_group_commit_batch_size": "histogram",
    "walsync_replay_duration_seconds": "gauge",
    "walsync_replay_records": "gauge",
    "walsync_checkpoints": "counter",
    "walsync_errors": "counter",
    "walsync_applied_lsn": "gauge",
    "walsync_store_poisoned": "gauge",
    "walsync_push_duration_seconds": "histogram",
    "walsync_push_entries": "counter",
    "walsync_push_bytes": "counter",
    "walsync_pulls": "counter",
    "walsync_pull_entries": "counter",
    "walsync_replication_acked_lsn": "gauge",
    "walsync_replication_lag_entries": "gauge",
    "walsync_replication_lag_bytes": "gauge",
    "walsync_replication_lag_seconds": "gauge",
    "walsync_sync_retries": "counter",
    "walsync_conflicts": "counter",
    "walsync_fenced_writes": "counter",
    "walsync_lost_runs": "counter",
    "walsync_sync_reships": "counter",
    "walsync_sync_node_renewals": "counter",
    "walsync_last_push_success_timestamp_seconds": "gauge",
    "walsync_last_pull_timestamp_seconds": "gauge",
    "walsync_replicator_running": "gauge",
}


class Scrape:
    """One scrape of /metrics, parsed by prometheus_client's own parser."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def __getitem__(self, name: str) -> float:
        return self.samples[(name, ())]

    def get(self, name: str) -> float | None:
        return self.samples.get((name, ()))

    def buckets(self, name: str) -> list[tuple[float, float]]:
        out = [(float(dict(labels)["le"]), value) for (n, labels), value in self.samples.items()
               if n == f"{name}_bucket"]
        return sorted(out)

    def check_histogram(self, name: str) -> None:
        """Cumulative buckets ending in +Inf == _count, as Prometheus requires."""
        buckets = self.buckets(name)
        counts = [n for _, n in buckets]
        assert counts == sorted(counts)
        assert buckets[-1] == (float("inf"), self[f"{name}_count"])


def frame_bytes(store: Store, after: int = 0) -> int:
    return sum(r.size_bytes for r in store.wal_reader().read(after, store.applied_lsn, 1 << 20))


@pytest.fixture
def schema(pg_db: str) -> str:
    migrate(pg_db)
    return pg_db


def replicator(store: Store, dsn: str) -> Replicator:
    return Replicator(store, PostgresTransport(dsn, timeout_seconds=10,
                                               connect_timeout_seconds=3), FAST)


@pytest.fixture
def node_a(tmp_path: Path, schema: str) -> Iterator[tuple[Store, Replicator, MetricsServer]]:
    store = Store.open(tmp_path / "a", node_id="A")
    rep = replicator(store, schema)
    server = serve(store, rep, 0)
    try:
        yield store, rep, server
    finally:
        server.close()
        rep.close()
        store.close()


@pytest.mark.postgres
def test_scraped_values_move_with_commits_and_pushes(
        node_a: tuple[Store, Replicator, MetricsServer], tmp_path: Path, schema: str) -> None:
    store, rep, server = node_a
    first = Scrape(server.url)
    assert first["walsync_commits_total"] == 0
    assert first["walsync_commit_duration_seconds_count"] == 0
    assert first["walsync_push_entries_total"] == 0
    assert first["walsync_replication_lag_entries"] == 0
    assert first["walsync_replicator_running"] == 0
    assert first.get("walsync_last_push_success_timestamp_seconds") is None  # never pushed
    assert [b for b, _ in first.buckets("walsync_commit_duration_seconds")] == [
        *EXPOSED_LATENCY_BOUNDS_SECONDS, float("inf")]

    # commits before the replicator runs: commit counters move, lag builds up
    for i in range(5):
        store.put(f"k{i}", {"i": i, "pad": "x" * 300})
    time.sleep(0.02)  # the oldest unacknowledged commit ages
    unshipped = Scrape(server.url)
    assert unshipped["walsync_commits_total"] == 5
    assert unshipped["walsync_commit_duration_seconds_count"] == 5
    assert unshipped["walsync_commit_duration_seconds_sum"] > 0
    unshipped.check_histogram("walsync_commit_duration_seconds")
    assert unshipped["walsync_group_commit_batch_size_sum"] == 5
    assert unshipped["walsync_wal_bytes_written_total"] == frame_bytes(store) + SEGMENT_HEADER_BYTES
    assert unshipped["walsync_applied_lsn"] == 5
    assert unshipped["walsync_replication_lag_entries"] == 5
    # the WAL bytes of the five records (plus the segment header the reader has not
    # passed yet), not the active segment's preallocated size
    assert frame_bytes(store) <= unshipped["walsync_replication_lag_bytes"] <= (
        frame_bytes(store) + SEGMENT_HEADER_BYTES)
    assert unshipped["walsync_replication_lag_seconds"] >= 0.02
    assert unshipped["walsync_push_entries_total"] == 0

    # the replicator ships them: push counters move, lag returns to 0
    started = time.time()
    rep.start()
    shipped = wait_for(lambda: (s := Scrape(server.url))["walsync_replication_lag_entries"] == 0
                       and s["walsync_push_entries_total"] == 5 and s, what="the first push")
    assert shipped["walsync_replicator_running"] == 1
    assert shipped["walsync_replication_acked_lsn"] == 5
    assert shipped["walsync_replication_lag_bytes"] == 0
    assert shipped["walsync_replication_lag_seconds"] == 0
    assert shipped["walsync_push_bytes_total"] == frame_bytes(store)
    assert shipped["walsync_push_duration_seconds_count"] >= 1
    assert shipped["walsync_push_duration_seconds_sum"] > 0
    shipped.check_histogram("walsync_push_duration_seconds")
    assert started <= shipped["walsync_last_push_success_timestamp_seconds"] <= time.time()

    # 'remote' commits return once pushed: both histograms move together
    for i in range(3):
        store.put(f"r{i}", i, durability="remote")
    remote = Scrape(server.url)
    assert remote["walsync_commits_total"] == 8
    assert remote["walsync_commit_duration_seconds_count"] == 8
    assert remote["walsync_push_entries_total"] == 8
    assert (remote["walsync_push_duration_seconds_count"]
            > shipped["walsync_push_duration_seconds_count"])
    assert (remote["walsync_last_push_success_timestamp_seconds"]
            >= shipped["walsync_last_push_success_timestamp_seconds"])
    assert remote["walsync_replication_lag_entries"] == 0

    # another node writes k0 too, concurrently: A pulls its entries and a conflict
    with Store.open(tmp_path / "b", node_id="B") as other:
        other.put("k0", "from B")
        other.put("only-b", 1)
        rep_b = replicator(other, schema)
        try:
            assert rep_b.run_once()[0] == 2
        finally:
            rep_b.close()
    pulled = wait_for(lambda: (s := Scrape(server.url))["walsync_pull_entries_total"] == 2 and s,
                      what="A pulling B's entries")
    assert pulled["walsync_conflicts_total"] == 1
    assert pulled["walsync_pulls_total"] > shipped["walsync_pulls_total"]
    assert pulled["walsync_last_pull_timestamp_seconds"] >= started
    assert pulled["walsync_commits_total"] == 8  # merge records are not commits
    assert pulled["walsync_sync_retries_total"] == 0
    assert pulled["walsync_fenced_writes_total"] == 0
    assert not [k for k in pulled.samples if k[0] == "walsync_errors_total"]  # no errors yet
    assert pulled["walsync_store_poisoned"] == 0


@pytest.mark.postgres
def test_errors_are_labelled_by_kind(node_a: tuple[Store, Replicator, MetricsServer]) -> None:
    store, _rep, server = node_a
    store.put("x", 1)
    for _ in range(2):
        with pytest.raises(ConflictError):
            store.put("x", 2, expect=None)
    scrape = Scrape(server.url)
    assert scrape.samples[("walsync_errors_total", (("kind", "ConflictError"),))] == 2
    assert scrape.types["walsync_errors"] == "counter"
    assert scrape["walsync_commits_total"] == 1


@pytest.mark.postgres
def test_a_scrape_after_the_store_closed_still_answers(tmp_path: Path, schema: str) -> None:
    """An embedded endpoint may outlive the store it reports on: a late scrape gets
    the last values, not an error."""
    store = Store.open(tmp_path / "a", node_id="A")
    rep = replicator(store, schema)
    server = serve(store, rep, 0)
    try:
        store.put("x", 1)
        rep.ship()
        assert Scrape(server.url)["walsync_push_entries_total"] == 1
        rep.close()
        store.close()
        late = Scrape(server.url)
        assert late["walsync_commits_total"] == 1
        assert late["walsync_push_entries_total"] == 1
        assert late["walsync_replication_lag_entries"] == 0
    finally:
        server.close()
        rep.close()
        store.close()


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """The first stdout line starting with ``prefix`` (the process must print it in time)."""
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, f"no line starting with {prefix!r} within {timeout} s"
    return found[0]


@pytest.mark.postgres
def test_cli_sync_serves_every_metric_with_its_type(tmp_path: Path, schema: str) -> None:
    path = tmp_path / "cli"
    with Store.open(path, node_id="C") as store:
        for i in range(4):
            store.put(f"c{i}", i)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "WALSYNC_CONFIG",
                        "WALSYNC_TRANSPORT", "WALSYNC_STORE")}
    env["WALSYNC_PG_DSN"] = schema
    env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.Popen(
        [str(WALSYNC), "sync", "--store", str(path), "--metrics-port", "0",
         "--status-every", "0"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        url = _read_line(proc, "metrics on ", 20).removeprefix("metrics on ")
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/metrics")
        scrape: Scrape = wait_for(
            lambda: ((s := Scrape(url))["walsync_push_entries_total"] == 4
                     and s.get("walsync_last_pull_timestamp_seconds") is not None and s),
            what="the CLI worker to push the store's 4 entries and pull")
        missing = {name: kind for name, kind in FAMILIES.items()
                   if scrape.types.get(name) != kind}
        assert not missing, missing
        assert set(scrape.types) == set(FAMILIES)
        readme = (ROOT / "README.md").read_text()
        metrics_doc = sys.modules["walsync.sync.metrics"].__doc__ or ""
        for name, kind in FAMILIES.items():
            exposed = f"{name}_total" if kind == "counter" else name
            assert f"`{exposed}" in readme, f"README.md does not list {exposed}"
            assert exposed in metrics_doc, f"sync/metrics.py does not list {exposed}"
        assert scrape["walsync_replication_lag_entries"] == 0
        assert scrape["walsync_replicator_running"] == 1
        assert scrape["walsync_commits_total"] == 0  # the worker process committed nothing
        assert scrape["walsync_replay_records"] == 0  # a clean close left nothing to replay
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            # say where it is stuck: faulthandler prints every thread's stack on SIGABRT
            proc.send_signal(signal.SIGABRT)
            _, stderr = proc.communicate(timeout=10)
            pytest.fail(f"the worker did not stop within 30 s of SIGINT:\n{stderr}")
        assert proc.returncode == 130, stderr  # interrupted (README: exit codes)
        assert "Traceback" not in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_metrics_port_is_refused_with_once(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["sync", "--once", "--metrics-port", "9", "--store",
                                       str(tmp_path / "none")], catch_exceptions=False)
    assert result.exit_code == 2
    assert "--metrics-port serves the continuous worker" in result.output + result.stderr
