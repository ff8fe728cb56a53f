"""walsync's sync layer: replication to Supabase / PostgreSQL, and the `walsync` command."""
