"""walsync's engine: a local, durable state store for long-running workflows.

The public face. Everything else in ``engine`` is an implementation module.
"""

from .check import Damage, SegmentReport, VerifyReport, verify
from .errors import (
    CapacityError,
    ConflictError,
    CorruptionError,
    DiskFullError,
    DurabilityError,
    FormatVersionError,
    InvalidKeyError,
    InvalidValueError,
    LSNGapError,
    NoReplicatorError,
    ReadOnlyStoreError,
    StoreClosedError,
    StoreLockedError,
    StoreNotFoundError,
    StorePoisonedError,
    StoreStateError,
    ValueTooLargeError,
    WalsyncError,
)
from .options import Durability, StoreOptions
from .repair import RepairReport, repair
from .replay import RecoveryReport
from .store import (
    ANY,
    Batch,
    CheckpointResult,
    CommitResult,
    Delete,
    Put,
    ReadView,
    Store,
    StoreInfo,
    VersionedValue,
)
from .versions import Version
from .wal import TornTail

__all__ = [
    "ANY",
    "Batch",
    "CapacityError",
    "CheckpointResult",
    "CommitResult",
    "ConflictError",
    "CorruptionError",
    "Damage",
    "Delete",
    "DiskFullError",
    "Durability",
    "DurabilityError",
    "FormatVersionError",
    "InvalidKeyError",
    "InvalidValueError",
    "LSNGapError",
    "NoReplicatorError",
    "Put",
    "ReadOnlyStoreError",
    "ReadView",
    "RecoveryReport",
    "RepairReport",
    "SegmentReport",
    "Store",
    "StoreClosedError",
    "StoreInfo",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreOptions",
    "StorePoisonedError",
    "StoreStateError",
    "TornTail",
    "ValueTooLargeError",
    "VerifyReport",
    "Version",
    "VersionedValue",
    "WalsyncError",
    "repair",
    "verify",
]
