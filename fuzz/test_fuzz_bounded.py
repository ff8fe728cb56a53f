"""The fuzz targets, bounded, as part of the test command.

* each atheris target runs a few thousand iterations in a subprocess (skipped
  only where atheris cannot be imported: it is a Linux, CPython < 3.13 dev
  dependency);
* the same contract is checked with Hypothesis (arbitrary bytes, and valid
  frames, segments and payloads from the real encoder, mutated), so it holds
  where atheris is unavailable too;
* the seed corpus is current (what ``make_corpus.py`` writes today) and
  passes the contract.

This module imports neither atheris nor anything that imports it: the
targets' ``test_one_input`` functions import atheris only when run as scripts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walsync.engine.record import encode_frame, encode_segment_header

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
TARGETS = ("frame", "segment", "payload", "export")
#: iterations per target in the bounded atheris run, and its time bound (seconds)
RUNS = int(os.environ.get("WALSYNC_FUZZ_RUNS", "4000"))
MAX_SECONDS = int(os.environ.get("WALSYNC_FUZZ_SECONDS", "10"))
#: libFuzzer seed: fixed so that the test is reproducible; set it to explore
SEED = int(os.environ.get("WALSYNC_FUZZ_SEED", "20240601"))

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
HYPOTHESIS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _module(name: str) -> ModuleType:
    if str(FUZZ_DIR) not in sys.path:  # the targets import their sibling _harness
        sys.path.insert(0, str(FUZZ_DIR))
    return importlib.import_module(name)


def _target(name: str) -> Any:
    return _module(f"fuzz_{name}")


def _seeds() -> dict[str, dict[str, bytes]]:
    result: dict[str, dict[str, bytes]] = _module("make_corpus").build()
    return result


# -- the seed corpus ------------------------------------------------------------------


def test_seed_corpus_is_current() -> None:
    """The committed seed files are what the encoder writes today."""
    corpus = FUZZ_DIR / "corpus"
    for target, files in _seeds().items():
        for name, data in files.items():
            path = corpus / target / name
            assert path.is_file(), f"{path} is missing: run python fuzz/make_corpus.py"
            assert path.read_bytes() == data, f"{path} is stale: run python fuzz/make_corpus.py"
    total = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    assert total < 16 * 1024, f"the seed corpus grew to {total} bytes; keep it small"


@pytest.mark.parametrize("target", TARGETS)
def test_seed_corpus_meets_the_contract(target: str) -> None:
    one_input = _target(target).test_one_input
    for data in _seeds()[target].values():
        one_input(data)
    # every target also gets every other target's seeds: all are arbitrary bytes to it
    for files in _seeds().values():
        for data in files.values():
            one_input(data)


# -- the harness does not swallow what it must report ---------------------------------


@pytest.mark.parametrize(
    ("target", "attr", "data"),
    [
        ("frame", "decode_frame", encode_frame(1, 0, b"x")),
        ("segment", "scan_segment", encode_segment_header(1)),
        ("payload", "decode_payload", cbor2.dumps([0, 1, []])),
        ("payload", "decode_value", cbor2.dumps(1)),
        ("payload", "decode_entry", cbor2.dumps([])),
        ("export", "ExportReader", b"walsyncX"),
    ],
)
def test_foreign_exceptions_escape_the_target(
    monkeypatch: pytest.MonkeyPatch, target: str, attr: str, data: bytes
) -> None:
    module = _target(target)

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a decoder bug")

    monkeypatch.setattr(module, attr, broken)
    with pytest.raises(KeyError, match="a decoder bug"):
        module.test_one_input(data)


# -- bounded atheris runs -------------------------------------------------------------


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed (Linux, CPython < 3.13)")
@pytest.mark.parametrize("target", TARGETS)
def test_atheris_bounded_run(target: str, tmp_path: Path) -> None:
    work = tmp_path / "corpus"  # new inputs go here, never into the committed seeds
    work.mkdir()
    cmd = [
        sys.executable,
        str(FUZZ_DIR / f"fuzz_{target}.py"),
        f"-runs={RUNS}",
        f"-max_total_time={MAX_SECONDS}",
        f"-seed={SEED}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        str(work),
        str(FUZZ_DIR / "corpus" / target),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=MAX_SECONDS + 110, check=False
    )
    log = proc.stderr + proc.stdout
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert proc.returncode == 0, (
        f"fuzz_{target} found a contract violation (exit {proc.returncode}); "
        f"artifacts {crashes} in {tmp_path}\n{log[-6000:]}"
    )
    assert "INFO: Instrumenting walsync.engine.record" in log, "engine was not instrumented"
    assert "Done " in log, log[-2000:]


# -- the same contract with Hypothesis ------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@HYPOTHESIS
@given(data=st.binary(max_size=1024))
def test_contract_on_arbitrary_bytes(target: str, data: bytes) -> None:
    _target(target).test_one_input(data)


def _mutate(draw: st.DrawFn, buf: bytes) -> bytes:
    """A few random edits: bit flips, byte sets, inserts, deletes, truncation, splices."""
    out = bytearray(buf)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[pos] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xD7, 0x5A, 0xFF]))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del out[pos:]
        elif op == "dup":
            stop = min(len(out), pos + draw(st.integers(1, 64)))
            out[pos:pos] = out[pos:stop]
    return bytes(out)


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    return draw(st.sampled_from(sorted(_seeds()["payload"].values())))


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    lsn = draw(st.integers(1, 2**64 - 1))
    frame = encode_frame(lsn, draw(st.integers(0, lsn)), draw(payloads()))
    frame = _mutate(draw, frame)
    if draw(st.booleans()):
        frame = _target("frame").with_checksum(frame, 0) or frame
    return frame


@st.composite
def mutated_segments(draw: st.DrawFn) -> bytes:
    first = draw(st.integers(1, 2**40))
    frames = [
        encode_frame(first + i, max(0, first + i - 1 - draw(st.integers(0, 1))), draw(payloads()))
        for i in range(draw(st.integers(0, 4)))
    ]
    segment = _mutate(draw, encode_segment_header(first) + b"".join(frames))
    if draw(st.booleans()):
        segment = _target("segment").fix_checksums(segment)
    return segment


CBOR_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=12,
)


@st.composite
def shaped_payloads(draw: st.DrawFn) -> bytes:
    """CBOR close to the payload and entry shapes, with wrong types here and there."""
    sibling = st.lists(CBOR_ANY, min_size=6, max_size=8) | st.tuples(
        st.none() | st.binary(max_size=16) | CBOR_ANY,
        st.sampled_from([0, 1, 2]) | CBOR_ANY,
        st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2) | CBOR_ANY,
        st.integers(0, 2**64) | CBOR_ANY,
        st.text(max_size=6) | CBOR_ANY,
        st.integers(0, 99) | CBOR_ANY,
        st.integers(0, 9) | CBOR_ANY,
    ).map(list)
    entry = st.lists(sibling, max_size=3).map(cbor2.dumps) | st.binary(max_size=16) | CBOR_ANY
    op = st.tuples(st.text(max_size=6) | CBOR_ANY, entry).map(list) | CBOR_ANY
    record = st.tuples(
        st.sampled_from([0, 1, 2]) | CBOR_ANY,
        st.integers(0, 2**64) | CBOR_ANY,
        st.lists(op, max_size=3) | CBOR_ANY,
    ).map(list) | CBOR_ANY
    encoded: bytes = cbor2.dumps(draw(record))
    return encoded


@HYPOTHESIS
@given(frame=mutated_frames())
def test_contract_on_mutated_frames(frame: bytes) -> None:
    _target("frame").test_one_input(frame)
    _target("segment").test_one_input(encode_segment_header(1) + frame)


@HYPOTHESIS
@given(segment=mutated_segments())
def test_contract_on_mutated_segments(segment: bytes) -> None:
    _target("segment").test_one_input(segment)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    return _mutate(draw, draw(payloads() | shaped_payloads()))


@HYPOTHESIS
@given(data=st.one_of(payloads(), shaped_payloads(), mutated_payloads()))
def test_contract_on_payloads(data: bytes) -> None:
    _target("payload").test_one_input(data)


@st.composite
def mutated_exports(draw: st.DrawFn) -> bytes:
    """A seed export mutated, then (half the time) with its checksums made right."""
    seed = draw(st.sampled_from(sorted(_seeds()["export"].values())))
    data = _mutate(draw, seed)
    if draw(st.booleans()):
        data = _target("export").fix_checksums(data)
    return data


@HYPOTHESIS
@given(data=mutated_exports())
def test_contract_on_mutated_exports(data: bytes) -> None:
    _target("export").test_one_input(data)


# -- the server's answers (fuzz_server_rows) ------------------------------------------


def test_server_rows_seed_corpus_is_current_and_meets_the_contract() -> None:
    module = _target("server_rows")
    seeds = module.seeds()
    corpus = FUZZ_DIR / "corpus" / "server_rows"
    for name, data in seeds.items():
        path = corpus / name
        assert path.is_file(), f"{path} is missing: run python fuzz/fuzz_server_rows.py " \
            "--write-corpus"
        assert path.read_bytes() == data, f"{path} is stale: run python " \
            "fuzz/fuzz_server_rows.py --write-corpus"
        module.test_one_input(data)
    assert sorted(p.name for p in corpus.iterdir()) == sorted(seeds)


@pytest.mark.parametrize("attr", ["pull_page", "push_ack", "node_status", "head_of",
                                  "state_page", "hello_of", "node_entries_of", "conflicts_of",
                                  "state_count_of", "lease_grant", "lease_renewal",
                                  "lease_released", "lease_list", "supabase"])
def test_server_rows_foreign_exceptions_escape_the_target(
    monkeypatch: pytest.MonkeyPatch, attr: str
) -> None:
    module = _target("server_rows")

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a decoder bug")

    monkeypatch.setattr(module, attr, broken)
    with pytest.raises(KeyError, match="a decoder bug"):
        module.test_one_input(module.seeds()["pull_page"])


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed (Linux, CPython < 3.13)")
def test_server_rows_atheris_bounded_run(tmp_path: Path) -> None:
    work = tmp_path / "corpus"
    work.mkdir()
    cmd = [sys.executable, str(FUZZ_DIR / "fuzz_server_rows.py"), f"-runs={RUNS}",
           f"-max_total_time={MAX_SECONDS}", f"-seed={SEED}", "-timeout=10",
           "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", str(work),
           str(FUZZ_DIR / "corpus" / "server_rows")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=MAX_SECONDS + 110, check=False)
    log = proc.stderr + proc.stdout
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert proc.returncode == 0, (
        f"fuzz_server_rows found a contract violation (exit {proc.returncode}); "
        f"artifacts {crashes} in {tmp_path}\n{log[-6000:]}")
    assert "INFO: Instrumenting walsync.sync.remote" in log, "sync was not instrumented"
    assert "Done " in log, log[-2000:]


JSON_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8,
)


def _answers() -> list[tuple[int, Any]]:
    import json

    return sorted(((blob[0], json.loads(blob[1:])) for name, blob in
                   _target("server_rows").seeds().items() if name != "pull_cbor"),
                  key=repr)


@st.composite
def shaped_answers(draw: st.DrawFn) -> bytes:
    """A real answer with fields replaced, removed or added, as JSON or CBOR."""
    import json

    selector, doc = draw(st.sampled_from(_answers()))
    as_cbor = draw(st.booleans())
    leaf = CBOR_ANY if as_cbor else JSON_ANY

    def mangle(node: Any, depth: int) -> Any:
        if draw(st.integers(0, 9)) == 0:
            return draw(leaf)
        if isinstance(node, dict) and depth < 4:
            out = {k: mangle(v, depth + 1) for k, v in node.items()
                   if draw(st.integers(0, 11)) != 0}
            if draw(st.integers(0, 7)) == 0:
                out[draw(st.text(max_size=6))] = draw(leaf)
            return out
        if isinstance(node, list) and depth < 4:
            return [mangle(v, depth + 1) for v in node] + draw(st.lists(leaf, max_size=1))
        return node

    body = mangle(doc, 0)
    if as_cbor:
        encoded: bytes = cbor2.dumps(body)
    else:
        encoded = json.dumps(body).encode()
    return bytes([draw(st.integers(0, 255)) if draw(st.booleans()) else selector]) + encoded


@HYPOTHESIS
@given(data=st.binary(max_size=512))
def test_server_rows_contract_on_arbitrary_bytes(data: bytes) -> None:
    _target("server_rows").test_one_input(data)


@HYPOTHESIS
@given(data=st.one_of(shaped_answers(), shaped_answers().map(lambda b: b[:-1])))
def test_server_rows_contract_on_shaped_answers(data: bytes) -> None:
    _target("server_rows").test_one_input(data)
