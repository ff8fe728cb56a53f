"""The `walsync` console script's first code, before the command line's modules load.

Loading them takes a moment (the engine, psycopg, rich), and a Ctrl-C in that moment
must end the command as it does later on: exit 130, one line, no traceback. The
interrupt is caught here, around the import, since nothing of the CLI exists yet.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)  # Exit.INTERRUPTED in sync/cli/exits.py, not loaded yet
    cli()
