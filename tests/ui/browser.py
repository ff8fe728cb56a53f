"""Headless Chromium (Debian's ``chromium`` package) for the dashboard's browser tests.

Three ways in, all standard library: ``dump_dom`` (the DOM after the page's
script ran, ``--dump-dom`` with a virtual-time budget), ``screenshot``
(``--screenshot``), and ``Page``, a small DevTools-protocol client over
``--remote-debugging-pipe`` (JSON messages on file descriptors 3 and 4) for
what needs a live page: clicks, dialogs, refreshes while the page stays open.
A missing browser is a failure with the command that installs it, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

INSTALL_HINT = ("headless Chromium is needed for the dashboard's browser tests: install Debian's "
                "package with `apt-get install -y chromium` (.ci/run does it when it is missing)")

_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run",
          "--no-default-browser-check", "--disable-dev-shm-usage", "--hide-scrollbars",
          "--mute-audio", "--disable-extensions", "--disable-features=Translate,MediaRouter")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(chromium: str, args: list[str],
         timeout_seconds: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="walsync-chromium-") as profile:
        return subprocess.run([chromium, *_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout_seconds)


def dump_dom(chromium: str, url: str, *, budget_ms: int = 1500,
             window: tuple[int, int] = (1360, 900), timeout_seconds: float = 60.0) -> str:
    """The page's DOM once ``budget_ms`` of virtual time has passed (virtual time stands
    still while a fetch is in flight, so the page's first requests all land within it)."""
    done = _run(chromium, [f"--window-size={window[0]},{window[1]}",
                           f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                timeout_seconds)
    failed = f"chromium --dump-dom {url} exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, failed
    assert "<html" in done.stdout, failed
    return done.stdout


def screenshot(chromium: str, url: str, path: Path, *, window: tuple[int, int],
               budget_ms: int = 4000, timeout_seconds: float = 60.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _run(chromium, [f"--window-size={window[0]},{window[1]}",
                           f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
                timeout_seconds)
    failed = f"chromium --screenshot {url} exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, failed
    assert path.is_file(), failed


# -- reading a dumped DOM ------------------------------------------------------------------


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Element | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> list[Element]:
        out: list[Element] = []
        for c in self.children:
            if isinstance(c, Element):
                out.append(c)
                out.extend(c.iter())
        return out

    def find_all(self, tag: str | None = None, cls: str | None = None,
                 **attrs: str) -> list[Element]:
        """Descendants by tag, class and attributes (``data_step="x"`` is data-step)."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in self.iter()
                if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)
                and all(e.attrs.get(k) == v for k, v in wanted.items())]

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> Element:
        found = self.find_all(tag, cls, **attrs)
        assert found, f"no <{tag or '*'} class={cls!r} {attrs}> in:\n{self.text()[:2000]}"
        return found[0]


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(el)
        if tag not in _VOID:
            self.current = el

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def parse(html: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(html)
    return builder.root


# -- a live page over the DevTools protocol -------------------------------------------------


class Page:
    """One tab of a headless Chromium driven over ``--remote-debugging-pipe``."""

    def __init__(self, chromium: str, *, window: tuple[int, int] = (1360, 900)) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="walsync-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire() -> None:  # runs in the child: its fd 3 reads commands, fd 4 answers
            # through fresh copies: dup2 onto the same number would keep close-on-exec
            read_end, write_end = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self._proc = subprocess.Popen(
            [chromium, *_FLAGS, f"--user-data-dir={self._profile.name}",
             f"--window-size={window[0]},{window[1]}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget",
                                   {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def close(self) -> None:
        with contextlib.suppress(OSError, AssertionError):
            self._call("Browser.close")
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._profile.cleanup()

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")

    def _receive(self, timeout_seconds: float) -> dict[str, Any]:
        import select

        deadline = time.monotonic() + timeout_seconds
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, left))
            assert ready, f"no answer from chromium within {timeout_seconds} s"
            chunk = os.read(self._from_browser, 1 << 16)
            assert chunk, "chromium closed its DevTools pipe"
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        doc: dict[str, Any] = json.loads(message)
        return doc

    def _call(self, method: str, params: dict[str, Any] | None = None,
              session: str | None = None, timeout_seconds: float = 20.0) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._send(message)
        while True:
            doc = self._receive(timeout_seconds)
            if doc.get("id") == self._next_id:
                assert "error" not in doc, f"{method}: {doc['error']}"
                result: dict[str, Any] = doc.get("result", {})
                return result
            if "method" in doc:
                self.events.append(doc)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._call(method, params, self._session)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_seconds: float = 15.0,
                 what: str | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy (real time: the page polls too)."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out after {timeout_seconds} s waiting for "
                                     f"{what or expression}; the page shows:\n{body[:3000]}")
            time.sleep(0.1)

    def screenshot(self, path: Path, *, width: int) -> None:
        """A PNG of the whole page at ``width`` CSS pixels (as tall as its content)."""
        import base64

        height = int(self.evaluate(
            "Math.ceil(document.querySelector('main').getBoundingClientRect().bottom"
            " + window.scrollY)"))
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        shot = self.call("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def click(self, selector: str) -> None:
        found = self.evaluate(f"(() => {{ const el = document.querySelector("
                              f"{json.dumps(selector)}); if (!el) return false; el.click(); "
                              "return true; })()")
        assert found, f"nothing to click at {selector}"


def poll(predicate: Callable[[], Any], timeout_seconds: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")
        time.sleep(0.05)
