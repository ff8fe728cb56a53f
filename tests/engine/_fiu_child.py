"""Child process for the LMDB fault cases: runs under ``fiu-run -x``.

LMDB writes its file from C code (``pwrite``/``writev``, ``fdatasync`` at a
checkpoint, ``mmap`` when the map grows), where no Python seam reaches; the
POSIX wrappers of libfiu, preloaded by ``fiu-run -x``, can fail those calls.
This process drives them through libfiu's own API (``libfiu.so.0`` via
ctypes): a failure point is enabled with an external callback only while the
store's thread is inside one LMDB call of the snapshot (the apply of one
commit, a checkpoint's sync, a map growth), and the callback fails the Nth
call it sees there and lets every other pass. So the WAL's own writes, made
through the same libc functions, are never hit, and each case is
deterministic.

Usage: ``python -m tests.engine._fiu_child PLAN.json RESULT.json``. The plan
is a list of cases; the result one outcome per case: which commits were
acknowledged, which one failed with what error, whether the store refused
later writes, whether reads still worked, how close went, and how many
calls the callback saw and failed. The parent reopens each store without
faults and checks the ledger.
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

COMMITS = 8
#: small enough that the workload grows the map (the 'grow' stage)
SMALL_MAP_BYTES = 64 * 1024
SEGMENT_BYTES = 4096

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_uint),
)


def ops_of(i: int) -> list[tuple[str, Any]]:
    """Commit ``i``: (key, value) puts, value None a delete; every third commit
    writes three keys (a failed one must show wholly or not at all)."""
    pad = "v" * (1500 + 37 * i)
    if i % 3 == 2:
        return [(f"b{j}", {"i": i, "j": j, "pad": pad}) for j in range(3)]
    if i % 5 == 4:
        return [(f"k{(i - 1) % 2}", None)]
    return [(f"k{i % 2}", {"i": i, "pad": pad})]


class Injector:
    """Fails the ``nth`` call of a libfiu point made by one thread inside an armed block."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._armed = False
        self._thread = 0
        self.nth = 0  # 0: count only
        self.seen = 0
        self.failed = 0
        self._callback = _CALLBACK(self._decide)  # kept alive while enabled

    def _decide(self, name: bytes, failnum: Any, failinfo: Any, flags: Any) -> int:
        if not self._armed or threading.get_ident() != self._thread:
            return 0
        self.seen += 1
        if self.seen == self.nth:
            self.failed += 1
            return 1
        return 0

    @contextmanager
    def armed(self, point: str, code: int) -> Iterator[None]:
        name = point.encode()
        rc = self._lib.fiu_enable_external(
            name, 1, ctypes.c_void_p(code or None), 0, self._callback
        )
        if rc != 0:
            raise RuntimeError(f"fiu_enable_external({point}) returned {rc}")
        self._thread = threading.get_ident()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False
            self._lib.fiu_disable(name)


def _wrap(cls: type, method: str, hook: Callable[[], Any]) -> None:
    """Run ``cls.method`` inside ``hook()`` (a context manager or None)."""
    real = getattr(cls, method)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = hook()
        if ctx is None:
            return real(self, *args, **kwargs)
        with ctx:
            return real(self, *args, **kwargs)

    setattr(cls, method, wrapper)


def run_case(case: dict[str, Any], injector: Injector, stage_ctx: dict[str, Any]) -> dict[str, Any]:
    from walsync import engine
    from walsync.engine import Put, Store

    out: dict[str, Any] = {"acked": [], "failed": None, "error_type": None, "error": "",
                           "raw_error": None}
    injector.nth = int(case["nth"])
    injector.seen = injector.failed = 0
    stage, fail_at = case["stage"], int(case["commit"])
    options: dict[str, Any] = {"segment_bytes": SEGMENT_BYTES}
    if stage == "grow":
        options["map_size_bytes"] = SMALL_MAP_BYTES
    store = Store.open(case["dir"], **options)
    stage_ctx.update(stage=None)
    try:
        for i in range(COMMITS):
            # the applier thread applies a commit after it returns: the earlier ones
            # are applied before the fault is armed, commit i's before it is disarmed
            assert store.applied_lsn == store.next_lsn - 1
            if i == fail_at and stage in ("apply", "grow"):
                stage_ctx.update(stage=stage, point=case["point"], code=case["errno"])
            try:
                store.commit([Put(k, v) if v is not None else engine.Delete(k)
                              for k, v in ops_of(i)])
                out["acked"].append(i)
                store.applied_lsn  # noqa: B018 - waits for the apply (armed or not)
            except engine.WalsyncError as exc:
                out.update(failed=i, error_type=type(exc).__name__, error=str(exc),
                           poisoned=isinstance(exc, engine.StorePoisonedError))
                break
            finally:
                stage_ctx.update(stage=None)
            poisoned = store.poisoned
            if poisoned is not None:  # commit i's apply failed after it was acknowledged
                out.update(failed=i, error_type=type(poisoned).__name__, error=str(poisoned),
                           poisoned=True)
                break
        if stage == "checkpoint" and out["failed"] is None:
            stage_ctx.update(stage="checkpoint", point=case["point"], code=case["errno"])
            try:
                store.checkpoint()
            except engine.WalsyncError as exc:
                out.update(failed=-1, error_type=type(exc).__name__, error=str(exc),
                           poisoned=isinstance(exc, engine.StorePoisonedError))
            finally:
                stage_ctx.update(stage=None)
        if out["failed"] is not None:
            try:
                store.put("later", 1)
                out["later"] = "accepted"
            except engine.StorePoisonedError:
                out["later"] = "refused"
            try:
                out["reads"] = {k: store.get(k) for k in ("k0", "k1", "b0", "b1", "b2")}
            except engine.WalsyncError as exc:
                out["reads"] = f"{type(exc).__name__}: {exc}"
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as a finding
        out["raw_error"] = "".join(traceback.format_exception(exc))
    finally:
        stage_ctx.update(stage=None)
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
    from walsync.engine.snapshot import SnapshotStore

    lib = ctypes.CDLL("libfiu.so.0")
    lib.fiu_enable_external.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_uint, _CALLBACK]
    lib.fiu_disable.argtypes = [ctypes.c_char_p]
    injector = Injector(lib)
    stage_ctx: dict[str, Any] = {"stage": None}

    def hook_for(stage: str) -> Callable[[], Any]:
        def hook() -> Any:
            if stage_ctx.get("stage") != stage:
                return None
            return injector.armed(stage_ctx["point"], int(stage_ctx["code"]))
        return hook

    # the apply of a commit (small batches: apply_puts), a checkpoint's sync,
    # a map growth: the LMDB calls a case may fail inside
    _wrap(SnapshotStore, "apply_puts", hook_for("apply"))
    _wrap(SnapshotStore, "sync", hook_for("checkpoint"))
    _wrap(SnapshotStore, "_grow", hook_for("grow"))
    cases = json.loads(Path(plan_path).read_text())
    results = [run_case(case, injector, stage_ctx) for case in cases]
    Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
