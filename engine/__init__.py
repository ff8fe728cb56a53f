"""walsync's engine: a local, durable state store for long-running workflows.

The public face. Everything else in ``engine`` is an implementation module.
"""

# The folder is on sys.path where a checkout's root is (tests, scripts): refuse a second copy.
if __name__ != "walsync.engine":
    raise ImportError(f"import walsync.engine, not {__name__!r}: engine/ is the package "
                      "walsync.engine (install the project with pip install -e .)")


from .aio import AsyncStore
from .base import SnapshotRebuild
from .check import Damage, SegmentReport, VerifyReport, verify
from .errors import (
    CapacityError,
    ConflictError,
    CorruptionError,
    DiskFullError,
    DurabilityError,
    ExportFormatError,
    FormatVersionError,
    InvalidKeyError,
    InvalidValueError,
    LSNGapError,
    NoReplicatorError,
    ReadOnlyStoreError,
    StoreClosedError,
    StoreIOError,
    StoreLockedError,
    StoreNotFoundError,
    StorePoisonedError,
    StoreStateError,
    ValueTooLargeError,
    WalsyncError,
)
from .events import (
    CheckpointEvent,
    CommitEvent,
    ConflictEvent,
    Event,
    LeaseLostEvent,
    OverflowEvent,
    RunCheckpointEvent,
    RunEvent,
    StepEvent,
    Subscription,
)
from .export import ExportSummary, ImportReport, export_file, import_file, verify_export_file
from .feed import WALReader
from .identity import NodeIdentity
from .metrics import HistogramSnapshot, StoreStats
from .options import Durability, StoreOptions
from .repair import RepairReport, repair
from .replay import RecoveryReport
from .replication import (
    Acknowledger,
    LastError,
    ReplicationSource,
    SyncLedger,
    SyncState,
    UnshippedEntry,
)
from .store import (
    ANY,
    Batch,
    CheckpointResult,
    CommitResult,
    CompactResult,
    Delete,
    Put,
    ReadView,
    Store,
    StoreInfo,
    VersionedValue,
)
from .versions import Sibling, Version
from .wal import TornTail

__all__ = [
    "ANY",
    "Acknowledger",
    "AsyncStore",
    "Batch",
    "CapacityError",
    "CheckpointEvent",
    "CheckpointResult",
    "CommitEvent",
    "CommitResult",
    "CompactResult",
    "ConflictError",
    "ConflictEvent",
    "CorruptionError",
    "Damage",
    "Delete",
    "DiskFullError",
    "Durability",
    "DurabilityError",
    "Event",
    "ExportFormatError",
    "ExportSummary",
    "FormatVersionError",
    "HistogramSnapshot",
    "ImportReport",
    "InvalidKeyError",
    "InvalidValueError",
    "LSNGapError",
    "LastError",
    "LeaseLostEvent",
    "NoReplicatorError",
    "NodeIdentity",
    "OverflowEvent",
    "Put",
    "ReadOnlyStoreError",
    "ReadView",
    "RecoveryReport",
    "RepairReport",
    "ReplicationSource",
    "RunCheckpointEvent",
    "RunEvent",
    "SegmentReport",
    "Sibling",
    "SnapshotRebuild",
    "StepEvent",
    "Store",
    "StoreClosedError",
    "StoreIOError",
    "StoreInfo",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreOptions",
    "StorePoisonedError",
    "StoreStateError",
    "StoreStats",
    "Subscription",
    "SyncLedger",
    "SyncState",
    "TornTail",
    "UnshippedEntry",
    "ValueTooLargeError",
    "VerifyReport",
    "Version",
    "VersionedValue",
    "WALReader",
    "WalsyncError",
    "export_file",
    "import_file",
    "repair",
    "verify",
    "verify_export_file",
]
