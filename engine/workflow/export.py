"""Export one run: its keys, as the workflow layer spells them, in an export file.

The file format, its checks and the import are the store's (engine/export.py,
EXPORT.md); what makes a run is the workflow layer's, so the run's scope is
built here from the run-key grammar (``keys``) and the store never reads it.
"""

from __future__ import annotations

import os

from walsync.engine.errors import RunNotFoundError
from walsync.engine.export import (
    ExportScope,
    ExportSummary,
    Progress,
    count_scope_keys,
    write_export,
)
from walsync.engine.store import Store

from . import keys as run_keys

__all__ = ["export_run", "run_scope"]


def run_scope(run_id: str) -> ExportScope:
    """A run's keys: its index entry, its record and everything under the record
    (``.walsync/index/runs/<id>``, ``.walsync/runs/<id>``, ``.walsync/runs/<id>/``...),
    in key order."""
    if not isinstance(run_id, str) or not run_id or "/" in run_id:
        raise ValueError(f"run id must be a non-empty string without '/', got {run_id!r}")
    return ExportScope("run", run_id, ((run_keys.index(run_id), True),
                                       (run_keys.run(run_id), True),
                                       (run_keys.all_of_run(run_id), False)))


def export_run(
    store: Store,
    path: str | os.PathLike[str],
    run_id: str,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportSummary:
    """Write one run to ``path`` (see ``walsync.engine.export.write_export``).

    Export a run nobody is driving for an exact picture of it. Raises
    RunNotFoundError, writing nothing, when the store holds no key of the run.
    """
    scope = run_scope(run_id)
    if count_scope_keys(store, scope) == 0:
        raise RunNotFoundError(f"no run {run_id!r} in store {store.path}: nothing to export")
    return write_export(store, path, scope, overwrite=overwrite, progress=progress)
