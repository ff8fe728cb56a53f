"""Prometheus exposition of a store's and its replicator's statistics.

``walsync sync --metrics-port PORT`` serves ``/metrics`` in the Prometheus
text format. Nothing is counted twice: the collector reads ``Store.stats()``
and ``Replicator.stats()`` when Prometheus scrapes, and turns them into
metric families. Names follow Prometheus's conventions: a ``walsync_``
prefix, base units in the name (seconds, bytes), ``_total`` on counters.

Histograms keep their fine buckets in process (for p50 / p99); the endpoint
merges them into 1 / 2.5 / 5 steps a decade, which keeps the series few.

=============================================  =========  ==========================================
name                                           type       what
=============================================  =========  ==========================================
walsync_commit_duration_seconds                histogram  commit call until durable and applied
walsync_commits_total                          counter    commits that returned
walsync_wal_bytes_written_total                counter    WAL bytes written (frames, headers)
walsync_wal_syncs_total                        counter    fdatasync calls of the commit path
walsync_group_commit_batch_size                histogram  records per group commit
walsync_replay_duration_seconds                gauge      WAL replay when the store was opened
walsync_replay_records                         gauge      records replayed then
walsync_checkpoints_total                      counter    checkpoints
walsync_errors_total{kind}                     counter    commit errors by error class
walsync_applied_lsn                            gauge      last LSN applied to the snapshot
walsync_store_poisoned                         gauge      1 when the store refuses writes
walsync_push_duration_seconds                  histogram  one push call to the server
walsync_push_entries_total                     counter    entries pushed
walsync_push_bytes_total                       counter    WAL bytes of the records pushed
walsync_pulls_total                            counter    pull rounds
walsync_pull_entries_total                     counter    entries pulled from other nodes
walsync_replication_acked_lsn                  gauge      LSN the server acknowledged
walsync_replication_lag_entries                gauge      records not yet acknowledged
walsync_replication_lag_bytes                  gauge      WAL bytes not yet shipped
walsync_replication_lag_seconds                gauge      age of the oldest unacknowledged commit
walsync_sync_retries_total                     counter    retries after transient server faults
walsync_conflicts_total                        counter    keys with siblings after a pull
walsync_fenced_writes_total                    counter    write refusals by fencing
walsync_lost_runs_total                        counter    runs taken over by another host
walsync_sync_reships_total                     counter    times the server held less than acked
walsync_sync_node_renewals_total               counter    node ids left to a copy of the store
walsync_last_push_success_timestamp_seconds    gauge      unix time of the last push (absent: none)
walsync_last_pull_timestamp_seconds            gauge      unix time of the last pull (absent: none)
walsync_replicator_running                     gauge      1 while the replicator runs
=============================================  =========  ==========================================

Threads: the server answers scrapes on its own threads; both ``stats()`` may
be called from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from walsync.engine import Store, WalsyncError
from walsync.engine.metrics import HistogramSnapshot

from .replicator import Replicator

__all__ = ["EXPOSED_LATENCY_BOUNDS_SECONDS", "MetricsServer", "WalsyncCollector", "serve"]

log = logging.getLogger("walsync.metrics")

#: the latency buckets exposed, 1 µs .. 100 s: 1, 2.5 and 5 of each decade (a
#: subset of the in-process bounds, whose finer buckets are summed into them)
EXPOSED_LATENCY_BOUNDS_SECONDS = (
    *(float(f"{step}e{exponent}") for exponent in range(-6, 2) for step in (1, 2.5, 5)),
    100.0,
)


def _histogram(name: str, doc: str, snap: HistogramSnapshot,
               bounds: tuple[float, ...] | None = None) -> HistogramMetricFamily:
    buckets = [("+Inf" if b == float("inf") else _le(b), float(n))
               for b, n in snap.cumulative(bounds)]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=snap.sum)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus clients print it (0.001, 2.5, 100.0)."""
    return repr(float(bound))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class WalsyncCollector:
    """Reads the stats of a store and (optionally) its replicator at each scrape."""

    def __init__(self, store: Store | None, replicator: Replicator | None = None) -> None:
        self.store = store
        self.replicator = replicator

    def collect(self) -> Iterator[Metric]:
        if self.store is not None:
            yield from self._store_metrics(self.store)
        if self.replicator is not None:
            try:
                yield from self._replicator_metrics(self.replicator)
            except WalsyncError as exc:  # e.g. the store closed under a late scrape
                log.warning("metrics: replicator stats unavailable: %s", exc)

    def _store_metrics(self, store: Store) -> Iterator[Metric]:
        s = store.stats()
        yield _histogram("walsync_commit_duration_seconds",
                         "Seconds from a commit call until it was durable (as asked) and "
                         "applied.", s.commit_duration, EXPOSED_LATENCY_BOUNDS_SECONDS)
        yield _counter("walsync_commits_total", "Commits that returned.", s.commits)
        yield _counter("walsync_wal_bytes_written_total",
                       "Bytes written to the WAL (frames and segment headers).",
                       s.wal_bytes_written)
        yield _counter("walsync_wal_syncs_total", "fdatasync calls of the commit path.",
                       s.wal_syncs)
        yield _histogram("walsync_group_commit_batch_size",
                         "Records written by one group commit (one writev).",
                         s.group_commit_batch_size)
        yield _gauge("walsync_replay_duration_seconds",
                     "Seconds the WAL replay took when the store was opened.", s.replay_seconds)
        yield _gauge("walsync_replay_records",
                     "Records replayed from the WAL when the store was opened.",
                     s.replay_records)
        yield _counter("walsync_checkpoints_total", "Checkpoints done.", s.checkpoints)
        errors = CounterMetricFamily("walsync_errors_total",
                                     "Commits that raised (and failed background checkpoints), "
                                     "by error class.", labels=["kind"])
        for kind, n in sorted(s.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        yield _gauge("walsync_applied_lsn", "The last LSN applied to the snapshot.",
                     s.applied_lsn)
        yield _gauge("walsync_store_poisoned",
                     "1 when the store refuses writes after a failed write or fsync.",
                     float(s.poisoned))

    def _replicator_metrics(self, replicator: Replicator) -> Iterator[Metric]:
        r = replicator.stats()
        yield _histogram("walsync_push_duration_seconds",
                         "Seconds per successful push of a batch of entries to the server.",
                         r.push_duration, EXPOSED_LATENCY_BOUNDS_SECONDS)
        yield _counter("walsync_push_entries_total", "Entries pushed to the server.",
                       r.pushed_entries)
        yield _counter("walsync_push_bytes_total", "WAL bytes of the records pushed.",
                       r.pushed_bytes)
        yield _counter("walsync_pulls_total", "Pull rounds from the server.", r.pulls)
        yield _counter("walsync_pull_entries_total", "Entries pulled from other nodes.",
                       r.pulled_entries)
        yield _gauge("walsync_replication_acked_lsn",
                     "The last local LSN the server acknowledged.", r.acked_lsn)
        yield _gauge("walsync_replication_lag_entries",
                     "Records committed locally and not yet acknowledged by the server.",
                     r.lag_entries)
        yield _gauge("walsync_replication_lag_bytes",
                     "WAL bytes committed locally and not yet shipped.", r.lag_bytes)
        yield _gauge("walsync_replication_lag_seconds",
                     "Seconds since the oldest commit the server has not acknowledged.",
                     r.lag_seconds)
        yield _counter("walsync_sync_retries_total",
                       "Retries of a ship-and-pull round after a transient server fault.",
                       r.retries)
        yield _counter("walsync_conflicts_total",
                       "Keys left with concurrent siblings after a pull.", r.conflicts)
        yield _counter("walsync_fenced_writes_total",
                       "Refusals of this node's writes to runs another host leases "
                       "(one per run per pushed batch).", r.fenced_writes)
        yield _counter("walsync_lost_runs_total", "Runs taken over by another host.",
                       r.lost_runs)
        yield _counter("walsync_sync_reships_total",
                       "Times the server held less of this store than it had acknowledged "
                       "(another server, a restored backup) and shipping went back to the "
                       "server's position.", r.reships)
        yield _counter("walsync_sync_node_renewals_total",
                       "Node ids this store left because a copy of it holds them (it took "
                       "a fresh one).", r.node_renewals)
        if r.last_push_unix is not None:
            yield _gauge("walsync_last_push_success_timestamp_seconds",
                         "Unix time of the last successful push.", r.last_push_unix)
        if r.last_pull_unix is not None:
            yield _gauge("walsync_last_pull_timestamp_seconds",
                         "Unix time of the last pull.", r.last_pull_unix)
        yield _gauge("walsync_replicator_running", "1 while the replicator runs.",
                     float(r.running))


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(store: Store | None, replicator: Replicator | None, port: int,
          host: str = "127.0.0.1") -> MetricsServer:
    """Serve the metrics of ``store`` and ``replicator`` on http://host:port/metrics
    (port 0: any free port, see ``MetricsServer.port``) from a daemon thread."""
    registry = CollectorRegistry()
    registry.register(WalsyncCollector(store, replicator))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host, int(server.server_port), server, thread)
