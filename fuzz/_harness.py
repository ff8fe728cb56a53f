"""Shared plumbing for the atheris fuzz targets in this directory.

Nothing here imports atheris or engine at import time: the pytest tests in
``test_fuzz_bounded.py`` import the targets' ``test_one_input`` functions and
must work where atheris is not installed. atheris is imported only when a
target runs as a script.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def engine_imports(fuzzing: bool) -> Iterator[None]:
    """Import engine inside this block; when ``fuzzing``, with atheris coverage.

    atheris instruments only modules imported inside its hook, so the targets
    import engine here, before anything else does.
    """
    if not fuzzing:
        yield
        return
    import atheris

    already = "engine" in sys.modules
    with atheris.instrument_imports(include=["walsync.engine"]):
        yield
    if already:  # imported before the hook saw it (a sitecustomize, a plugin, ...)
        atheris.instrument_all()


def run(test_one_input: Callable[[bytes], Any]) -> None:
    """libFuzzer main: ``python fuzz/fuzz_X.py [libFuzzer flags] [corpus dirs]``."""
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def magic_offsets(buf: bytes, magic: bytes, back: int) -> list[int]:
    """Every ``pos - back`` where ``magic`` occurs at ``pos`` (frame candidates)."""
    out = []
    pos = buf.find(magic)
    while pos >= 0:
        if pos >= back:
            out.append(pos - back)
        pos = buf.find(magic, pos + 1)
    return out
