"""A small loopback TCP fault proxy for network-fault tests.

``FaultProxy(upstream_port).start()`` listens on 127.0.0.1:<free port> and forwards every
connection to 127.0.0.1:<upstream_port> (loopback only, both ends). Faults, switchable
while traffic flows, from any thread:

* ``reset_all()``: cut every open connection with a TCP reset (both ends: the client sees
  "connection reset", the server sees the client vanish);
* ``refuse = True``: accept new connections and reset them at once, and reset the open
  ones (the server looks down); ``False`` lets traffic through again;
* ``delay_seconds``: sleep this long before forwarding each chunk (both directions);
* ``truncate_next(n, to_client=True)``: the next chunk in that direction, on whichever
  connection carries it first, is cut to its first ``n`` bytes, then that connection is
  reset (a response or request torn mid-message).

Bounded: at most ``max_connections`` open pairs (more are reset on accept), one thread per
pair plus the accept thread, every socket polled with a short timeout so ``stop()`` ends
everything promptly.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading

__all__ = ["FaultProxy"]

_LOOPBACK = "127.0.0.1"
_POLL_SECONDS = 0.05
_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.cut = threading.Event()


class FaultProxy:
    def __init__(self, upstream_port: int, *, max_connections: int = 64) -> None:
        self.upstream = (_LOOPBACK, upstream_port)
        self.max_connections = max_connections
        self.delay_seconds = 0.0
        self._refuse = False
        self._truncate: dict[bool, int] = {}  # to_client -> bytes to let through
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self.accepted = 0
        self.resets = 0

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_LOOPBACK, 0))
        listener.listen(64)
        listener.settimeout(_POLL_SECONDS)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy-accept",
                                          daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.reset_all()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._listener is not None, "proxy not started"
        return int(self._listener.getsockname()[1])

    # -- faults ------------------------------------------------------------------------
    def reset_all(self) -> int:
        """Reset every open connection; returns how many were cut."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.cut.set()  # the pair's own thread resets both sockets
        return len(pairs)

    @property
    def refuse(self) -> bool:
        return self._refuse

    @refuse.setter
    def refuse(self, value: bool) -> None:
        self._refuse = value
        if value:
            self.reset_all()

    def truncate_next(self, nbytes: int, *, to_client: bool = True) -> None:
        with self._lock:
            self._truncate[to_client] = max(0, nbytes)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # -- forwarding --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                full = len(self._pairs) >= self.max_connections
            if self._refuse or full:
                _reset(client)
                self.resets += 1
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:  # the server is down: so is the connection
                _reset(client)
                self.resets += 1
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
            pair = _Pair(client, upstream)
            thread = threading.Thread(target=self._pump, args=(pair,), name="fault-proxy-pair",
                                      daemon=True)
            with self._lock:
                self._pairs.add(pair)
                self._threads.add(thread)
            thread.start()

    def _pump(self, pair: _Pair) -> None:
        sel = selectors.DefaultSelector()
        sel.register(pair.client, selectors.EVENT_READ, (pair.upstream, False))
        sel.register(pair.upstream, selectors.EVENT_READ, (pair.client, True))
        clean = False
        try:
            while not pair.cut.is_set() and not self._stopping.is_set():
                for key, _ in sel.select(_POLL_SECONDS):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    dst, to_client = key.data
                    try:
                        data = src.recv(_CHUNK)
                    except OSError:
                        return
                    if not data:  # an orderly close: pass it on
                        clean = True
                        return
                    if self.delay_seconds > 0:
                        pair.cut.wait(self.delay_seconds)
                        if pair.cut.is_set():
                            return
                    with self._lock:
                        budget = self._truncate.pop(to_client, None)
                    if budget is not None:
                        with contextlib.suppress(OSError):
                            dst.sendall(data[:budget])
                        return
                    try:
                        dst.sendall(data)
                    except OSError:
                        return
        finally:
            sel.close()
            if clean:
                for s in (pair.client, pair.upstream):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    s.close()
            else:
                _reset(pair.client)
                _reset(pair.upstream)
                self.resets += 1
            with self._lock:
                self._pairs.discard(pair)
                self._threads.discard(threading.current_thread())
