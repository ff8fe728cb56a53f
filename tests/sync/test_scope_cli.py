"""README's scoped pull and retention block, run as written with the installed `walsync`
against a real PostgreSQL server, and what each line leaves behind; the config's scope
names."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.sync._helpers import query
from tests.sync.test_cli_readme import BIN, readme_block
from walsync.engine import Store
from walsync.engine.errors import SyncConfigError
from walsync.sync.config import compact_every_seconds, scope_from_settings
from walsync.sync.scope import Scope, load_scope


@pytest.mark.postgres
def test_scope_readme_block_runs_as_written(tmp_path: Path, pg_db: str) -> None:
    lines = readme_block("### Scoped pull, and how long the server keeps its log\n")
    assert {"scope", "retention"} <= {w.split()[1] for w in lines if w.startswith("walsync")}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WALSYNC_", "SUPABASE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["WALSYNC_PG_DSN"] = pg_db
    subprocess.run([str(BIN / "walsync"), "migrate"], env=env, check=True,
                   capture_output=True)
    outputs: list[str] = []
    for line in lines:
        done = subprocess.run(["bash", "-c", f"set -e -o pipefail\n{line}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        outputs.append(f"$ {line}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, "\n".join(outputs)
        assert "Traceback" not in done.stderr
    shown = json.loads(outputs[2].splitlines()[1])
    assert (shown["prefixes"], shown["group"]) == (["app/", "shared/config/"], None)
    compacted = json.loads(outputs[-1].splitlines()[1])
    assert compacted["retention_seconds"] == 604800
    assert compacted["compaction"]["ran"] is True
    with Store.open(tmp_path / "edge", readonly=True) as store:
        assert load_scope(store) == Scope(prefixes=("app/",), group="billing")
    assert query(pg_db, "select name, prefixes from walsync.scope_groups") == [
        ("billing", ["billing/", "invoices/"])]


def test_scope_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "walsync.conf"
    config.write_text("WALSYNC_SCOPE_PREFIXES=app/, shared/config/\nWALSYNC_SCOPE_GROUP=billing\n"
                      "WALSYNC_COMPACT_EVERY=600\n")
    env = {"WALSYNC_CONFIG": str(config)}
    assert scope_from_settings(env) == Scope(prefixes=("app/", "shared/config/"),
                                             group="billing")
    assert compact_every_seconds(env) == 600.0
    assert scope_from_settings({}) is None
    assert compact_every_seconds({}) is None
    assert scope_from_settings({"WALSYNC_SCOPE_PREFIXES": ","}) == Scope(prefixes=())
    with pytest.raises(SyncConfigError, match="must hold a '/'"):
        scope_from_settings({"WALSYNC_SCOPE_PREFIXES": "app"})
    with pytest.raises(SyncConfigError, match="positive number"):
        compact_every_seconds({"WALSYNC_COMPACT_EVERY": "soon"})


@pytest.mark.postgres
def test_scope_sync_worker_declares_the_scope_it_is_given(tmp_path: Path, pg_db: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WALSYNC_", "SUPABASE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["WALSYNC_PG_DSN"] = pg_db
    walsync = str(BIN / "walsync")
    subprocess.run([walsync, "migrate"], env=env, check=True, capture_output=True)
    subprocess.run([walsync, "init", "s"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    done = subprocess.run([walsync, "sync", "--store", "s", "--once", "--scope-prefix", "app/",
                           "--scope-prefix", "jobs/"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    with Store.open(tmp_path / "s", readonly=True) as store:
        assert load_scope(store) == Scope(prefixes=("app/", "jobs/"))
    bad = subprocess.run([walsync, "sync", "--store", "s", "--once", "--scope-prefix", "app"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 2, bad.stderr
    assert "must hold a '/'" in bad.stderr
    env["WALSYNC_SCOPE_GROUP"] = "nobody"  # from the config: declared, and the server says
    missing = subprocess.run([walsync, "sync", "--store", "s", "--once"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, check=False)
    assert missing.returncode == 1, missing.stderr
    assert 'scope group "nobody" does not exist' in missing.stderr
