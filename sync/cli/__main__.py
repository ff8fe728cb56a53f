"""``python -m walsync.sync.cli``: the `walsync` command without its console script."""

from . import main

main()
