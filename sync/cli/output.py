"""The one output formatter of `walsync`: a command's result for people, or JSON with ``--json``.

Commands hand their result over once, with how a person reads it; this
module decides which to print, so the JSON contract (sorted keys, strict
JSON, one object per line for lists; fields are added, never renamed or
removed within a major version) holds for every command alike.
Every line is made before the first is printed: a value JSON cannot hold
stops the command before its output, not in the middle of it.

Progress bars go to stderr, so stdout stays the result alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from .values import text_of

__all__ = ["Human", "Output", "json_option", "progress"]

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
             key: Callable[[T], str | None] | None = None) -> None:
        """A list: one JSON object a line (``data(item)``, else the item itself), or
        the lines ``human(item)`` makes for each."""
        lines: list[str] = []
        for item in items:
            if self.json:
                lines.append(text_of(item if data is None else data(item),
                                     key=None if key is None else key(item)))
            else:
                lines += _lines(human(item))
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


@contextmanager
def progress(label: str, *, show_pos: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr, driven by a library's ``progress(done, total)`` callback."""
    with click.progressbar(length=1, label=label, file=sys.stderr, show_pos=show_pos) as bar:

        def advance(done: int, total: int) -> None:
            bar.length = max(total, 1)
            bar.update(done - bar.pos)

        yield advance
