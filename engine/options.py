"""Store options, with units in their names.

Defaults are what a workflow store needs out of the box: every commit durable
on return, segments small enough to remove promptly once checkpointed, and an
LMDB map large enough that growth is rare (it grows by itself when full).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Durability", "StoreOptions"]


class Durability(enum.StrEnum):
    """When a commit call returns.

    ``none``: written to the WAL file, not synced (lost on power failure,
    kept on a process crash). ``local``: after the WAL bytes are fdatasync'ed.
    ``remote``: after the sync server acknowledged the record.
    """

    NONE = "none"
    LOCAL = "local"
    REMOTE = "remote"


@dataclass(frozen=True)
class StoreOptions:
    durability: Durability = Durability.LOCAL
    segment_bytes: int = 64 * 1024 * 1024
    max_value_bytes: int = 64 * 1024 * 1024
    max_key_bytes: int = 511
    compress_above_bytes: int = 4096
    compress_level: int = 3
    map_size_bytes: int = 1 << 36
    #: the leader of a group commit waits up to this long for more committers,
    #: but only while other threads are committing (preparing a record, or
    #: waiting for an earlier one to be applied); single-thread latency never
    #: pays it. Off by default: with the WAL and apply stages pipelined, the
    #: records queued during one fdatasync form the next batch anyway, and
    #: waiting left the WAL idle (8 threads: ~15% fewer commits/s at 0.2 ms)
    group_wait_seconds: float = 0.0
    #: checkpoint by itself once this many WAL bytes were written since the last
    checkpoint_every_bytes: int = 128 * 1024 * 1024
    lock_timeout_seconds: float = 0.0
    #: how long a 'remote' commit waits for the server's acknowledgement
    remote_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, got {self.segment_bytes}")
        if self.max_key_bytes < 1 or self.max_key_bytes > 511:
            raise ValueError(
                f"max_key_bytes must be 1..511 (LMDB's limit), got {self.max_key_bytes}"
            )
        if not 1 <= self.max_value_bytes <= 1 << 30:
            raise ValueError(
                f"max_value_bytes must be 1..{1 << 30} (a record's frame holds at most 2 GiB), "
                f"got {self.max_value_bytes}"
            )
        if self.lock_timeout_seconds < 0:
            raise ValueError("lock_timeout_seconds must not be negative")
