"""A throwaway PostgreSQL cluster for tests, run from the installed server binaries.

``PostgresCluster`` runs initdb into a fresh temporary directory (on tmpfs when there is
one), starts the server on a free loopback port (127.0.0.1 only, trust auth, its own socket
directory, fsync and full_page_writes off; synchronous_commit stays on: with fsync off it
costs nothing measurable, and off would let ``kill()`` lose acknowledged commits) and
bootstraps the roles Supabase creates (anon, authenticated,
service_role, authenticator), so RPC functions, grants and RLS behave as on Supabase.

PostgreSQL refuses to run as root: when the tests run as root, every server binary runs as
the ``postgres`` OS user (subprocess ``user=``/``group=``) and the directory is chowned to
it. Binaries are found through ``$WALSYNC_PG_BINDIR`` (if set, only there), ``pg_config
--bindir``, ``/usr/lib/postgresql/*/bin`` (newest first) or PATH; if none has them,
``start()`` raises ``PostgresNotFound`` saying how to install them. Tests never skip.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = ["PostgresCluster", "PostgresError", "PostgresNotFound", "find_bindir"]

BINDIR_ENV = "WALSYNC_PG_BINDIR"
TMPDIR_ENV = "WALSYNC_PG_TMPDIR"
_REQUIRED = ("initdb", "pg_ctl", "postgres")
_DIR_PREFIX = "walsync-pg-"
_OWNER_FILE = "harness.pid"

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found{where}. The sync "
    "tests run a real throwaway PostgreSQL cluster and do not skip without one: install the "
    "server (Debian/Ubuntu: `apt-get install postgresql`; other systems: your PostgreSQL "
    "server package) or set WALSYNC_PG_BINDIR to the directory that holds them (the output "
    "of `pg_config --bindir`, e.g. /usr/lib/postgresql/15/bin)."
)

# Supabase's own role setup (supabase/postgres, migrations/db/init-scripts/
# 00000000000000-initial-schema.sql): API roles without login; authenticator logs in
# without inheriting and may SET ROLE to each; service_role bypasses RLS.
_ROLES_SQL = """
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
    CREATE ROLE anon NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
    CREATE ROLE authenticated NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
    CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticator') THEN
    CREATE ROLE authenticator LOGIN NOINHERIT;
  END IF;
END $$;
GRANT anon TO authenticator;
GRANT authenticated TO authenticator;
GRANT service_role TO authenticator;
ALTER ROLE anon SET statement_timeout = '3s';
ALTER ROLE authenticated SET statement_timeout = '8s';
"""

# Per-database part of Supabase's setup, applied to the template every test database
# is cloned from.
_DB_GRANTS_SQL = """
GRANT USAGE ON SCHEMA public TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
  GRANT ALL ON TABLES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
  GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
  GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;
"""


class PostgresError(RuntimeError):
    """The cluster could not be set up, started or stopped."""


class PostgresNotFound(PostgresError):
    """The PostgreSQL server binaries are not installed (or not where we were told)."""


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED)


def find_bindir() -> Path:
    """Where initdb/pg_ctl/postgres live; raises PostgresNotFound with an install hint."""
    forced = os.environ.get(BINDIR_ENV)
    if forced:
        if _has_server(Path(forced)):
            return Path(forced)
        raise PostgresNotFound(INSTALL_HINT.format(where=f" in {BINDIR_ENV}={forced}"))
    candidates: list[Path] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        if out:
            candidates.append(Path(out))

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parent.name
        return tuple(int(p) for p in part.split(".") if p.isdigit())

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                            key=version, reverse=True)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    raise PostgresNotFound(INSTALL_HINT.format(
        where=" (looked in: pg_config --bindir, /usr/lib/postgresql/*/bin, PATH)"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cluster_root() -> Path:
    """Where clusters live: $WALSYNC_PG_TMPDIR, else tmpfs (/dev/shm: CREATE DATABASE is ~10x
    faster there than on disk), else the temp directory."""
    forced = os.environ.get(TMPDIR_ENV)
    if forced:
        return Path(forced)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def sweep_stale_clusters(root: Path) -> None:
    """Stop and remove clusters left by harness processes that died without cleanup."""
    for base in root.glob(_DIR_PREFIX + "*"):
        try:
            owner = int((base / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((base / "data" / "postmaster.pid").read_text().splitlines()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(base / "data").encode() in cmdline:  # really that cluster's postmaster
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        shutil.rmtree(base, ignore_errors=True)


class PostgresCluster:
    """One throwaway cluster: ``start()``, ``dsn()``, ``restart()``, ``kill()``, ``stop()``.

    ``start()`` also creates ``template_db`` (Supabase's public-schema grants) and
    ``dbname`` cloned from it; ``create_database()`` clones more. ``cleanup()`` (also run
    at exit) stops the server and deletes every file.
    """

    template_db = "walsync_template"

    def __init__(self, dbname: str = "walsync_test", *, port: int | None = None,
                 bindir: Path | None = None, synchronous_commit: str = "on") -> None:
        self.dbname = dbname
        self.synchronous_commit = synchronous_commit
        self.port = port or 0
        self._bindir = bindir
        self.base_dir: Path | None = None
        self._initialized = False
        self._as_postgres = os.geteuid() == 0

    # -- paths ---------------------------------------------------------------------------
    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "cluster not created"
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None, "cluster not created"
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        assert self.base_dir is not None, "cluster not created"
        return self.base_dir / "server.log"

    # -- running binaries ----------------------------------------------------------------
    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        cmd = [str(self.bindir / tool), *args]
        kwargs: dict[str, object] = {}
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
               "HOME": str(self.base_dir), "PGTZ": "UTC"}
        proc = subprocess.run(cmd, cwd=self.base_dir, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
        if proc.returncode != 0:
            raise PostgresError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n"
                                f"{proc.stdout}{proc.stderr}{self._log_tail()}")
        return str(proc.stdout)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except (OSError, AssertionError):
            return ""
        return "\n--- server log ---\n" + "\n".join(tail)

    def _chown(self, path: Path) -> None:
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # -- lifecycle -----------------------------------------------------------------------
    def _init(self) -> None:
        self.bindir  # noqa: B018 - find the binaries (or fail) before creating anything
        if self._as_postgres:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresError(
                    "tests run as root but there is no `postgres` OS user to run PostgreSQL "
                    "as (PostgreSQL refuses to run as root); `apt-get install postgresql` "
                    "creates it, or run the tests as a non-root user") from None
        root = cluster_root()
        sweep_stale_clusters(root)
        self.base_dir = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=root))
        (self.base_dir / _OWNER_FILE).write_text(str(os.getpid()))
        self.socket_dir.mkdir()
        for p in (self.base_dir, self.socket_dir):
            self._chown(p)
        atexit.register(self.cleanup)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# walsync test harness\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = off\nfull_page_writes = off\n"
                f"synchronous_commit = {self.synchronous_commit}\n"
                "max_connections = 200\nshared_buffers = 64MB\n"
                "log_min_messages = warning\nlog_min_error_statement = panic\n"
                "timezone = 'UTC'\n"
                "dynamic_shared_memory_type = mmap\n")
        self._initialized = True

    def start(self) -> PostgresCluster:
        """initdb (first time), start the server and wait until it accepts connections."""
        first = not self._initialized
        if first:
            self._init()
        for attempt in range(5):
            if (first and not self.port) or attempt:
                self.port = free_port()
            try:
                self._run("pg_ctl", "start", "-D", str(self.data_dir), "-w", "-t", "60",
                          "-l", str(self.log_file), "-o", f"-p {self.port}")
                break
            except PostgresError:
                if not first or attempt == 4 or "could not bind" not in self._log_tail():
                    raise
        if first:
            self._bootstrap()
        return self

    def _bootstrap(self) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(_ROLES_SQL)
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template_db)))
        with psycopg.connect(self.dsn(self.template_db), autocommit=True) as conn:
            conn.execute(_DB_GRANTS_SQL)
        self.create_database(self.dbname)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); the files stay."""
        if self.base_dir is None or not (self.data_dir / "postmaster.pid").exists():
            return
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60")

    def kill(self) -> None:
        """Immediate shutdown, like a crash: no checkpoint, clients are cut off, the next
        start() runs crash recovery. Every acknowledged commit survives (WAL is written at
        commit; fsync=off only matters if the OS crashes) unless the cluster was made with
        ``synchronous_commit="off"``, which may drop the last ~0.6 s of them."""
        self.stop("immediate")

    def restart(self) -> None:
        """Stop and start again on the same data directory and port."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        if self.base_dir is None:
            return False
        try:
            self._run("pg_ctl", "status", "-D", str(self.data_dir), timeout=30)
        except PostgresError:
            return False
        return True

    def cleanup(self) -> None:
        """Stop the server (immediately) and delete its directory. Idempotent."""
        if self.base_dir is None:
            return
        with contextlib.suppress(PostgresError, OSError, subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None
        self._initialized = False
        atexit.unregister(self.cleanup)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- connections and databases -------------------------------------------------------
    def dsn(self, dbname: str | None = None, user: str = "postgres") -> str:
        """A libpq connection string over TCP to 127.0.0.1 (trust auth: no password)."""
        return make_conninfo(host="127.0.0.1", port=str(self.port),
                             dbname=dbname or self.dbname, user=user, connect_timeout="10")

    def create_database(self, name: str, template: str | None = None) -> str:
        """CREATE DATABASE name TEMPLATE (default ``template_db``); returns its superuser DSN.

        Cloning needs the template to have no other session; one that is just
        ending (an autovacuum worker, a connection closing) makes it fail with
        55006, so that is retried for a few seconds.
        """
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY WAL_LOG").format(
            sql.Identifier(name), sql.Identifier(template or self.template_db))
        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
                    conn.execute(statement)
                return self.dsn(name)
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE ... WITH (FORCE): also ends connections still open to it."""
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))

