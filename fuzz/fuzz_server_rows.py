"""Fuzz target: the client's decoding of what the sync server answers.

Contract: decoding an answer returns a result of the documented shape or raises a
``WalsyncError`` (``SyncProtocolError`` for a malformed answer; the classified
``SyncError`` for an error answer); any other exception (a KeyError or TypeError from a
missing or wrongly typed field, a binascii error from bad base64, a UnicodeDecodeError
or RecursionError from the JSON layer) is a bug in the decoder.

An input is one selector byte and a body. The body is decoded

* as a JSON document, when it parses, the way the postgres transport receives a
  ``jsonb`` result, and as CBOR, when it parses, for object trees JSON cannot make
  (bytes where text belongs, big integers, tags); each document goes through every
  decoder of ``sync.remote``: ``push_ack``, ``pull_page`` (each entry to a Sibling),
  ``node_status``, ``head_of``, ``state_page``, ``hello_of``, ``node_entries_of``,
  ``conflicts_of``, ``state_count_of`` and the lease answers; the Siblings of a clean
  page have their values decoded as a reader would (``decode_value``);
* as an HTTP answer to the supabase transport (an httpx mock in place of the network),
  with the status and the call (head, pull, node_status, push) picked by the selector,
  so postgrest-py's own decoding of the body is covered too.

A clean result must have its types: ints are bigints >= 0, keys and origins non-empty
text, version vectors text -> int, a Sibling's data bytes or None.

Run: ``python fuzz/fuzz_server_rows.py /tmp/server-rows fuzz/corpus/server_rows``
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

#: statuses an answer may come with (PostgREST's, an API gateway's, a proxy's)
STATUSES = (200, 200, 200, 201, 204, 400, 401, 403, 404, 406, 409, 500, 502, 503)
CALLS = ("head", "pull", "node_status", "push")
_KEY = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2lnbmF0dXJlLW5vdC1jaGVja2Vk"


@contextlib.contextmanager
def _imports(fuzzing: bool) -> Iterator[None]:
    """Import engine and sync inside this block; when ``fuzzing``, with atheris coverage."""
    if not fuzzing:
        yield
        return
    import atheris

    with atheris.instrument_imports(include=["walsync.engine", "walsync.sync"]):
        yield


with _imports(__name__ == "__main__"):
    import cbor2
    import httpx

    from walsync.engine.errors import WalsyncError
    from walsync.engine.record import decode_value
    from walsync.engine.versions import Sibling
    from walsync.sync.remote import (
        conflicts_of,
        head_of,
        hello_of,
        lease_grant,
        lease_list,
        lease_released,
        lease_renewal,
        node_entries_of,
        node_status,
        pull_page,
        push_ack,
        state_count_of,
        state_page,
    )
    from walsync.sync.supabase import SupabaseTransport

_transport: SupabaseTransport | None = None
_answer: dict[str, Any] = {}


def _respond(request: httpx.Request) -> httpx.Response:
    return httpx.Response(_answer["status"], content=_answer["body"],
                          headers={"content-type": "application/json"})


def supabase() -> SupabaseTransport:
    """One transport for the whole run, its network replaced by ``_respond``."""
    global _transport
    if _transport is None:
        _transport = SupabaseTransport("http://127.0.0.1:9", _KEY, timeout_seconds=1)
        _transport._http._transport = httpx.MockTransport(_respond)
    return _transport


def _bigint(value: Any) -> None:
    assert type(value) is int
    assert 0 <= value < 2**63


def check_sibling(key: Any, sib: Any) -> None:
    assert type(key) is str
    assert key
    assert isinstance(sib, Sibling)
    v = sib.version
    assert type(v.origin) is str
    assert v.origin
    for n in (v.lsn, v.hlc, v.fence, sib.codec):
        _bigint(n)
    assert all(type(k) is str and type(n) is int for k, n in v.vv.items())
    assert sib.data is None or type(sib.data) is bytes
    assert v.deleted == (sib.data is None)
    if sib.data is not None:
        with contextlib.suppress(WalsyncError):
            decode_value(sib.codec, sib.data)


def documents(doc: Any) -> None:
    """Every decoder of ``sync.remote`` on one document."""
    with contextlib.suppress(WalsyncError):
        ack = push_ack(doc)
        for n in (ack.acked_lsn, ack.inserted, ack.merged, ack.head):
            _bigint(n)
        assert all(type(f.run_id) is str for f in ack.fenced)
    with contextlib.suppress(WalsyncError):
        page = pull_page(doc)
        _bigint(page.next)
        _bigint(page.head)
        assert len(page.siblings) == len(page.entries)
        for key, sib in page.siblings:
            check_sibling(key, sib)
    with contextlib.suppress(WalsyncError):
        status = node_status(doc)
        assert type(status.node_id) is str
        for n in (status.acked_lsn, status.acked_hlc, status.pull_cursor):
            _bigint(n)
    with contextlib.suppress(WalsyncError):
        _bigint(head_of(doc))
    with contextlib.suppress(WalsyncError):
        checked = state_page(doc)
        assert type(checked.done) is bool
        for row in checked.rows:
            check_sibling(row.key, row.sibling)
            assert row.value_hash is None or type(row.value_hash) is str
    with contextlib.suppress(WalsyncError):
        hello = hello_of(doc)
        assert hello.reason in (None, "taken", "ahead")
        assert type(hello.claimed) is bool
        for n in (hello.acked_lsn, hello.acked_hlc, hello.head):
            _bigint(n)
    with contextlib.suppress(WalsyncError):
        for row in node_entries_of(doc):
            _bigint(row.lsn)
            assert type(row.key) is str
            assert row.md5 is None or type(row.md5) is str
            assert row.hlc is None or (type(row.hlc) is int and 0 <= row.hlc < 2**63)
    with contextlib.suppress(WalsyncError):
        for c in conflicts_of(doc):
            assert type(c.key) is str
            _bigint(c.versions)
    with contextlib.suppress(WalsyncError):
        count = state_count_of(doc)
        _bigint(count.keys)
        _bigint(count.bytes)
    with contextlib.suppress(WalsyncError):
        grant = lease_grant(doc)
        assert type(grant.acquired) is bool
        assert type(grant.expires_at) is str
        _bigint(grant.token)
    with contextlib.suppress(WalsyncError):
        renewal = lease_renewal(doc)
        assert type(renewal.renewed) is bool
        assert renewal.token is None or (type(renewal.token) is int and renewal.token >= 0)
        assert not renewal.renewed or type(renewal.expires_at) is str
    with contextlib.suppress(WalsyncError):
        assert type(lease_released(doc)) is bool
    with contextlib.suppress(WalsyncError):
        for lease in lease_list(doc):
            assert type(lease.live) is bool
            assert type(lease.holder) is str
            _bigint(lease.token)


def over_http(selector: int, body: bytes) -> None:
    t = supabase()
    _answer["status"] = STATUSES[selector % len(STATUSES)]
    _answer["body"] = body
    call = CALLS[(selector // len(STATUSES)) % len(CALLS)]
    with contextlib.suppress(WalsyncError):
        if call == "head":
            _bigint(t.head())
        elif call == "pull":
            for key, sib in t.pull("n", 0, 10).siblings:
                check_sibling(key, sib)
        elif call == "node_status":
            _bigint(t.node_status("n").acked_lsn)
        else:
            _bigint(t.push("n", 1, []).acked_lsn)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # the harness's parse, not the client's
        pass
    else:
        documents(doc)
    try:
        tree = cbor2.loads(body)
    except Exception:  # noqa: BLE001 - the harness's parse: any failure means "not CBOR"
        pass
    else:
        documents(tree)
    over_http(selector, body)


# -- the seed corpus -------------------------------------------------------------------


def _entry(origin: str, lsn: int, key: str, value: Any, **extra: Any) -> dict[str, Any]:
    data = None if value is None else base64.b64encode(cbor2.dumps(value)).decode()
    return {"pos": lsn, "origin": origin, "lsn": lsn, "idx": 0, "key": key,
            "deleted": value is None, "data": data, "codec": 0, "vv": {origin: lsn},
            "hlc": (1_700_000_000_000 + lsn) << 16, "fence": 0, **extra}


def seeds() -> dict[str, bytes]:
    """Answers shaped as the server gives them (selector byte first: 200 and the call)."""
    n = len(STATUSES)

    def answer(call: str, doc: Any, status_index: int = 0) -> bytes:
        selector = CALLS.index(call) * n + status_index
        return bytes([selector]) + json.dumps(doc, separators=(",", ":")).encode()

    page = {"entries": [_entry("A", 1, "runs/r1", {"step": 1}),
                        _entry("B", 2, "k", None)], "next": 2, "head": 2}
    state = {"rows": [{**_entry("A", 3, "k", [1, "x"]), "value_hash": "00ff"}],
             "last_key": "k", "done": True}
    return {
        "pull_page": answer("pull", page),
        "pull_empty": answer("pull", {"entries": [], "next": 5, "head": 9}),
        "push_ack": answer("push", {"acked_lsn": 3, "inserted": 2, "merged": 1, "head": 7,
                                    "fenced": [{"run_id": "r1", "current": 2, "holder": "B"}]}),
        "node_status": answer("node_status", {"node_id": "A", "acked_lsn": 3, "acked_hlc": 9,
                                              "pull_cursor": 2, "last_push_at": None}),
        "head": answer("head", {"head": 7, "schema_version": 1}),
        "state_page": answer("head", state),
        "hello": answer("head", {"server_id": "5f0c4a5e-8d0e-4c55-9d43-1f3a7c2b9e10",
                                 "node_id": "A", "reason": "ahead", "claimed": False,
                                 "acked_lsn": 4, "acked_hlc": 9, "head": 7}),
        "node_entries": answer("head", {"rows": [
            {"lsn": 1, "key": "k", "md5": "9e107d9d372bb6826bd81d3542a419d6", "hlc": 9},
            {"lsn": 2, "key": "runs/r1", "md5": None, "hlc": None}]}),
        "leases": answer("head", [{"run_id": "r1", "holder": "A", "token": 2,
                                   "expires_at": "2026-12-07T21:23:00.5+00:00",
                                   "live": True}]),
        "lease_acquire": answer("head", {"acquired": False, "run_id": "r1", "holder": "B",
                                         "token": 3, "now": "2026-12-07T21:23:00+00:00",
                                         "expires_at": "2026-12-07T21:24:00+00:00"}),
        "error_503": answer("head", {"code": "PGRST001", "message": "no connection",
                                     "details": None, "hint": None}, STATUSES.index(503)),
        "pull_cbor": bytes([CALLS.index("pull") * n]) + cbor2.dumps(page),
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-corpus"]:
        from pathlib import Path

        out = Path(__file__).resolve().parent / "corpus" / "server_rows"
        out.mkdir(parents=True, exist_ok=True)
        for name, blob in seeds().items():
            (out / name).write_bytes(blob)
    else:
        from _harness import run

        run(test_one_input)
