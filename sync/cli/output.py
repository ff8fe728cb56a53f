"""The one output formatter of `walsync`: a command's result for people, or JSON with ``--json``.

Commands hand their result over once, with how a person reads it; this
module decides which to print, so the JSON contract (sorted keys, strict
JSON, one object per line for lists; fields are added, never renamed or
removed within a major version) holds for every command alike.
Every line is made before the first is printed: a value JSON cannot hold
stops the command before its output, not in the middle of it.

Progress bars go to stderr, so stdout stays the result alone, and only to a
terminal, once an operation has taken about a second: a script's pipe or log
gets none, and a quick command does not flicker. Tables and progress are
rich's; sizes and ages are in the units people read ("12 MiB", "3 s ago").
"""

from __future__ import annotations

import io
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .values import text_of

__all__ = ["PROGRESS_AFTER_SECONDS", "Human", "Output", "ago", "busy", "duration",
           "json_option", "moment", "progress", "size", "table", "watch"]

#: an operation shows a progress bar once it has run this long (on a terminal)
PROGRESS_AFTER_SECONDS = 1.0

T = TypeVar("T")

#: what a person reads: a line, or several
Human = str | Iterable[str]


class Output:
    """Where one command's result goes (made by ``--json``: see ``json_option``)."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def result(self, data: Any, human: Callable[[], Human], *, key: str | None = None) -> None:
        """One result: ``data`` as a JSON object, or the lines ``human()`` makes (called
        only for people). ``key``: the stored key ``data`` holds a value of, named if
        that value cannot be printed."""
        lines = [text_of(data, key=key)] if self.json else _lines(human())
        _echo(lines)

    def rows(self, items: Iterable[T], human: Callable[[T], Human], *,
             data: Callable[[T], Any] | None = None,
             key: Callable[[T], str | None] | None = None,
             empty: str | None = None) -> None:
        """A list: one JSON object a line (``data(item)``, else the item itself), or
        the lines ``human(item)`` makes for each; for people, ``empty`` says there is
        none (JSON prints nothing: no object, no line)."""
        lines: list[str] = []
        for item in items:
            if self.json:
                lines.append(text_of(item if data is None else data(item),
                                     key=None if key is None else key(item)))
            else:
                lines += _lines(human(item))
        if not lines and empty is not None and not self.json:
            lines.append(empty)
        _echo(lines)


def _lines(human: Human) -> list[str]:
    return [human] if isinstance(human, str) else list(human)


def _echo(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


def _output(_ctx: click.Context, _param: click.Parameter, as_json: bool) -> Output:
    return Output(as_json)


#: ``--json``, handed to the command as ``out``, an Output
json_option = click.option("--json", "out", is_flag=True, callback=_output,
                           help="Print JSON for scripts.")


class _Bar:
    """A progress bar on stderr that appears only on a terminal, and only once the
    work has gone on for ``PROGRESS_AFTER_SECONDS``."""

    def __init__(self, label: str, show_pos: bool, *, indeterminate: bool = False) -> None:
        self.label = label
        self.show_pos = show_pos
        #: no count to show: a pulsing bar and the time it has taken
        self.indeterminate = indeterminate
        self.started = time.monotonic()
        self.enabled = sys.stderr.isatty()
        self._lock = threading.Lock()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def advance(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._bar is None:
                if time.monotonic() - self.started < PROGRESS_AFTER_SECONDS:
                    return
                columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
                if self.indeterminate:
                    pass
                elif self.show_pos:
                    columns.append(TextColumn("{task.completed:,.0f}/{task.total:,.0f}"))
                else:
                    columns.append(TextColumn("{task.percentage:>3.0f}%"))
                columns.append(TimeElapsedColumn())
                self._bar = Progress(*columns, console=Console(stderr=True), transient=True,
                                     redirect_stdout=False, redirect_stderr=False)
                self._bar.start()
                self._task = self._bar.add_task(
                    self.label, total=None if self.indeterminate else max(total, 1))
            assert self._task is not None
            if not self.indeterminate:
                self._bar.update(self._task, completed=min(done, max(total, 1)),
                                 total=max(total, 1))

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None


@contextmanager
def progress(label: str, *, show_pos: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr, driven by a library's ``progress(done, total)`` callback
    (on a terminal only, once the work has run about a second)."""
    bar = _Bar(label, show_pos)
    try:
        yield bar.advance
    finally:
        bar.close()


@contextmanager
def busy(label: str) -> Iterator[None]:
    """For work that can tell nothing of how far it is (opening a store that replays its
    WAL or waits for the writer lock, a checkpoint, a compaction): a pulsing bar and the
    time taken, on the terms of ``progress``."""
    with watch(label, lambda: (0, 0), indeterminate=True):
        yield


@contextmanager
def watch(label: str, poll: Callable[[], tuple[int, int]], *,
          every_seconds: float = 0.2, indeterminate: bool = False) -> Iterator[None]:
    """A progress bar for work that reports none itself: ``poll()`` gives (done, total)
    from another thread while the block runs (``progress``'s rules apply)."""
    bar = _Bar(label, show_pos=True, indeterminate=indeterminate)
    if not bar.enabled:
        yield
        return
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_seconds):
            try:
                done, total = poll()
            except Exception:  # noqa: BLE001 - a bar must never end the work it shows
                continue
            bar.advance(done, total)

    sampler = threading.Thread(target=sample, name="walsync-progress", daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        bar.close()


# -- tables and units ------------------------------------------------------------------


def table(rows: Sequence[Sequence[str | Text]], *, header: Sequence[str] = ()) -> list[str]:
    """Rows aligned in columns (rich), as lines; colour only when stdout is a terminal
    (``click.echo`` drops it elsewhere)."""
    grid = Table(box=None, show_header=bool(header), pad_edge=False, header_style="bold")
    width = len(rows[0]) if rows else len(header)
    for n in range(width):
        grid.add_column(header[n] if header else "", style="bold" if n == 0 and not header
                        else None, overflow="fold")
    for row in rows:
        grid.add_row(*row)
    buffer = io.StringIO()
    colour = sys.stdout.isatty()
    Console(file=buffer, width=max(shutil.get_terminal_size().columns, 80),
            force_terminal=colour, color_system="standard" if colour else None,
            highlight=False).print(grid)
    return [line.rstrip() for line in buffer.getvalue().splitlines()]


def size(n_bytes: int) -> str:
    """Bytes in IEC units: "512 B", "1.5 KiB", "12 MiB"."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n_bytes} B"
            return f"{value:.1f} {unit}" if abs(value) < 10 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """A span as people say it: "0.4 s", "12 s", "4 min 5 s", "2 h 10 min", "3 d 4 h"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def ago(seconds: float) -> str:
    """How long ago: "3 s ago"; a moment still to come: "in 25 s"."""
    if seconds < 0:
        return f"in {duration(-seconds)}"
    return f"{duration(seconds)} ago"


def moment(unix_seconds: float, *, now: float | None = None) -> str:
    """A point in time in UTC, and how long ago it was: "2026-12-07 22:54:42 UTC (3 s ago)"."""
    stamp = datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({ago((time.time() if now is None else now) - unix_seconds)})"
