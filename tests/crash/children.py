"""Fast crash children: the parent's side of the fork server (tests/crash/zygote.py).

:class:`Zygote` starts the helper once (a few hundred ms of imports);
:meth:`Zygote.spawn` then has it fork a child running ``module:function``
``(report_fd, args)`` in a few ms. A child reports on a pipe, one line per
``os.write`` (:class:`Emitter`), so a line written before a SIGKILL still
reaches the parent and lines never interleave. :class:`Child` reads them
without a thread (:meth:`Child.wait_until`, :meth:`Child.sleep`), kills
through a pidfd, and gets the exit code from the zygote, which reaps.

Thread safety: one :class:`Zygote` serves any number of threads; each
:class:`Child` belongs to the thread that spawned it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
#: how long the zygote may take to import everything
START_TIMEOUT_SECONDS = 60.0
#: a report line longer than PIPE_BUF could be split by the kernel
MAX_LINE_BYTES = 4000


class ZygoteError(RuntimeError):
    """The fork server failed or went away."""


class Emitter:
    """A child's report channel: whole lines, each in one ``os.write``, under a lock."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        data = (line + "\n").encode()
        if len(data) > MAX_LINE_BYTES:
            raise AssertionError(f"report line too long ({len(data)} bytes): {line[:80]}")
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]


class _ExitBox:
    def __init__(self) -> None:
        self.code: int | None = None


class Zygote:
    """A running fork server; use as a context manager (or call :meth:`close`)."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "zygote.log"
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = mine
        env = dict(os.environ)
        env.pop("WALSYNC_FAILPOINTS", None)  # children arm their own kill points
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.crash.zygote", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], cwd=REPO_ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        theirs.close()
        self._cond = threading.Condition()
        self._next_id = 0
        self._replies: dict[int, tuple[int, int, _ExitBox] | str] = {}
        self._by_pid: dict[int, _ExitBox] = {}
        self._gone: str | None = None
        self.pid = self._await_ready()
        self.spawned = 0
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()

    def _await_ready(self) -> int:
        ready, _, _ = select.select([self._sock], [], [], START_TIMEOUT_SECONDS)
        data = self._sock.recv(65536) if ready else b""
        if not data:
            self._proc.kill()
            self._proc.wait()
            self._sock.close()
            raise ZygoteError(f"the fork server did not start:\n{self.log_text()}")
        return int(json.loads(data)["ready"])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _read(self) -> None:
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(self._sock, 65536, 4)
                if not data:
                    break
                msg = json.loads(data)
                with self._cond:
                    if "exit" in msg:
                        box = self._by_pid.pop(msg["exit"], None)
                        if box is not None:
                            box.code = int(msg["code"])
                    elif "pid" in msg:
                        box = _ExitBox()
                        self._by_pid[msg["pid"]] = box
                        self._replies[msg["id"]] = (msg["pid"], fds[0], box)
                    else:
                        self._replies[msg["id"]] = str(msg["error"])
                    self._cond.notify_all()
        except OSError as exc:
            gone = f"the fork server connection failed: {exc!r}"
        else:
            gone = "the fork server went away"
        with self._cond:
            self._gone = gone
            self._cond.notify_all()

    def spawn(
        self,
        entry: str,
        args: dict[str, Any],
        log_path: Path,
        on_line: Callable[[str], None] | None = None,
    ) -> Child:
        """Fork a child running ``entry(report_fd, args)``; its stdout and stderr go to
        ``log_path``; ``on_line`` sees every report line as it is read."""
        read_end, write_end = os.pipe()
        try:
            with self._cond:
                if self._gone:
                    raise ZygoteError(f"{self._gone}\n{self.log_text()}")
                self._next_id += 1
                rid = self._next_id
                message = {"id": rid, "entry": entry, "args": args, "log": str(log_path)}
                socket.send_fds(self._sock, [json.dumps(message).encode()], [write_end])
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        with self._cond:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if self._gone or left <= 0:
                    os.close(read_end)
                    raise ZygoteError(f"no reply to fork request {rid}: {self._gone}\n"
                                      f"{self.log_text()}")
                self._cond.wait(left)
            reply = self._replies.pop(rid)
            self.spawned += 1
        if isinstance(reply, str):
            os.close(read_end)
            raise ZygoteError(f"fork request {rid} refused: {reply}")
        pid, pidfd, box = reply
        return Child(self, pid, pidfd, read_end, box, log_path, on_line)

    def _wait_exit(self, box: _ExitBox, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while box.code is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._gone:
                    return box.code
                self._cond.wait(left)
            return box.code

    def close(self) -> None:
        """Stop the server: its remaining children are killed."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(10)
        self._sock.close()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Child:
    """One forked child: its report lines, its kill, its exit code."""

    def __init__(
        self, zygote: Zygote, pid: int, pidfd: int, report_fd: int, box: _ExitBox,
        log_path: Path, on_line: Callable[[str], None] | None,
    ) -> None:
        self.zygote = zygote
        self.pid = pid
        self.log_path = log_path
        self.lines: list[str] = []
        self.eof = False
        self.code: int | None = None
        self._pidfd: int | None = pidfd
        self._fd: int | None = report_fd
        self._box = box
        self._pending = b""
        self._on_line = on_line
        self.started = time.monotonic()

    def pump(self, timeout: float) -> None:
        """Read what the child wrote within ``timeout`` seconds (all of it, up to EOF)."""
        if self.eof or self._fd is None:
            return
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return
        chunk = os.read(self._fd, 65536)
        if not chunk:
            # a partial last line is dropped: an acknowledgement is written whole,
            # and an intent cut short was never committed
            self.eof = True
            return
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for raw in lines:
            line = raw.decode()
            self.lines.append(line)
            if self._on_line is not None:
                self._on_line(line)

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Read lines until ``condition()`` holds (True) or EOF / ``timeout`` (False)."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if self.eof or left <= 0:
                return condition()
            self.pump(left)
        return True

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass, reading lines meanwhile (a full pipe would stall the child)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.eof:
                time.sleep(left)
                return
            self.pump(left)

    def kill(self) -> None:
        """SIGKILL the child (through its pidfd: never another process)."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def finish(self, timeout: float) -> int:
        """Read to EOF and return the exit code (negative: the signal that ended the
        child); a child still running after ``timeout`` is killed first."""
        deadline = time.monotonic() + timeout
        killed = False
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                if killed:
                    raise ZygoteError(f"child {self.pid} does not die after SIGKILL")
                self.kill()
                killed = True
                deadline = time.monotonic() + 10
                continue
            self.pump(left)
        code = self.zygote._wait_exit(self._box, max(deadline - time.monotonic(), 10.0))
        self.close()
        if code is None:
            raise ZygoteError(f"no exit status for child {self.pid}\n{self.zygote.log_text()}")
        self.code = code
        return code

    def close(self) -> None:
        for fd in (self._fd, self._pidfd):
            if fd is not None:
                os.close(fd)
        self._fd = self._pidfd = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""
