"""Run the installed `walsync` in a real terminal (a pseudo-terminal from the kernel), for
the tests of what it prints to people: colour, tables, progress bars.

A pipe and a terminal differ to the program only by ``isatty``; the pty makes stdout and
stderr both a terminal, as an operator's shell does.
"""

from __future__ import annotations

import errno
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ANSI", "WALSYNC", "in_terminal", "plain"]

WALSYNC = Path(sys.executable).with_name("walsync")
#: a terminal control sequence (colour, cursor moves, erasing a line)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def in_terminal(args: list[str], *, cwd: Path, env: Mapping[str, str] | None = None,
                timeout_seconds: float = 120.0, columns: int = 100) -> tuple[int, str]:
    """Run ``walsync args`` with a terminal as stdin, stdout and stderr: (exit code, all
    it wrote, control sequences included)."""
    primary, secondary = pty.openpty()
    full_env = dict(os.environ if env is None else env)
    full_env.update(COLUMNS=str(columns), LINES="40", TERM="xterm-256color")
    full_env.pop("NO_COLOR", None)
    proc = subprocess.Popen([str(WALSYNC), *args], cwd=cwd, env=full_env, stdin=secondary,
                            stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_seconds
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"walsync {' '.join(args)} ran past {timeout_seconds} s:\n"
                                     + b"".join(chunks).decode(errors="replace"))
            ready, _, _ = select.select([primary], [], [], 0.1)
            if ready:
                try:
                    data = os.read(primary, 65536)
                except OSError as exc:  # EIO: the last writer closed the terminal
                    if exc.errno != errno.EIO:
                        raise
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                # drained: nothing more is buffered once the process is gone and quiet
                ready, _, _ = select.select([primary], [], [], 0.2)
                if not ready:
                    break
        code = proc.wait(timeout=30)
    finally:
        os.close(primary)
    return code, b"".join(chunks).decode(errors="replace")


def plain(text: str) -> str:
    """``text`` without control sequences and carriage returns (what a person reads)."""
    return ANSI.sub("", text).replace("\r", "")
