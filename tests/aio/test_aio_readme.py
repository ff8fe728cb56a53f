"""README's asyncio quickstart runs as written, and resumes when run again."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### asyncio: the same store and runs, awaited", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None, "README's asyncio section has no python block"
    return found.group(1)


def test_aio_readme_quickstart_runs_as_written_and_resumes(tmp_path: Path) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart())
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "completed 63 {'step': 1}\n"
    assert (tmp_path / "state").is_dir()
