"""The nodes a server knows: listed for people (`walsync nodes`), named, and found by id
or label where a command names one (`walsync restore --lost-node`, `--lsn NODE:LSN`).

A node id is a store's identity and reads like noise; a label is what a person calls
it. Every replicator offers its host's name as the label when it connects
(``announce``), which never replaces a label a person gave (``label_node``, `walsync
nodes label`, or ``WALSYNC_NODE_LABEL`` in the environment or the config file, which
a replicator sets as given). Lookups take an id first, then a label; a label several
nodes carry is refused with the list, never guessed, since restoring the wrong host's
runs is worse than asking.

Times are the server's clock, and ages ("3 s ago") are measured against the server's
``now`` in the same answer, so a host with a skewed clock reads the same ages.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from walsync.engine.errors import AmbiguousNodeError, NodeNotFoundError, RemoteSchemaError

from .config import load_settings
from .transport import NodeInfo, NodeLabel, NodeList, Transport

__all__ = ["NodeRow", "announce", "default_label", "describe_known", "find_node", "label_node",
           "list_nodes", "node_id_of", "parse_server_time", "table"]

log = logging.getLogger("walsync.nodes")


@dataclass(frozen=True)
class NodeRow:
    """One node as `walsync nodes --json` prints it (fields are added, never renamed)."""

    node_id: str
    label: str | None
    first_push_at: str | None
    last_push_at: str | None
    last_pull_at: str | None
    acked_lsn: int
    #: the acknowledged LSN's commit time (ISO-8601 UTC, milliseconds; None: nothing acked)
    acked_at: str | None
    pull_cursor: int
    #: positions of the server's log the node has not confirmed pulling
    pull_lag_entries: int
    #: seconds since its last push / pull by the server's clock (None: never)
    last_push_seconds_ago: float | None
    last_pull_seconds_ago: float | None
    #: runs it holds a live lease on
    leases: list[str]


def parse_server_time(text: str | None) -> dt.datetime | None:
    """A time as the server writes a timestamptz into JSON."""
    if text is None:
        return None
    return dt.datetime.fromisoformat(text)


def _seconds_since(text: str | None, now: dt.datetime) -> float | None:
    when = parse_server_time(text)
    return None if when is None else max(0.0, (now - when).total_seconds())


def _hlc_iso(hlc: int) -> str | None:
    if not hlc:
        return None
    return dt.datetime.fromtimestamp((hlc >> 16) / 1000, dt.UTC).isoformat(
        timespec="milliseconds")


def list_nodes(transport: Transport) -> list[NodeRow]:
    """Every node the server knows, by node id."""
    listing = transport.nodes()
    now = parse_server_time(listing.now)
    assert now is not None
    return [NodeRow(n.node_id, n.label, n.first_push_at, n.last_push_at, n.last_pull_at,
                    n.acked_lsn, _hlc_iso(n.acked_hlc), n.pull_cursor,
                    max(0, listing.head - n.pull_cursor), _seconds_since(n.last_push_at, now),
                    _seconds_since(n.last_pull_at, now), list(n.leases))
            for n in listing.nodes]


def default_label(environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The label a replicator offers, and whether a person chose it (``WALSYNC_NODE_LABEL``
    in the environment or the config file) rather than it being the host's name."""
    chosen = load_settings(environ).get("WALSYNC_NODE_LABEL")
    if chosen:
        return chosen, True
    return socket.gethostname() or "localhost", False


def announce(transport: Transport, node_id: str, label: str | None = None) -> NodeLabel | None:
    """Offer this host's label for ``node_id`` (called when a replicator connects): a
    label given here or in the settings replaces the server's, the host name only fills
    an empty one. A server without the function (not yet migrated to it) is left as it
    is, with a warning: a label is never worth stopping replication for."""
    chosen = label is not None
    if label is None:
        label, chosen = default_label()
    try:
        return transport.node_label(node_id, label[:200], replace=chosen)
    except RemoteSchemaError as exc:
        log.warning("sync: the server cannot label node %s (%s); run `walsync migrate`",
                    node_id, exc)
        return None


def label_node(transport: Transport, name: str, label: str | None) -> NodeLabel:
    """Give the node named ``name`` (its id or current label) the label ``label`` (None:
    none). Raises NodeNotFoundError / AmbiguousNodeError as ``find_node``."""
    if label is not None and not 1 <= len(label) <= 200:
        raise ValueError(f"a node label has 1 to 200 characters, not {len(label)}")
    node = find_node(transport.nodes(), name)
    answer = transport.node_label(node.node_id, label, replace=True)
    if not answer.known:  # gone between the two calls: nothing was stored
        raise NodeNotFoundError(f"node {node.node_id!r} is no longer known to the server")
    return answer


def _name(n: NodeInfo) -> str:
    return n.node_id if n.label is None else f"{n.node_id} ({n.label})"


def describe_known(listing: NodeList, limit: int = 20) -> str:
    """The nodes a server knows, for an error message."""
    if not listing.nodes:
        return "the server knows no node yet"
    names = [_name(n) for n in listing.nodes[:limit]]
    more = len(listing.nodes) - len(names)
    return "known nodes: " + ", ".join(names) + (f" and {more} more" if more > 0 else "")


def find_node(listing: NodeList, name: str) -> NodeInfo:
    """The node whose id is ``name``, else the one whose label is; raises
    NodeNotFoundError (listing the known nodes) or AmbiguousNodeError (listing the
    nodes carrying that label)."""
    for n in listing.nodes:
        if n.node_id == name:
            return n
    matches = [n for n in listing.nodes if n.label == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AmbiguousNodeError(
            f"label {name!r} names {len(matches)} nodes: "
            + ", ".join(_name(n) for n in matches))
    raise NodeNotFoundError(f"no node {name!r} on the server (by id or label); "
                            + describe_known(listing))


def node_id_of(listing: NodeList, name: str) -> str:
    """``name`` as a node id where a node id is expected but need not be known to the
    server (a lease's holder may never have pushed): a known id as it is, else the node
    a label names (AmbiguousNodeError when several carry it), else ``name`` itself."""
    if any(n.node_id == name for n in listing.nodes) or not any(
            n.label == name for n in listing.nodes):
        return name
    return find_node(listing, name).node_id


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def _first(text: str | None) -> str:
    when = parse_server_time(text)
    return "never" if when is None else when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(rows: list[NodeRow]) -> list[str]:
    """The nodes as an aligned table for people: ages by the server's clock."""
    head = ("NODE", "LABEL", "FIRST PUSH", "LAST PUSH", "LAST PULL", "ACKED LSN", "PULL LAG",
            "LEASES")
    body = [(r.node_id, r.label or "-", _first(r.first_push_at), _ago(r.last_push_seconds_ago),
             _ago(r.last_pull_seconds_ago), str(r.acked_lsn), f"{r.pull_lag_entries} entries",
             str(len(r.leases))) for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    right = {5, 7}  # numbers line up on the right

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(head), *(line(b) for b in body)]
