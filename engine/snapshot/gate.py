"""The snapshot's thread rules: the resize gate.

Any thread may read the snapshot; one at a time applies. LMDB's map grows by
itself when it is full, and growing needs every transaction of this process
closed, so reads and writes pass a gate that the resize waits on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CapacityError

__all__ = ["Gate"]


class Gate:
    """Many transactions at once, or one map resize alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._resizing = False
        self._shared = _SharedHold(self)

    @property
    def closed(self) -> bool:
        """Held (or waited for) by a resize or a compaction: a transaction would wait.
        Read without the lock: a hint for callers that must not block (engine/aio.py)."""
        return self._resizing

    def shared(self) -> _SharedHold:
        """``with gate.shared():`` holds the gate shared (a plain object, not a
        generator: every commit passes here twice)."""
        return self._shared

    def _enter_shared(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1

    def _exit_shared(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0 and self._resizing:
                self._cond.notify_all()  # exclusive() waits for the last one out

    @contextmanager
    def exclusive(self, timeout_seconds: float = 60.0) -> Iterator[None]:
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._resizing = False
                    self._cond.notify_all()
                    raise CapacityError(
                        "the LMDB map is full and cannot grow while read transactions stay "
                        "open in this process",
                        hint="close read views (Store.snapshot()) before committing from the "
                        "same thread, or open the store with a larger map_size_bytes",
                    )
                self._cond.wait(left)
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class _SharedHold:
    __slots__ = ("_gate",)

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        self._gate._enter_shared()

    def __exit__(self, *exc: object) -> None:
        self._gate._exit_shared()
