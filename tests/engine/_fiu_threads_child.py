"""Child process for the helper-thread LMDB cases of the fault sweep: runs under ``fiu-run -x``.

Two helper threads write the snapshot's files from C, where the ``engine._fs``
seam does not reach: the applier thread (it applies each commit to LMDB after
the commit returned; here a commit of a 1.5 MiB value) and LMDB's
own thread writing the compact copy that becomes the snapshot's base at a
checkpoint (asked for, or on the background checkpoint thread). libfiu's
POSIX wrappers, preloaded by ``fiu-run -x``, fail those calls; an external
callback counts only the calls made by the helper thread of the case's stage
(by its name; LMDB's copy thread is not Python's, so it shows as a
``Dummy-`` thread), so the test thread's and the WAL's own writes are never
hit, and each case is deterministic.

Usage: ``python -m tests.engine._fiu_threads_child PLAN.json RESULT.json``. The
plan is a list of cases (stage, libfiu point, errno, which call fails; 0
counts only); the result one outcome per case: which commits were
acknowledged, whether the failing step raised and what, whether the store was
poisoned, refused a later write and still read what was acknowledged, how
close went, and how many calls the callback saw and failed.
"""

from __future__ import annotations

import ctypes
import json
import random
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: small puts before the step under test; then the big one
SMALL_COMMITS = 40
BIG_VALUE_BYTES = (1 << 20) + (1 << 19)
#: the helper thread each stage fails, by the start of its name
THREADS = {"applier": "walsync-snapshot", "base-copy": "Dummy-",
           "base-copy-background": "Dummy-"}

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_uint),
)


def small_value(i: int) -> bytes:
    """Commit ``i``'s value: incompressible, so the snapshot spans many pages."""
    return random.Random(i).randbytes(40_000)


def big_value() -> bytes:
    return random.Random(-1).randbytes(BIG_VALUE_BYTES)


class Injector:
    """Fails the ``nth`` call of a libfiu point made, while armed, by a thread whose
    name starts with ``prefix``."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._armed = False
        self.prefix = ""
        self.nth = 0  # 0: count only
        self.seen = 0
        self.failed = 0
        self._callback = _CALLBACK(self._decide)  # kept alive while enabled

    def _decide(self, name: bytes, failnum: Any, failinfo: Any, flags: Any) -> int:
        if not self._armed or not threading.current_thread().name.startswith(self.prefix):
            return 0
        self.seen += 1
        if self.seen == self.nth:
            self.failed += 1
            return 1
        return 0

    @contextmanager
    def armed(self, points: list[str], code: int) -> Iterator[None]:
        for point in points:
            rc = self._lib.fiu_enable_external(
                point.encode(), 1, ctypes.c_void_p(code or None), 0, self._callback
            )
            if rc != 0:
                raise RuntimeError(f"fiu_enable_external({point}) returned {rc}")
        self._armed = True
        try:
            yield
        finally:
            self._armed = False
            for point in points:
                self._lib.fiu_disable(point.encode())


def _background_checkpoint(store: Any) -> BaseException | None:
    """Have the checkpoint thread run one checkpoint with a new base and wait for it
    (what a commit starts once enough WAL was written); return what it raised."""
    real = store._checkpointer.run
    finished = threading.Event()
    raised: list[BaseException] = []

    def traced(**kwargs: Any) -> Any:
        try:
            return real(**{**kwargs, "new_base": True})
        except BaseException as exc:
            raised.append(exc)
            raise
        finally:
            finished.set()

    store._checkpointer.run = traced
    try:
        store._checkpointer.request()
        if not finished.wait(60):
            raise AssertionError("the background checkpoint did not finish within 60 s")
    finally:
        del store._checkpointer.run
    return raised[0] if raised else None


def run_case(case: dict[str, Any], injector: Injector) -> dict[str, Any]:
    from walsync import engine
    from walsync.engine import Store

    out: dict[str, Any] = {"acked": [], "big": False, "failed": False, "error_type": None,
                           "error": "", "poisoned": None, "raw_error": None}
    injector.nth = int(case["nth"])
    injector.seen = injector.failed = 0
    injector.prefix = THREADS[case["stage"]]
    stage = case["stage"]
    store = Store.open(case["dir"], checkpoint_every_bytes=1 << 40)
    try:
        for i in range(SMALL_COMMITS):
            store.put(f"k{i}", small_value(i))
            out["acked"].append(i)
            # applied one by one, as the count run did (the applier thread applies
            # after a commit returns): the snapshot's pages, and so LMDB's calls, are
            # the same in every run
            assert store.applied_lsn == i + 1
        try:
            with injector.armed(case["points"], int(case["errno"])):
                if stage == "applier":
                    store.put("big", big_value())
                    out["big"] = True
                    # acknowledged: its apply runs on the applier thread, waited for
                    # here while the fault is armed
                    store.applied_lsn  # noqa: B018
                elif stage == "base-copy":
                    store.checkpoint()
                else:
                    background = _background_checkpoint(store)
                    if background is not None:
                        out["background_error"] = f"{type(background).__name__}: {background}"
        except engine.WalsyncError as exc:
            out.update(failed=True, error_type=type(exc).__name__, error=str(exc))
        out["poisoned"] = None if store.poisoned is None else str(store.poisoned)
        try:
            store.put("later", 1)
            out["later"] = "accepted"
        except engine.StorePoisonedError:
            out["later"] = "refused"
        try:
            out["reads_ok"] = all(store.get(f"k{i}") == small_value(i)
                                  for i in range(SMALL_COMMITS))
            out["big_read"] = store.get("big") is not None
        except engine.WalsyncError as exc:
            out["reads_ok"] = f"{type(exc).__name__}: {exc}"
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as a finding
        out["raw_error"] = "".join(traceback.format_exception(exc))
    finally:
        try:
            store.close()
            out["close"] = "ok"
        except engine.WalsyncError as exc:
            out["close"] = f"{type(exc).__name__}: {exc}"
        except BaseException as exc:  # noqa: BLE001
            out["close"] = f"raw {type(exc).__name__}: {exc}"
    out["seen"], out["injected"] = injector.seen, injector.failed
    return out


def main(plan_path: str, result_path: str) -> None:
    lib = ctypes.CDLL("libfiu.so.0")
    lib.fiu_enable_external.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_uint, _CALLBACK]
    lib.fiu_disable.argtypes = [ctypes.c_char_p]
    injector = Injector(lib)
    cases = json.loads(Path(plan_path).read_text())
    Path(result_path).write_text(json.dumps([run_case(case, injector) for case in cases]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
