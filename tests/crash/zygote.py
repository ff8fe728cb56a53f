"""The fork server: imports the engine once, then forks one crash child per request.

Run by :class:`tests.crash.children.Zygote` as ``python -m tests.crash.zygote FD``
where FD is its end of a ``SOCK_SEQPACKET`` socket pair. Starting a Python
interpreter and importing the engine (lmdb, cbor2, zstandard ...) costs far
more than a crash cycle itself; a fork of this process costs a few ms. The
test process must not fork itself (pytest and fixtures may run threads, and
a forked copy of a threaded process can deadlock); this helper is
single-threaded, which it checks before every fork.

Nothing here opens a store: a child must never inherit an open LMDB
environment or WAL descriptor, so stores are opened only after the fork, by
the child's entry function.

Messages are one JSON object per packet; descriptors travel as SCM_RIGHTS.

* parent → zygote ``{"id", "entry": "module:function", "args", "log"}`` with the
  write end of the child's report pipe;
* zygote → parent ``{"ready": pid}`` once, then ``{"id", "pid"}`` with a pidfd
  of the child (so the parent's SIGKILL can never hit a recycled pid),
  ``{"id", "error"}``, and ``{"exit": pid, "code"}`` when a child is reaped
  (``code`` as subprocess reports it: negative for a signal).

EOF on the socket (the parent closed it or died) kills the remaining children
and ends the zygote.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Any, NoReturn

#: imported before the first fork, so that children start with them loaded
PRELOAD = (
    "cbor2",
    "lmdb",
    "xxhash",
    "zstandard",
    "walsync.engine",
    "walsync.engine.workflow",
    "tests.crash.killpoints",
    "tests.crash.store_load",
    "tests.crash.workflow_load",
)

_PR_SET_PDEATHSIG = 1
_MAX_PACKET = 1 << 20


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _die_with_parent() -> None:
    """A child outlives neither the zygote nor, through it, the test run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child(
    request: dict[str, Any], report_fd: int, inherited: list[int]
) -> NoReturn:
    """Runs in the forked child: wire up descriptors, run the entry, never return."""
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _die_with_parent()
        for fd in inherited:
            os.close(fd)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        module, _, name = request["entry"].partition(":")
        entry = getattr(importlib.import_module(module), name)
        code = int(entry(report_fd, request["args"]))
    except BaseException:  # noqa: BLE001 - reported in the child's log; the exit code says it
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def probe(report_fd: int, args: dict[str, Any]) -> int:
    """An entry for the harness's own tests: report this child's threads and open
    descriptors (``T <n>``, ``F <fd> <target>``), then exit with ``args["code"]``
    (or raise, if ``args["raise"]``)."""
    lines = [f"T {threading.active_count()}"]
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        with contextlib.suppress(OSError):
            lines.append(f"F {name} {os.readlink(f'/proc/self/fd/{name}')}")
    os.write(report_fd, ("\n".join(lines) + "\n").encode())
    if args.get("raise"):
        raise RuntimeError("the probe was asked to fail")
    return int(args.get("code", 0))


def serve(sock: socket.socket) -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    live: set[int] = set()

    def reap() -> None:
        while live:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            live.discard(pid)
            _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    _send(sock, {"ready": os.getpid()})
    try:
        while True:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                reap()
            if sock.fileno() not in ready:
                continue
            data, fds, _, _ = socket.recv_fds(sock, _MAX_PACKET, 4)
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            request = json.loads(data)
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                _send(sock, {"id": request["id"], "error": f"expected 1 descriptor, got {fds}"})
                continue
            (report_fd,) = fds
            if threading.active_count() != 1:
                os.close(report_fd)
                _send(sock, {"id": request["id"], "error": "the zygote has threads: forking "
                             f"is unsafe ({threading.enumerate()})"})
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, report_fd, [sock.fileno(), wake_r, wake_w])
            os.close(report_fd)
            live.add(pid)
            pidfd = os.pidfd_open(pid)
            try:
                _send(sock, {"id": request["id"], "pid": pid}, [pidfd])
            finally:
                os.close(pidfd)
    finally:
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in live:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    for name in PRELOAD:
        importlib.import_module(name)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the parent went away
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
