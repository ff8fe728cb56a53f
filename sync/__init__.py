"""walsync's sync layer: replication to Supabase / PostgreSQL, and the `walsync` command."""

# The folder is on sys.path where a checkout's root is (tests, scripts): refuse a second copy.
if __name__ != "walsync.sync":
    raise ImportError(f"import walsync.sync, not {__name__!r}: sync/ is the package "
                      "walsync.sync (install the project with pip install -e .)")

