"""Runs an older walsync wrote outside the reserved namespace: reading them, moving them in.

Before key layout 2 (engine/FORMAT.md, "Keys") walsync spelled a run's keys
without the namespace (``runs/<id>``, ``index/runs/<id>``: keys.LEGACY). Those
keys are user keys now, so the workflow layer treats them with care:

- **Reading.** A run missing from the namespace is looked up in the legacy
  spelling, and read there only if its record has a run record's shape
  (records.looks_like_run): a user's ``runs/1`` holding ``{"step": 2}`` is no
  run. Listing includes such runs (a namespace run of the same id wins).
- **Moving.** This host's first write to a run read there moves it first, in
  one commit: every key of the run (record, index entry, steps, outputs,
  checkpoints, discarded records; not other keys under ``runs/<id>/``, which
  are the user's now) is put under the namespace spelling, step records'
  ``output_key`` rewritten, and the legacy keys deleted. The legacy record's
  delete expects the version the run was read at and the new record must not
  exist yet, so a run changed meanwhile (a pull) is refused with a
  ConflictError and read again. The commit carries this host's lease token,
  like any write to the run, so the server judges it like one.
- **Once per store** (a writable one), the first ``Workflows(store)`` moves
  every legacy run whose record this store wrote last (its origin is one of
  the store's node ids) and that no other host leases, then notes it in the
  store's host-local state (``workflow/keyspace``), so later user keys of the
  legacy spelling are never taken for runs to move. A run another host wrote
  is left where it is: that host may still run an older walsync and drive it,
  and would find it gone. Its writer's own upgrade moves it (the moves reach
  this store by pull), or this host's first write to it, when it takes the
  run over.

Mixed fleets: a host that still runs an older walsync keeps writing the legacy
spelling, and its entries reach upgraded hosts as they are (nothing is
translated on pull: a pulled tombstone or version under the other spelling
would not merge with the moved keys' own versions). Upgraded hosts read such a
run where it is; the sync server fences both spellings with the run's lease
(``walsync.run_of``), until every host is upgraded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import ConflictError, CorruptionError
from ..store import Delete, Put, Store
from ..versions import Version
from . import keys
from .leases import lease_refusal, local_lease
from .records import checked_run, looks_like_run

if TYPE_CHECKING:
    from .run import Run
    from .workflows import Workflows

__all__ = ["MOVED", "adopt", "keys_of", "move_ops", "move_own_runs", "read", "runs"]

#: host-local note (the store's sync state) that this store's own legacy runs were moved
MOVED = "workflow/keyspace"

_LEGACY = keys.LEGACY


def read(store: Store, grammar: keys.Grammar, run_id: str
         ) -> tuple[Any, dict[str, Any], Version | None] | None:
    """(record value, {step id: step value}, record version) of a run in one spelling,
    read from one snapshot; None if it is not there (in the legacy spelling: unless
    its record has a run record's shape)."""
    key = grammar.run(run_id)
    with store.snapshot() as view:
        raw = view.get(key)
        if raw is None or (grammar is _LEGACY and not looks_like_run(raw, run_id)):
            return None
        prefix = grammar.steps(run_id)
        steps = {k[len(prefix):]: v for k, v in view.scan(prefix)}
        return raw, steps, view.get_version(key)


def runs(store: Store) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(run id, index entry, record value) of every run in the legacy spelling."""
    for key, entry in store.scan(_LEGACY.INDEX):
        run_id = key[len(_LEGACY.INDEX):]
        if not run_id or "/" in run_id or type(entry) is not dict \
                or not isinstance(entry.get("status"), str) \
                or not isinstance(entry.get("workflow"), str):
            continue
        raw = store.get(_LEGACY.run(run_id))
        if looks_like_run(raw, run_id):
            yield run_id, entry, raw


def keys_of(store: Store, run_id: str) -> list[str]:
    """Every key of a run in the legacy spelling (the user's keys beside them excepted)."""
    found = [k for k in (_LEGACY.run(run_id), _LEGACY.index(run_id))
             if store.get_version(k) is not None]
    for prefix in _LEGACY.subtrees(run_id):
        found += store.keys(prefix)
    return found


def move_ops(store: Store, run_id: str, expect: Version | None, fence: int
             ) -> list[Put | Delete]:
    """The operations that move a legacy run into the namespace, as one commit."""
    record_key = _LEGACY.run(run_id)
    ops: list[Put | Delete] = []
    with store.snapshot() as view:
        record = view.get(record_key)
        ops += [Put(keys.translate(record_key), record, expect=None, fence=fence),
                Delete(record_key, expect=expect, fence=fence)]
        index_key = _LEGACY.index(run_id)
        entry = view.get(index_key)
        if entry is not None:
            ops += [Put(keys.translate(index_key), entry, fence=fence),
                    Delete(index_key, fence=fence)]
        for kind, prefix in zip(keys.SUBTREES, _LEGACY.subtrees(run_id), strict=True):
            for key, value in view.scan(prefix):
                moved = value
                if kind in ("steps/", "discarded/"):
                    moved = _step_moved(run_id, value)
                elif kind == "checkpoints/" and type(value) is dict \
                        and type(value.get("steps")) is dict:
                    moved = {**value, "steps": {sid: _step_moved(run_id, s)
                                                for sid, s in value["steps"].items()}}
                ops += [Put(keys.translate(key), moved, fence=fence),
                        Delete(key, fence=fence)]
    return ops


def _step_moved(run_id: str, value: Any) -> Any:
    """A step record whose output key (a key of this run) is spelled in the namespace."""
    if type(value) is not dict:
        return value
    output_key = value.get("output_key")
    if isinstance(output_key, str) and _LEGACY.run_id_of(output_key) == run_id:
        return {**value, "output_key": keys.translate(output_key)}
    return value


def adopt(run: Run, held: int | None) -> None:
    """Move a run read from the legacy spelling into the namespace (one commit), before
    this host's first write to it; ``held`` is this host's lease token on it."""
    store = run.store
    fence = held or 0
    with store.batch(fence=fence, internal=True) as b:
        b.ops.extend(move_ops(store, run.run_id, run._version, fence))
    run._grammar = keys.CURRENT
    run._version_from(b)
    # the records in memory as they are stored now: a later write of a step record
    # must not point back at the output's legacy key, which the move deleted
    for rec in run.steps.values():
        if rec.output_key is not None and _LEGACY.run_id_of(rec.output_key) == run.run_id:
            rec.output_key = keys.translate(rec.output_key)


def move_own_runs(wf: Workflows) -> list[str]:
    """Move the legacy runs this store wrote last into the namespace, once per store.

    Each run moves in a commit of its own, so a crash leaves every run whole in
    one spelling; the note is written after the last one, and the next
    ``Workflows`` finishes what a crash cut short. A run that cannot move now
    (another host's lease, a record that is not one walsync wrote, a change
    meanwhile) is left in the legacy spelling, read there, and moved by this
    host's first write to it.
    """
    store = wf.store
    if store.readonly or store.poisoned is not None or store.sync_state(MOVED):
        return []
    own = {identity.node_id for identity in store.identities}
    moved = []
    for run_id, _entry, _raw in list(runs(store)):
        found = read(store, _LEGACY, run_id)
        if found is None or store.get_version(keys.run(run_id)) is not None:
            continue
        raw, _steps, version = found
        if version is None or version.origin not in own:
            continue
        try:
            record = checked_run(_LEGACY.run(run_id), raw, run_id)
        except CorruptionError:
            continue
        held, lost = local_lease(store, run_id)
        if lease_refusal(record, store, held, lost) is not None:
            continue
        fence = held or 0
        try:
            with store.batch(fence=fence, internal=True) as b:
                b.ops.extend(move_ops(store, run_id, version, fence))
        except ConflictError:
            continue
        moved.append(run_id)
    store.set_sync_state(MOVED, b"2")
    return moved
