"""`walsync nodes`: the nodes the server knows, and their labels (sync/nodes.py).

The server comes from the environment or a ``WALSYNC_CONFIG`` file, as for every
command that talks to it (sync_cmds.py).
"""

from __future__ import annotations

import click

from ..config import transport_from_env
from ..nodes import NodeRow, label_node, list_nodes, table
from .output import Output, json_option

__all__ = ["COMMANDS"]


@click.group("nodes", invoke_without_command=True)
@json_option
@click.pass_context
def nodes(ctx: click.Context, out: Output) -> None:
    """The nodes the server knows: id, label, first and last push, last pull, acked LSN,
    pull lag and live leases (ages by the server's clock).

    A node's label is its host's name unless one was given: `walsync nodes label`, or
    WALSYNC_NODE_LABEL where its `walsync sync` runs. Restore takes a label wherever it
    takes a node id.
    """
    if ctx.invoked_subcommand is not None:
        return
    transport = transport_from_env()
    try:
        rows = list_nodes(transport)
    finally:
        transport.close()
    if out.json:
        out.rows(rows, lambda r: [], data=_data)
    else:
        out.result(None, lambda: table(rows) if rows else ["the server knows no node yet"])


def _data(row: NodeRow) -> dict[str, object]:
    return {**vars(row), "leases": list(row.leases)}


@nodes.command("label")
@click.argument("node")
@click.argument("label", required=False)
@click.option("--clear", is_flag=True, help="Remove the label instead.")
@json_option
def label_command(node: str, label: str | None, clear: bool, out: Output) -> None:
    """Give NODE (an id or its current label) the label LABEL."""
    if (label is None) == (not clear):
        raise click.UsageError("give a LABEL, or --clear")
    if label is not None and not 1 <= len(label) <= 200:
        raise click.UsageError(f"a node label has 1 to 200 characters, not {len(label)}")
    transport = transport_from_env()
    try:
        answer = label_node(transport, node, None if clear else label)
    finally:
        transport.close()
    out.result({"node_id": answer.node_id, "label": answer.label},
               lambda: f"node {answer.node_id} is labelled {answer.label!r}"
               if answer.label is not None else f"node {answer.node_id} has no label")


COMMANDS = [nodes]
