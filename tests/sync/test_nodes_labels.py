"""A node's label: its host's name when its replicator connects, unless a person named it
(the API, `walsync nodes label`, or ``WALSYNC_NODE_LABEL`` in the environment or the
config file, which a replicator sets as given); a server without the function leaves
replication alone. And how a name finds a node: an id first, then a unique label; an
unknown or shared one is refused with the list (a property over random fleets).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walsync.engine import Store
from walsync.engine.errors import AmbiguousNodeError, NodeNotFoundError, RemoteSchemaError
from walsync.sync.memory import MemoryServer
from walsync.sync.nodes import _ago, find_node, label_node, list_nodes
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.transport import NodeInfo, NodeLabel, NodeList, Transport, TransportProxy

OPTIONS = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                            retry_initial_seconds=0.02, retry_max_seconds=0.3)


def sync(store: Store, transport: Transport) -> None:
    rep = Replicator(store, transport, OPTIONS)
    try:
        rep.run_once()
    finally:
        rep.stop()


def label_of(server: MemoryServer, node: str) -> str | None:
    return {n.node_id: n.label for n in server.transport().nodes().nodes}[node]


def test_label_is_the_host_name_until_a_person_names_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WALSYNC_NODE_LABEL", "WALSYNC_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    server = MemoryServer()
    with Store.open(tmp_path / "s", create=True) as store:
        store.put("k", 1)
        sync(store, server.transport())
        node = store.node_id
        assert label_of(server, node) == socket.gethostname()
        # a person's label (the API; `walsync nodes label` calls it) survives reconnects
        assert label_node(server.transport(), node, "billing-1").label == "billing-1"
        sync(store, server.transport())
        assert label_of(server, node) == "billing-1"
        # and is found by it
        assert find_node(server.transport().nodes(), "billing-1").node_id == node
        # the setting names the node as given, from the environment ...
        monkeypatch.setenv("WALSYNC_NODE_LABEL", "from-env")
        sync(store, server.transport())
        assert label_of(server, node) == "from-env"
        # ... or the config file
        monkeypatch.delenv("WALSYNC_NODE_LABEL")
        config = tmp_path / "walsync.conf"
        config.write_text("WALSYNC_NODE_LABEL=from-config\n")
        monkeypatch.setenv("WALSYNC_CONFIG", str(config))
        sync(store, server.transport())
        assert label_of(server, node) == "from-config"
        rows = list_nodes(server.transport())
        assert [(r.node_id, r.label, r.acked_lsn) for r in rows] == [
            (node, "from-config", store.sync_ledger.acked_lsn)]
        assert rows[0].last_push_seconds_ago is not None
        assert rows[0].first_push_at is not None


class _NoLabels(TransportProxy):
    """A server migrated before node labels: the function does not exist."""

    def node_label(self, node_id: str, label: str | None, *, replace: bool = True) -> NodeLabel:
        raise RemoteSchemaError("function walsync_api.node_label does not exist (SQLSTATE 42883)")


def test_a_server_without_labels_still_replicates_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = MemoryServer()
    with Store.open(tmp_path / "s", create=True) as store:
        store.put("k", 1)
        with caplog.at_level(logging.WARNING, logger="walsync.nodes"):
            sync(store, _NoLabels(server.transport()))
        row = server.node_row(store.node_id)
        assert row is not None
        assert row["acked_lsn"] == store.sync_ledger.acked_lsn
        assert label_of(server, store.node_id) is None
    assert "cannot label node" in caplog.text


def test_ages_read_in_human_units() -> None:
    assert [_ago(s) for s in (None, 0.4, 3, 89, 600, 7200, 3 * 86400)] == [
        "never", "0 s ago", "3 s ago", "89 s ago", "10 min ago", "2 h ago", "3 d ago"]


_names = st.sampled_from(["a", "b", "c", "ab", "host", "x.1"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_names, st.one_of(st.none(), _names), max_size=5), _names)
def test_a_name_finds_the_node_of_that_id_else_the_one_label(
        fleet: dict[str, str | None], name: str) -> None:
    listing = NodeList([NodeInfo(node, label, 1, 1, 0, None, None, None, None, [])
                        for node, label in sorted(fleet.items())], 0, "2026-12-07T00:00:00+00:00")
    labelled = sorted(node for node, label in fleet.items() if label == name)
    if name in fleet:
        assert find_node(listing, name).node_id == name
    elif len(labelled) == 1:
        assert find_node(listing, name).node_id == labelled[0]
    elif labelled:
        with pytest.raises(AmbiguousNodeError) as ambiguous:
            find_node(listing, name)
        assert all(node in str(ambiguous.value) for node in labelled)
    else:
        with pytest.raises(NodeNotFoundError) as missing:
            find_node(listing, name)
        assert all(node in str(missing.value) for node in fleet)
        if not fleet:
            assert "knows no node" in str(missing.value)
