"""A store's node identities: the node ids it wrote under, and the LSNs each one owns.

A node id names one *incarnation* of a store (PROTOCOL.md, Node identity): its dots (node id, LSN)
must never mean two different writes. A copied store (``cp -r``, a restored disk
image, a restore over an old directory) holds the same node id as its original;
once both write, the same dot names different writes and version vectors lie
(Riak's kv679: a write that looks causally older than a write it never saw is
silently dropped). So a store that finds it shares its id takes a fresh one.

The store's LSNs stay one sequence. A renewal at fork LSN F gives every LSN above
F to the new id: the store's own versions written under the old id above F (the
ones nobody can confirm are the original's) are relabelled to the new id with the
same LSN, and their version vectors say so (``relabel_vv``). Those at or below F
keep the old id: the server holds them, identical. The chain of identities thus
splits the LSN line into ranges, each owned by one id:

    [1 .. F1] old id, [F1+1 .. F2] second id, [F2+1 ..] current id

``renewed_at_lsn`` is the LSN of the record that relabelled the snapshot: WAL
records below it were written under the previous id and are translated the same
way when they are shipped (``translate``); records from it on are native.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .versions import Version

__all__ = ["NodeIdentity", "chain_from_json", "chain_to_json", "end_of", "owner_of",
           "relabel_version", "relabel_vv", "resolve_chain", "translate_vv", "writer_of"]


@dataclass(frozen=True)
class NodeIdentity:
    """One node id of a store and the LSNs it owns: ``start_lsn`` up to the next
    identity's start (the last identity: every later LSN)."""

    node_id: str
    #: the first LSN this id owns (1 for a store's first id; fork + 1 after a renewal)
    start_lsn: int
    #: the record that relabelled the snapshot to this id (0 for the first id)
    renewed_at_lsn: int = 0
    #: why the store took it ("" for the first id)
    reason: str = ""

    @property
    def base_lsn(self) -> int:
        """The LSN below this id's first: a server holds everything of it up to here
        by construction (nothing below belongs to it)."""
        return self.start_lsn - 1


def chain_to_json(chain: Sequence[NodeIdentity]) -> list[dict[str, Any]]:
    return [{"node_id": i.node_id, "start_lsn": i.start_lsn,
             "renewed_at_lsn": i.renewed_at_lsn, "reason": i.reason} for i in chain]


def chain_from_json(doc: Any) -> tuple[NodeIdentity, ...]:
    """A chain as stored (STORE file, record meta); ValueError when malformed."""
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"an identity chain is a non-empty list, not {doc!r:.80}")
    out = []
    for item in doc:
        if not isinstance(item, dict):
            raise ValueError(f"an identity is an object, not {item!r:.80}")
        node, start = item.get("node_id"), item.get("start_lsn")
        at, reason = item.get("renewed_at_lsn", 0), item.get("reason", "")
        if (type(node) is not str or not node or type(start) is not int or start < 1
                or type(at) is not int or at < 0 or type(reason) is not str):
            raise ValueError(f"malformed identity {item!r:.120}")
        out.append(NodeIdentity(node, start, at, reason))
    for prev, ident in itertools.pairwise(out):
        if ident.start_lsn < prev.start_lsn or ident.renewed_at_lsn < prev.renewed_at_lsn:
            raise ValueError("identity chain out of order: "
                             f"{chain_to_json(out)!r:.200}")
    return tuple(out)


def resolve_chain(stored: Any, node_id: str,
                  logged: Any) -> tuple[tuple[NodeIdentity, ...], bool]:
    """A store's chain at open: the STORE file's (``stored``; None for a store that
    never renewed, whose one id is ``node_id``), or the one the WAL's last renewal
    record carries (``logged``, its record meta) when that is longer: the record is
    the commit point, and a crash may come before the STORE file is rewritten.
    Returns the chain and whether it was rolled forward; ValueError when malformed."""
    chain = chain_from_json(stored) if stored is not None else (NodeIdentity(node_id, 1),)
    found = chain_from_json(logged) if logged is not None else ()
    if len(found) > len(chain):
        return found, True
    return chain, False


def owner_of(chain: Sequence[NodeIdentity], lsn: int) -> NodeIdentity:
    """The identity that owns ``lsn`` (the last whose range starts at or below it)."""
    owner = chain[0]
    for ident in chain[1:]:
        if ident.start_lsn <= lsn:
            owner = ident
        else:
            break
    return owner


def end_of(chain: Sequence[NodeIdentity], ident: NodeIdentity) -> int | None:
    """The last LSN ``ident`` owns (None for the current identity: no end)."""
    for i, other in enumerate(chain):
        if other == ident:
            return chain[i + 1].start_lsn - 1 if i + 1 < len(chain) else None
    raise ValueError(f"{ident.node_id} is not in the chain")


def writer_of(chain: Sequence[NodeIdentity], lsn: int) -> int:
    """The index of the id a local record at ``lsn`` was written under (the id
    current then: the last renewed before it)."""
    index = 0
    for i, ident in enumerate(chain[1:], 1):
        if ident.renewed_at_lsn <= lsn:
            index = i
    return index


def relabel_vv(vv: Mapping[str, int], old: str, new: NodeIdentity) -> dict[str, int]:
    """A version vector of a relabelled version: the old id's component above the
    fork moves to the new id (the same LSNs, now the new id's dots); what is at or
    below the fork stays the old id's (history both copies share)."""
    out = dict(vv)
    n = out.pop(old, 0)
    fork = new.base_lsn
    if n > fork:
        out[new.node_id] = max(out.get(new.node_id, 0), n)
    if min(n, fork) > 0:
        out[old] = min(n, fork)
    return out


def relabel_version(version: Version, old: str, new: NodeIdentity) -> Version:
    """``version`` as the renewal to ``new`` leaves it: the store's own versions
    written under ``old`` above the fork become ``new``'s; any other is unchanged."""
    if version.origin != old or version.lsn < new.start_lsn:
        return version
    return Version(new.node_id, version.lsn, version.hlc, relabel_vv(version.vv, old, new),
                   version.fence, version.deleted)


def translate_vv(chain: Sequence[NodeIdentity], lsn: int,
                 vv: Mapping[str, int]) -> tuple[str, Mapping[str, int]]:
    """(origin, version vector) of a local WAL record's write at ``lsn`` as the
    chain's renewals left it: the same relabelling the snapshot went through, so
    the server gets exactly the dots the store holds."""
    index = writer_of(chain, lsn)
    origin = chain[index].node_id
    for prev, ident in zip(chain[index:], chain[index + 1:], strict=False):
        if origin != prev.node_id or lsn < ident.start_lsn:
            break
        vv = relabel_vv(vv, origin, ident)
        origin = ident.node_id
    return origin, vv
