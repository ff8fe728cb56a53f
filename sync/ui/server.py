"""`walsync ui`'s HTTP server: standard library only, one thread per request.

The page (static/index.html, app.js, app.css: shipped in the package, nothing
fetched from elsewhere) polls the JSON API of dashboard.py every two seconds.

Requests from other sites are kept out: on a loopback address the ``Host``
header must name this server (a DNS-rebinding page cannot read the API), and
an action's ``Origin``, when the browser sends one, must be this server's.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .dashboard import JSON_TYPE, Dashboard, Response, json_response

__all__ = ["DashboardServer", "serve"]

log = logging.getLogger("walsync.ui")

#: request bodies larger than this are refused (an action's JSON is small)
_MAX_BODY_BYTES = 1 << 20


class DashboardServer(ThreadingHTTPServer):
    """The dashboard on a socket; ``start`` serves from a thread, ``serve_forever`` here."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, dashboard: Dashboard, host: str, port: int) -> None:
        self.dashboard = dashboard
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self.host = host
        self.port = int(self.server_address[1])
        self._allowed_hosts = _allowed_hosts(host, self.port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def host_allowed(self, header: str | None) -> bool:
        return self._allowed_hosts is None or (header or "").lower() in self._allowed_hosts

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(target=self.serve_forever, name="walsync-ui",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
        self.dashboard.close()


def _allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host headers a loopback server answers (None: any, off loopback)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    names = {"localhost", "127.0.0.1", "[::1]", host if ":" not in host else f"[{host}]"}
    return frozenset(f"{n}:{port}" for n in names)


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"
    server_version = "walsync-ui"

    def _serve(self, method: str) -> None:
        if not self.server.host_allowed(self.headers.get("Host")):
            self._send(Response(HTTPStatus.MISDIRECTED_REQUEST, json.dumps(
                {"error": "unexpected Host header", "hint": "open the URL walsync ui printed"}
            ).encode()), method)
            return
        body = b""
        if method == "POST":
            origin = self.headers.get("Origin")
            if origin is not None and origin != f"http://{self.headers.get('Host')}":
                self._send(json_response({"error": f"actions from {origin} are refused"},
                                 HTTPStatus.FORBIDDEN), method)
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY_BYTES:
                self._send(json_response({"error": "request body too large"},
                                 HTTPStatus.REQUEST_ENTITY_TOO_LARGE), method)
                self.close_connection = True
                return
            body = self.rfile.read(length)
        response = self.server.dashboard.handle(method, self.path, dict(self.headers.items()),
                                                body)
        self._send(response, method)

    def _send(self, response: Response, method: str) -> None:
        self.send_response(response.status)
        if response.status != HTTPStatus.NOT_MODIFIED:
            self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                         "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
        if response.content_type == JSON_TYPE:
            self.send_header("Cache-Control", "no-store")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("%s %s", self.address_string(), format % args)


def serve(store_path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8765,
          allow_actions: bool = False, environ: Mapping[str, str] | None = None
          ) -> DashboardServer:
    """A dashboard server bound to ``host:port`` (port 0: any free one), not yet serving.

    Raises StoreNotFoundError when there is no store at ``store_path``, OSError when
    the address is taken.
    """
    dashboard = Dashboard(store_path, allow_actions=allow_actions, environ=environ)
    try:
        dashboard.check()
        return DashboardServer(dashboard, host, port)
    except BaseException:
        dashboard.close()
        raise
