"""The walsync engine as it was before the reserved namespace, to write stores with it.

``OLD_COMMIT`` is the last commit whose workflow layer and LangGraph saver wrote
their keys outside the namespace (``runs/<id>``, ``index/runs/<id>``, ``lg/``).
``old_engine(tmp)`` extracts its ``engine/`` folder with ``git archive`` as the
package ``walsync.engine`` under a directory of its own, and ``run_old(...)``
runs a script in a child process that imports that copy instead of the
installed one (the editable install's finder is taken off ``sys.meta_path``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: "One import root: ..." (f66c0b5), the last commit before key layout 2
OLD_COMMIT = "f66c0b5c35fc8f315819bdcd65c7239d88fd8d2e"

_PRELUDE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path.insert(0, {root!r})
import walsync.engine
assert walsync.engine.__file__.startswith({root!r}), walsync.engine.__file__
"""


def old_engine(directory: Path) -> Path:
    """``directory`` holding ``walsync/engine/`` as of OLD_COMMIT (extracted once)."""
    if not (directory / "walsync" / "engine" / "workflow.py").exists():
        directory.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", "--prefix=walsync/",
             OLD_COMMIT, "engine"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def run_old(directory: Path, script: str, *args: str) -> str:
    """Run ``script`` with the old engine importable as ``walsync.engine``; its stdout."""
    code = _PRELUDE.format(root=str(old_engine(directory))) + textwrap.dedent(script)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout
