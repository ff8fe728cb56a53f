"""Several sync servers in one test: real databases of the throwaway cluster, each reached
through the transport under test (postgres directly, supabase through a gateway), or
in-memory reference servers (sync/memory.py), plus what the node-identity and
recovery-point suites read of them.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import psycopg
from psycopg.conninfo import conninfo_to_dict

from tests.gateway import PostgrestGateway
from tests.pg import PostgresCluster, find_bindir
from tests.sync._helpers import query, supabase_transport
from walsync.engine import Store
from walsync.engine.identity import owner_of, translate_vv
from walsync.engine.record import decode_value
from walsync.sync.memory import MemoryServer
from walsync.sync.merge import record_to_wire
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.transport import Transport

KINDS = ["postgres", "supabase"]
#: the database kinds and the in-memory reference server
ALL_KINDS = [*KINDS, "memory"]
_numbers = itertools.count(1)


@dataclass
class Server:
    """One migrated database, reached with one transport kind; or (kind ``memory``) an
    in-memory reference server, read and backed up the same way."""

    kind: str
    dsn: str
    gateway: PostgrestGateway | None
    opened: list[Transport] = field(default_factory=list)
    memory: MemoryServer | None = None

    def transport(self) -> Transport:
        t: Transport
        if self.memory is not None:
            t = self.memory.transport()
        elif self.kind == "postgres":
            t = PostgresTransport(self.dsn, timeout_seconds=20, connect_timeout_seconds=5)
        else:
            assert self.gateway is not None
            t = supabase_transport(self.gateway, timeout_seconds=20)
        self.opened.append(t)
        return t

    def env(self) -> dict[str, str | None]:
        """The CLI's environment for this server."""
        assert self.memory is None, "the CLI reaches databases only, not a memory server"
        env: dict[str, str | None] = dict.fromkeys(
            ("WALSYNC_PG_DSN", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "WALSYNC_CONFIG",
             "WALSYNC_TRANSPORT", "WALSYNC_STORE", "WALSYNC_SUPABASE_KEY", "SUPABASE_ANON_KEY"))
        if self.kind == "postgres":
            env["WALSYNC_PG_DSN"] = self.dsn
        else:
            assert self.gateway is not None
            env["SUPABASE_URL"] = self.gateway.url
            env["SUPABASE_SERVICE_ROLE_KEY"] = self.gateway.service_role_key
        return env

    def _rows(self, sql: str, table: str, *columns: str,
              params: Any = None) -> list[tuple[Any, ...]]:
        """``sql``'s rows, or (memory) those ``columns`` of each row of ``table``."""
        if self.memory is None:
            return query(self.dsn, sql, params)
        rows = self.memory.entries() if table == "entries" else [
            r for rs in self.memory.siblings().values() for r in rs]
        return [tuple(hashlib.md5(r["data"]).hexdigest() if c == "md5" and r["data"] is not None
                      else None if c == "md5" else r[c] for c in columns) for r in rows]

    def server_id(self) -> str:
        if self.memory is not None:
            return self.memory.server_id
        return str(query(self.dsn, "select server_id::text from walsync.server")[0][0])

    def entries(self) -> dict[tuple[str, int, str], Any]:
        """Every stored entry: (origin, lsn, key) -> the value (None: a tombstone)."""
        return {(o, int(n), k): (None if d is None else decode_value(c, bytes(d)))
                for o, n, k, c, d in self._rows(
                    "select origin, lsn, key, codec, data from walsync.entries",
                    "entries", "origin", "lsn", "key", "codec", "data")}

    def sibling_values(self) -> dict[str, list[Any]]:
        """The merged state: each key's stored siblings' values (None: a tombstone)."""
        out: dict[str, list[Any]] = {}
        for k, c, d in self._rows("select key, codec, data from walsync.siblings",
                                  "siblings", "key", "codec", "data"):
            out.setdefault(k, []).append(None if d is None else decode_value(c, bytes(d)))
        return out

    def digests(self) -> set[tuple[str, int, str, str | None]]:
        """(origin, lsn, key, md5 of the stored bytes) of every entry."""
        return {(o, int(n), k, m) for o, n, k, m in self._rows(
            "select origin, lsn, key, md5(data) from walsync.entries",
            "entries", "origin", "lsn", "key", "md5")}

    def acked(self, node: str) -> int:
        if self.memory is not None:
            row = self.memory.node_row(node)
            return int(row["acked_lsn"]) if row else 0
        rows = query(self.dsn, "select acked_lsn from walsync.nodes where node_id = %s", (node,))
        return int(rows[0][0]) if rows else 0

    def incarnation(self, node: str) -> str | None:
        """The token the node id was last claimed with."""
        if self.memory is not None:
            row = self.memory.node_row(node)
            return None if row is None else row["incarnation"]
        rows = query(self.dsn, "select incarnation from walsync.nodes where node_id = %s",
                     (node,))
        return rows[0][0] if rows else None

    def node_known(self, node: str) -> bool:
        """Whether the server holds a row for the node."""
        if self.memory is not None:
            return self.memory.node_row(node) is not None
        return bool(query(self.dsn, "select 1 from walsync.nodes where node_id = %s", (node,)))

    def dump(self, path: Path) -> None:
        """A real backup (pg_dump, custom format) of the sync schemas (memory: its tables)."""
        if self.memory is not None:
            path.write_bytes(pickle.dumps(self.memory.backup()))
            return
        _run(self, "pg_dump", "-Fc", "-n", "walsync", "-n", "walsync_api", "-f", str(path))

    def restore_dump(self, path: Path) -> None:
        """Put the database back as the backup holds it (the schemas dropped first)."""
        if self.memory is not None:
            self.memory.put_back(pickle.loads(path.read_bytes()))
            return
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("drop schema walsync cascade")
            conn.execute("drop schema walsync_api cascade")
        _run(self, "pg_restore", "-d", str(conninfo_to_dict(self.dsn)["dbname"]), str(path))


def _run(server: Server, tool: str, *args: str) -> None:
    info = conninfo_to_dict(server.dsn)
    cmd = [str(find_bindir() / tool), "-h", str(info.get("host", "127.0.0.1")),
           "-p", str(info["port"]), "-U", str(info.get("user", "postgres")), *args]
    if tool == "pg_dump":
        cmd.append(str(info["dbname"]))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                               "PGCONNECT_TIMEOUT": "10"})
    assert done.returncode == 0, (cmd, done.stdout, done.stderr)


def server_factory(pg_cluster: PostgresCluster | Callable[[], PostgresCluster]
                   ) -> Iterator[Callable[[str], Server]]:
    """For a ``servers`` fixture: ``servers(kind)`` makes a new migrated database reached
    with ``kind``'s transport (``memory``: a memory server); all are dropped at the end.
    ``pg_cluster`` may be a callable giving the cluster when a database is first made."""
    made: list[tuple[str, Server]] = []
    clusters: list[PostgresCluster] = []

    def cluster() -> PostgresCluster:
        if not clusters:
            clusters.append(pg_cluster if isinstance(pg_cluster, PostgresCluster)
                            else pg_cluster())
        return clusters[0]

    def make(kind: str) -> Server:
        if kind == "memory":
            return Server(kind, "", None, memory=MemoryServer())
        name = f"walsync_id{os.getpid()}_{next(_numbers)}"
        dsn = cluster().create_database(name)
        migrate(dsn)
        gateway = None
        if kind == "supabase":
            gateway = PostgrestGateway(dsn, schemas=["walsync_api"]).start()
        server = Server(kind, dsn, gateway)
        made.append((name, server))
        return server

    try:
        yield make
    finally:
        for name, server in made:
            for t in server.opened:
                t.close()
            if server.gateway is not None:
                server.gateway.stop()
            if not cluster().running:
                cluster().start()
            cluster().drop_database(name)


# -- what a store holds ------------------------------------------------------------------


def own_entries(store: Store) -> dict[tuple[str, int, str], str | None]:
    """The store's own writes still in its WAL, as the server must hold them once shipped:
    (node id owning the LSN, LSN, key) -> md5 of the stored bytes."""
    store.flush()
    chain = store.identities
    out: dict[tuple[str, int, str], str | None] = {}
    reader = store.wal_reader()
    oldest = reader.oldest_lsn()
    if oldest is None:
        return out
    for rec in reader.read(oldest - 1, store.shippable_lsn, 1 << 30, 1 << 40):
        if rec.local:
            origin = owner_of(chain, rec.lsn).node_id
            for e in record_to_wire(rec.lsn, rec.ops):
                assert translate_vv(chain, rec.lsn, e["vv"])[0] == origin
                out[(origin, rec.lsn, e["key"])] = (None if e["data"] is None
                                                    else hashlib.md5(e["data"]).hexdigest())
    return out


def own_versions(store: Store) -> dict[tuple[str, int, str], Any]:
    """The store's own versions still current in its snapshot: (origin, lsn, key) -> value
    (a version of a node id the store retired, above the LSNs it kept of it, is another
    store's: the copy that kept the id)."""
    chain = store.identities
    out: dict[tuple[str, int, str], Any] = {}
    for key, sibs in store.iter_siblings():
        for s in sibs:
            if s.version.origin == owner_of(chain, s.version.lsn).node_id:
                out[(s.version.origin, s.version.lsn, key)] = (
                    None if s.data is None else decode_value(s.codec, s.data))
    return out


def missing_on(server: Server, store: Store, *, through: int | None = None) -> list[Any]:
    """The store's own writes (up to LSN ``through``) the server does not hold as it wrote
    them: WAL records still kept, and the versions still current in its snapshot."""
    held = server.digests()
    held_values = server.entries()
    missing: list[Any] = []
    for (origin, lsn, key), md5 in own_entries(store).items():
        if (through is None or lsn <= through) and (origin, lsn, key, md5) not in held:
            missing.append(("wal", origin, lsn, key))
    for ident, value in own_versions(store).items():
        if (through is None or ident[1] <= through) and (
                ident not in held_values or held_values[ident] != value):
            missing.append(("snapshot", *ident, value))
    return missing


def cbor_md5(value: Any) -> str:
    return hashlib.md5(cbor2.dumps(value)).hexdigest()
