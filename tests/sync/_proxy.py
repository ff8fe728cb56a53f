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
  reset (a response or request torn mid-message);
* ``blackhole = True``: half-open connections. Every open connection, and every one
  accepted while it is on, goes silent for good: what either end sends is swallowed,
  nothing is forwarded, nothing is closed or reset (a peer that vanished without a FIN, a
  NAT that forgot the flow). Only the client's own timeout gets it out. ``False`` lets
  new connections through again; the silent ones stay silent until their client closes;
* ``heal()``: lift every fault at once (refuse, delay, pending truncations, blackhole).

``upstream`` may be reassigned while running (a server restarted on another port): new
connections go there.

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
    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.cut = threading.Event()
        #: half-open: swallow everything, forward nothing, close nothing
        self.silent = upstream is None


class FaultProxy:
    def __init__(self, upstream_port: int, *, max_connections: int = 64) -> None:
        self.upstream = (_LOOPBACK, upstream_port)
        self.max_connections = max_connections
        self.delay_seconds = 0.0
        self._refuse = False
        self._blackhole = False
        self._truncate: dict[bool, int] = {}  # to_client -> bytes to let through
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self.accepted = 0
        self.resets = 0
        self.swallowed_bytes = 0

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

    @property
    def blackhole(self) -> bool:
        return self._blackhole

    @blackhole.setter
    def blackhole(self, value: bool) -> None:
        self._blackhole = value
        if value:
            with self._lock:
                for pair in self._pairs:
                    pair.silent = True

    def truncate_next(self, nbytes: int, *, to_client: bool = True) -> None:
        with self._lock:
            self._truncate[to_client] = max(0, nbytes)

    @property
    def truncation_pending(self) -> bool:
        with self._lock:
            return bool(self._truncate)

    def heal(self) -> None:
        """Lift every fault: traffic on new connections flows normally again."""
        self.refuse = False
        self.blackhole = False
        self.delay_seconds = 0.0
        with self._lock:
            self._truncate.clear()

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
            upstream: socket.socket | None = None
            if not self._blackhole:  # a silent connection never reaches the server
                try:
                    upstream = socket.create_connection(self.upstream, timeout=2)
                except OSError:  # the server is down: so is the connection
                    _reset(client)
                    self.resets += 1
                    continue
            for s in (client, upstream):
                if s is not None:
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
        if pair.upstream is not None:
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
                        if pair.silent and src is not pair.client:
                            sel.unregister(src)
                            continue
                        return
                    if not data and pair.silent and src is not pair.client:
                        sel.unregister(src)  # the server gave up: the client is not told
                        continue
                    if not data:  # an orderly close: pass it on
                        clean = True
                        return
                    if pair.silent:  # half-open: the bytes vanish, nobody is told
                        self.swallowed_bytes += len(data)
                        continue
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
            ends = [s for s in (pair.client, pair.upstream) if s is not None]
            if clean:
                for s in ends:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    s.close()
            else:
                for s in ends:
                    _reset(s)
                self.resets += 1
            with self._lock:
                self._pairs.discard(pair)
                self._threads.discard(threading.current_thread())
