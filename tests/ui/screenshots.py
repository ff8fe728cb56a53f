"""Regenerate the README's dashboard screenshots: ``python -m tests.ui.screenshots``.

Builds a store the way the README's main job does (``walsync demo
--crash-after 3; walsync demo``) plus runs in the other states, serves it with
`walsync ui`, and has headless Chromium picture the runs list and the demo
run's timeline into sync/ui/screenshots/ (light theme, 1280 CSS pixels wide).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from tests.ui.browser import INSTALL_HINT, Page, find_chromium
from tests.ui.stores import ROOT, make_showcase_store
from walsync.sync.ui import serve

OUT = ROOT / "sync" / "ui" / "screenshots"
WIDTH = 1280


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="directory for the PNG files")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="walsync-screens-") as tmp:
        run_id = make_showcase_store(Path(tmp) / "state", pause_seconds=0.4,
                                     demo_delay_seconds=0.15)
        here = os.getcwd()
        os.chdir(tmp)  # the header shows the store as given: `walsync ui --store state`
        server = serve("state", port=0, environ={}).start()
        try:
            with Page(chromium, window=(WIDTH, 800)) as page:
                shots = [
                    ("runs.png", "?theme=light#/runs", "!!document.querySelector('tr[data-run]')"),
                    ("run-timeline.png", f"?theme=light#/runs/{run_id}",
                     "!!document.querySelector('#timeline .tl-row')"),
                ]
                for name, target, ready in shots:
                    page.goto(server.url + target)
                    page.wait_for(ready, what=name)
                    page.wait_for("document.getElementById('live').dataset.state === 'live'")
                    page.screenshot(out / name, width=WIDTH)
                    print(f"wrote {out / name}")
        finally:
            server.close()
            os.chdir(here)
    return 0


if __name__ == "__main__":
    sys.exit(main())
