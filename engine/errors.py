"""The one error tree of walsync.

Every error the library raises on purpose derives from :class:`WalsyncError`.
Each says what failed and where, carries a ``hint`` (what a person can do
about it; the CLI prints it on its own line) and ``retryable`` (whether trying
the same call again, unchanged, can succeed)::

    WalsyncError
    ├── StoreStateError            the store cannot take this call now
    │   ├── StoreClosedError
    │   ├── StoreNotFoundError
    │   ├── StoreLockedError       another process holds the writer lock
    │   ├── ReadOnlyStoreError
    │   ├── StoreIOError           a file operation failed opening or repairing a store
    │   └── StorePoisonedError     a write or fsync failed; reopen to recover
    │       └── DiskFullError      (also a CapacityError)
    ├── CapacityError
    │   ├── ValueTooLargeError
    │   └── DiskFullError
    ├── CorruptionError            damage found on disk, with path / offset / LSN
    │   ├── FormatVersionError     a file written by an incompatible version
    │   ├── LSNGapError            a missing segment or a hole in the LSNs
    │   └── ExportFormatError      an export file damaged, truncated, or not one
    ├── ConflictError              an ``expect=`` check failed
    ├── WorkflowError              the workflow layer
    │   ├── RunNotFoundError
    │   ├── CheckpointNotFoundError
    │   ├── StepNeedsAttentionError an interrupted non-idempotent step waits
    │   ├── SchemaVersionError     state newer than the code, or no migration
    │   └── InvalidRunStateError   a run's state failed validation
    ├── InvalidKeyError            (also a ValueError)
    ├── InvalidValueError          (also a ValueError)
    ├── DurabilityError
    │   ├── NoReplicatorError      ``remote`` durability with no replicator
    │   └── NotReplicatedError     committed and locally durable, not on the server
    │       ├── RemoteDurabilityTimeoutError  not acknowledged in time (yet)
    │       └── ReplicatorStoppedError        the replicator is not running
    └── SyncError                  the sync layer and its server
        ├── RemoteUnavailableError transient: connection, timeout, 5xx (retried)
        ├── RemoteAuthError        bad credentials or privileges (permanent)
        ├── RemoteSchemaError      schema missing or of another version (permanent)
        ├── RemoteRejectedError    the server refused the data (permanent)
        ├── SyncProtocolError      the server's answer is malformed (permanent)
        ├── SyncConfigError        missing or malformed sync settings
        ├── LeaseHeldError         another host holds the run's lease
        ├── LeaseLostError         a write to a leased run this host does not hold (fenced)
        ├── NodeNotFoundError      no node of that id or label on the server
        ├── AmbiguousNodeError     a label that names several nodes
        ├── PullCompactedError     the pull cursor is behind what the server's log compacted
        └── RestoreError           restore refused or found damage
            └── RestorePointError  a point in time outside the server's window, or unknown

A torn tail after a crash is not an error (it is cut and reported), and a
missing key is not an error (``get`` returns ``None``).
"""

from __future__ import annotations

import errno

__all__ = [
    "AmbiguousNodeError",
    "CapacityError",
    "CheckpointNotFoundError",
    "ConflictError",
    "CorruptionError",
    "DiskFullError",
    "DurabilityError",
    "ExportFormatError",
    "FormatVersionError",
    "InvalidKeyError",
    "InvalidRunStateError",
    "InvalidValueError",
    "LSNGapError",
    "LeaseHeldError",
    "LeaseLostError",
    "NoReplicatorError",
    "NodeNotFoundError",
    "NotReplicatedError",
    "PullCompactedError",
    "ReadOnlyStoreError",
    "RemoteAuthError",
    "RemoteDurabilityTimeoutError",
    "RemoteRejectedError",
    "RemoteSchemaError",
    "RemoteUnavailableError",
    "ReplicatorStoppedError",
    "RestoreError",
    "RestorePointError",
    "RunNotFoundError",
    "SchemaVersionError",
    "StepNeedsAttentionError",
    "StoreClosedError",
    "StoreIOError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StorePoisonedError",
    "StoreStateError",
    "SyncConfigError",
    "SyncError",
    "SyncProtocolError",
    "ValueTooLargeError",
    "WalsyncError",
    "WorkflowError",
    "error_from_os",
]


class WalsyncError(Exception):
    """Root of every error walsync raises on purpose."""

    hint: str = ""
    retryable: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class StoreStateError(WalsyncError):
    """The store is in a state that cannot serve this call."""


class StoreClosedError(StoreStateError):
    hint = "open the store again"


class StoreNotFoundError(StoreStateError):
    hint = "check the path, or create the store (`walsync init PATH`, or open with create=True)"


class StoreLockedError(StoreStateError):
    """Another live process holds the single-writer lock."""

    retryable = True

    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"store {path} is locked by {holder}",
            hint="one writer process per store: stop the other writer, open read-only, "
            "or pass lock_timeout_seconds to wait",
        )
        self.path = path
        self.pid = pid


class ReadOnlyStoreError(StoreStateError):
    hint = "open the store without readonly=True to write"


class StorePoisonedError(StoreStateError):
    """A write or fsync failed, so this handle refuses further writes.

    After a failed fsync the kernel may have dropped the dirty pages and
    cleared the error, so a retry on the same file could report success for
    data that is gone. Reads go on; reopening the store replays the WAL.
    """

    hint = "close and reopen the store; the WAL replays and nothing acknowledged is lost"


class StoreIOError(StoreStateError):
    """A file operation failed while a store was being opened or repaired.

    What failed was never reported as done, so nothing acknowledged is lost;
    ``__cause__`` holds the OSError (naming the file where the system does).
    """

    retryable = True
    hint = ("check the disk and the system log (dmesg), then open the store again; "
            "nothing acknowledged was lost")


def error_from_os(exc: OSError, doing: str) -> StoreIOError | DiskFullError:
    """The project's error for an OSError met while ``doing`` something outside a
    commit (opening, repairing): disk full, or an I/O failure; ``exc`` is its cause."""
    error: StoreIOError | DiskFullError
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        error = DiskFullError(f"disk full {doing}: {exc}")
    else:
        error = StoreIOError(f"{type(exc).__name__} {doing}: {exc}")
    error.__cause__ = exc
    return error


class CapacityError(WalsyncError):
    """A size limit was reached."""


class ValueTooLargeError(CapacityError, ValueError):
    def __init__(self, key: str, size_bytes: int, max_bytes: int) -> None:
        super().__init__(
            f"value for key {key!r} is {size_bytes} bytes encoded, above the limit of "
            f"{max_bytes} bytes; nothing was written",
            hint="split the value across several keys, or raise max_value_bytes",
        )
        self.key = key
        self.size_bytes = size_bytes
        self.max_bytes = max_bytes


class DiskFullError(StorePoisonedError, CapacityError):
    hint = "free disk space, then reopen the store; every acknowledged commit is kept"


class CorruptionError(WalsyncError):
    """Damage on disk that is not a torn tail: open refuses, repair can recover."""

    hint = "run `walsync verify` for a full report and `walsync repair` to keep what precedes it"

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        lsn: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = []
        if path is not None:
            where.append(path)
        if offset is not None:
            where.append(f"offset {offset}")
        if lsn is not None:
            where.append(f"LSN {lsn}")
        text = f"{message} ({', '.join(where)})" if where else message
        super().__init__(text, hint=hint)
        self.path = path
        self.offset = offset
        self.lsn = lsn


class FormatVersionError(CorruptionError):
    hint = "open it with a walsync version that supports this format"


class LSNGapError(CorruptionError):
    pass


class ExportFormatError(CorruptionError):
    """An export file that does not check out: refused before anything is imported."""

    hint = "nothing was imported; export the data again from the source store, or use an " \
        "intact copy of the file"


class ConflictError(WalsyncError):
    """The key's current version is not the one the write expected."""

    retryable = True
    hint = "read the key again and retry the write against its current version"

    def __init__(self, key: str, expected: object, actual: object) -> None:
        super().__init__(
            f"conflict on key {key!r}: expected {_describe(expected)}, found {_describe(actual)}"
        )
        self.key = key
        self.expected = expected
        self.actual = actual


class InvalidKeyError(WalsyncError, ValueError):
    hint = "keys are non-empty UTF-8 strings, at most max_key_bytes long"


class InvalidValueError(WalsyncError, ValueError):
    """A value the store could not give back exactly as it was put (FORMAT.md, "Values")."""

    hint = ("values are dict (str or int keys), list, str, bytes, int, float, bool, None, "
            "datetime with a fixed offset, date, Decimal and UUID, nested at most 128 deep")


class DurabilityError(WalsyncError):
    pass


class NoReplicatorError(DurabilityError):
    hint = "attach a replicator (sync) to the store, or commit with durability 'local'"


class WorkflowError(WalsyncError):
    pass


class RunNotFoundError(WorkflowError):
    hint = "list runs with `walsync runs list`"


class CheckpointNotFoundError(WorkflowError):
    hint = "list a run's checkpoints with `walsync checkpoints list RUN_ID`"


class StepNeedsAttentionError(WorkflowError):
    """A non-idempotent step was interrupted: running it again could repeat a side effect."""

    def __init__(self, run_id: str, step_id: str) -> None:
        super().__init__(
            f"step {step_id!r} of run {run_id!r} was interrupted while running and is not "
            "idempotent: it will not run again until the orchestrator decides",
            hint="check whether its side effect happened, then Run.resolve(step_id, "
            "'retry' | 'skip' | 'succeed', output=...)",
        )
        self.run_id = run_id
        self.step_id = step_id


class SchemaVersionError(WorkflowError):
    hint = "upgrade walsync / your workflow code, or register a migration for this version"


class InvalidRunStateError(WorkflowError):
    pass


class NotReplicatedError(DurabilityError):
    """A ``remote`` commit happened and is durable on this host (``lsn``), but the
    server has not acknowledged it: the subclass says whether it still may."""

    lsn: int


class RemoteDurabilityTimeoutError(NotReplicatedError):
    """The commit is durable on this host but the server has not acknowledged it yet."""

    retryable = True
    hint = "the record stays in the WAL and is shipped when the server is reachable again"

    def __init__(self, lsn: int, timeout_seconds: float) -> None:
        super().__init__(
            f"commit at LSN {lsn} is durable locally but not yet replicated: the sync server "
            f"did not acknowledge it within {timeout_seconds:g} s"
        )
        self.lsn = lsn


class ReplicatorStoppedError(NotReplicatedError):
    """The commit is durable on this host; the replicator that would ship it is not
    running (stopped, failed, its thread ended), so waiting would only time out."""

    hint = ("the record stays in the WAL: fix the cause, then start the replicator again "
            "(Replicator.start, or `walsync sync`) and it is shipped")

    def __init__(self, lsn: int, cause: str) -> None:
        super().__init__(
            f"commit at LSN {lsn} is durable locally but not replicated: {cause}"
        )
        self.lsn = lsn
        self.cause = cause


class SyncError(WalsyncError):
    """A failure of the sync layer or its server."""


class RemoteUnavailableError(SyncError):
    retryable = True
    hint = "the replicator retries with backoff; check the server and the network"


class RemoteAuthError(SyncError):
    hint = "check SUPABASE_SERVICE_ROLE_KEY / WALSYNC_PG_DSN: walsync needs the service role"


class RemoteSchemaError(SyncError):
    hint = "run `walsync migrate` against the server"


class RemoteRejectedError(SyncError):
    hint = "the server refused an entry; see the message, the entry stays in the local WAL"


class SyncConfigError(SyncError, ValueError):
    hint = "set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY, or WALSYNC_PG_DSN"


class LeaseHeldError(SyncError):
    retryable = True
    hint = "wait for the holder's lease to expire, or stop the other host"


class LeaseLostError(SyncError):
    """A write to a leased run that this host does not hold (any more).

    ``holder`` and ``current_token`` name the lease as far as it is known (the
    server's, or the run record's last pulled); ``holder`` is None when unknown.
    """

    hint = "another host took over this run: stop driving it here"

    def __init__(self, message: str, *, run_id: str = "", current_token: int = 0,
                 holder: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.run_id = run_id
        self.current_token = current_token
        self.holder = holder


class NodeNotFoundError(SyncError):
    """No node the server knows has that id or label; the message lists those it knows."""

    hint = "name a node the server knows, by id or label (`walsync nodes` lists them)"


class AmbiguousNodeError(SyncError, ValueError):
    """A label several nodes carry; the message lists them."""

    hint = "name the node by its id (`walsync nodes` lists them)"


class PullCompactedError(SyncError):
    """A pull from a position behind a tombstone the server's log compaction collected:
    the entries after it are no longer all in the log, so the store must fill its scope
    in again from the merged state (re-bootstrap) before it pulls on. The replicator
    does that itself; ``gc_through`` is the position the cursor must reach."""

    hint = ("the replicator re-bootstraps the store's scope from the server's state; "
            "pull at least once per retention window (`walsync retention`) to avoid it")

    def __init__(self, message: str, *, gc_through: int = 0) -> None:
        super().__init__(message)
        self.gc_through = gc_through


class RestoreError(SyncError):
    hint = "restore into an empty directory (or pass --force), and check the server"


class RestorePointError(RestoreError):
    """A point in time the server's entry log cannot restore exactly: before its
    window, an LSN of which it holds no entry, or a time it cannot read."""

    hint = "pick a point inside the window the message names (`walsync restore --help`)"


class SyncProtocolError(SyncError):
    """An answer from the server lacks the shape the sync protocol gives it.

    Retrying would get the same answer: the server runs another protocol version, or
    something between (a proxy, an API gateway) answers in its place.
    """

    hint = "run `walsync migrate` against the server, and check what sits in front of it"


def _describe(version: object) -> str:
    if version is None:
        return "no value"
    return repr(version)
