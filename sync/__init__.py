"""walsync's sync layer: replication to Supabase / PostgreSQL, and the `walsync` command."""

# The folder is on sys.path where a checkout's root is (tests, scripts): refuse a second copy.
if __name__ != "walsync.sync":
    raise ImportError(f"import walsync.sync, not {__name__!r}: sync/ is the package "
                      "walsync.sync (install the project with pip install -e .)")

#: The sync layer's API lives in its modules, each with a complete ``__all__``
#: (walsync.sync.replicator, .postgres, .supabase, .restore, .lease, .status,
#: .transport): the package itself re-exports nothing, so importing one of them
#: (the CLI, a transport) loads no other's dependencies.
__all__: list[str] = []
