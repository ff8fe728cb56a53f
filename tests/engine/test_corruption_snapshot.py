"""Single-bit flips sampled over the whole snapshot file and over its base copy.

The rule: every flip is *detected* (open or a read raises CorruptionError, or
verify is not ok) or *harmless* (every key reads back its value and no key is
added); none is ever *wrong*. A few hundred flips per file, seeded
(``WALSYNC_CRASH_SEED`` picks another sample), drawn uniformly over the whole
file and, so that every page type is hit, within each type of page: the two
meta pages (their header and meta record), branch pages, leaf pages and the
overflow pages of large values. The store holds a few hundred keys: small
values, large ones (random, and zstd-compressed) on overflow pages, deleted
keys, keys with several siblings (merged from other nodes), and writes above
its base copy, so the live file also has free pages holding older versions.

Each flip is tried in a forked child on a fresh copy: LMDB reads a damaged
file through a memory map, and whatever it does, the test goes on. A child
that dies or hangs fails the test like a wrong value.

Modes: ``snapshot`` flips the live file, then opens the store for writing,
reads every key (get, scan, versions) and closes it, then runs verify;
``base`` does the same with a flip in the base copy (reads never touch it: it
is verify's to find); ``base, rebuilt`` flips the base of a store whose machine
went down under its writer, so that the open rebuilds the snapshot from that
base (and must check it first).
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import select
import shutil
import signal
import struct
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import lmdb
import pytest

from tests.crash.summary import KillSummary, kill_summary_fixture
from walsync import engine
from walsync.engine import CorruptionError, Store, StorePoisonedError, _fs
from walsync.engine.versions import Sibling, Version

PAGE = 4096
#: flips per file drawn uniformly, and within each page type
UNIFORM = 120
PER_TYPE = 25
#: the rebuilt mode runs fewer: each open copies and checks the base
REBUILT_UNIFORM = 40
REBUILT_PER_TYPE = 10
TRIAL_SECONDS = 60


@pytest.fixture(scope="module")
def flip_summary(request: pytest.FixtureRequest) -> Iterator[KillSummary]:
    yield from kill_summary_fixture(request, "snapshot bit flips")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("flips") / "store"
    rng = random.Random(3)
    state: dict[str, Any] = {}

    def put(store: Store, key: str, value: Any) -> None:
        store.put(key, value, durability="none")
        state[key] = value

    with Store.open(path, segment_bytes=1 << 16) as store:
        for i in range(320):
            put(store, f"k/{i:04d}", {"i": i, "pad": "v" * rng.randrange(20, 1800)})
        for i in range(8):  # random bytes: stored as they are, on overflow pages
            put(store, f"big/{i}", rng.randbytes(rng.randrange(5000, 30000)))
        for i in range(4):  # compressible: zstd
            put(store, f"text/{i}", "walsync " * rng.randrange(800, 4000))
        for i in range(0, 320, 16):
            store.delete(f"k/{i:04d}", durability="none")
            del state[f"k/{i:04d}"]
        for i in range(6):  # concurrent versions from two other nodes: siblings
            key = f"k/{i * 7 + 1:04d}"
            for node in ("other-a", "other-b"):
                sib = Sibling(Version(node, 1, 1, {node: 1}, 0, False), 0, cbor2.dumps(node))
                store.apply_remote([(key, sib)])
        store.checkpoint()  # the base copy
        for i in range(1, 320, 5):  # writes above the base: free pages in the live file
            if f"k/{i:04d}" in state:
                put(store, f"k/{i:04d}", {"i": -i})
        for i in range(20):
            put(store, f"new/{i}", i)
    with Store.open(path, readonly=True) as store:
        state = dict(store.scan())  # the merged keys' winners, as the store reads them
    for directory in ("snapshot", "snapshot-base"):
        pages = _page_types(path / directory / "data.mdb")
        assert {"meta", "branch", "leaf", "overflow"} <= set(pages.values()), (directory, pages)
    assert engine.verify(path).ok
    return path, state


def _page_types(data_file: Path) -> dict[int, str]:
    """Each page's type, from its header (overflow runs: every page of the run)."""
    data = data_file.read_bytes()
    types: dict[int, str] = {}
    page = 0
    while page < len(data) // PAGE:
        at = page * PAGE
        flags = struct.unpack_from("<H", data, at + 10)[0]
        if page < 2:
            types[page] = "meta"
        elif flags & 0x04:  # P_OVERFLOW: the header counts the run's pages
            run = struct.unpack_from("<I", data, at + 12)[0]
            for p in range(page, min(page + max(run, 1), len(data) // PAGE)):
                types[p] = "overflow"
            page += max(run, 1)
            continue
        elif flags & 0x01:
            types[page] = "branch"
        elif flags & 0x02:
            types[page] = "leaf"
        else:
            types[page] = "other"
        page += 1
    return types


def _sample(data_file: Path, rng: random.Random, uniform: int, per_type: int
            ) -> list[tuple[int, int, str]]:
    """(offset, bit, page type) of the flips: uniform over the file, then per type."""
    size = data_file.stat().st_size
    types = _page_types(data_file)
    flips = []
    for _ in range(uniform):
        offset = rng.randrange(size)
        flips.append((offset, rng.randrange(8), types.get(offset // PAGE, "other")))
    for kind in ("meta", "branch", "leaf", "overflow"):
        pages = [p for p, t in types.items() if t == kind]
        for _ in range(per_type):
            page = rng.choice(pages)
            # a meta page holds its record in the first bytes; the rest is unused
            span = 160 if kind == "meta" else PAGE
            flips.append((page * PAGE + rng.randrange(span), rng.randrange(8), kind))
    return flips


def _read_everything(path: Path, state: dict[str, Any], by_key: bool) -> str | None:
    """Open for writing, read every key (one by one too, if ``by_key``), close; what
    came back wrong, or None."""
    with Store.open(path) as store:
        wrong = []
        for key, value in state.items() if by_key else ():
            if store.get(key) != value:
                wrong.append(f"get({key!r})")
            versions = store.get_versions(key)
            if not versions or versions[-1].value != value:
                wrong.append(f"get_versions({key!r})")
        scanned = dict(store.scan())
        if scanned != state:
            extra = sorted(scanned.keys() - state.keys())
            differ = sorted(k for k in scanned.keys() & state.keys() if scanned[k] != state[k])
            wrong.append(f"scan: extra {extra[:3]}, different {differ[:3]}, "
                         f"missing {sorted(state.keys() - scanned.keys())[:3]}")
        if len(list(store.iter_siblings())) < len(state):
            wrong.append("iter_siblings")
    return "; ".join(wrong[:5]) if wrong else None


def _trial(path: Path, state: dict[str, Any], mode: str) -> dict[str, str]:
    """One flipped copy, in the child: how the flip came out."""
    if mode == "base, rebuilt":
        _fs.boot_id = lambda: "this-boot"  # type: ignore[assignment]
    if mode == "verify":  # only: after the reads of a copy made LMDB abort
        report = engine.verify(path)
        return {"outcome": "harmless" if report.ok else "detected", "by": "verify",
                "what": "" if report.ok else report.damage[0].message}
    try:
        wrong = _read_everything(path, state, by_key=mode == "snapshot")
    except CorruptionError as exc:
        return {"outcome": "detected", "by": "open or read", "what": str(exc)[:200]}
    except StorePoisonedError as exc:
        # a write the open made (a node id renewed, say) met the damage: the store
        # refuses writes, naming the file (a CorruptionError caused it, or LMDB's
        # own refusal of the damaged file)
        if isinstance(exc.__cause__, CorruptionError) or "data.mdb" in str(exc):
            return {"outcome": "detected", "by": "a write", "what": str(exc)[:200]}
        raise
    report = engine.verify(path)
    if not report.ok:
        outcome = "detected" if wrong is None else "wrong"
        return {"outcome": outcome, "by": "verify", "what": wrong or report.damage[0].message}
    if wrong is not None:
        return {"outcome": "wrong", "by": "", "what": wrong}
    return {"outcome": "harmless", "by": "", "what": ""}


def _in_child(path: Path, state: dict[str, Any], mode: str) -> dict[str, str]:
    """``_trial`` in a forked child: a crash or a hang is an outcome, not the end."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        faulthandler.disable()  # an abort in LMDB is an outcome here, not a report
        try:
            result = _trial(path, state, mode)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"outcome": "failed", "by": type(exc).__name__,
                      "what": "".join(traceback.format_exception(exc))[-1500:]}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], TRIAL_SECONDS)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"outcome": "hung", "by": "", "what": ""}
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"outcome": "crashed", "by": f"status {status}", "what": ""}
    result: dict[str, str] = json.loads(b"".join(chunks))
    return result


@pytest.mark.parametrize("mode", ["snapshot", "base", "base, rebuilt"])
def test_single_bit_flips_are_detected_or_harmless_never_wrong(
    pristine: tuple[Path, dict[str, Any]], tmp_path: Path, mode: str,
    flip_summary: KillSummary,
) -> None:
    source, state = pristine
    target = "snapshot" if mode == "snapshot" else "snapshot-base"
    rebuilt = mode == "base, rebuilt"
    seed = int(os.environ.get("WALSYNC_CRASH_SEED", "0") or 0) or 17
    rng = random.Random(f"{seed}/{mode}")
    flips = _sample(source / target / "data.mdb", rng,
                    REBUILT_UNIFORM if rebuilt else UNIFORM,
                    REBUILT_PER_TYPE if rebuilt else PER_TYPE)
    outcomes: Counter[str] = Counter()
    channels: Counter[str] = Counter()
    aborted = 0
    by_type: Counter[tuple[str, str]] = Counter()
    bad: list[str] = []
    for offset, bit, kind in flips:
        work = tmp_path / "work"
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(source, work)
        data_file = work / target / "data.mdb"
        with open(data_file, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))
        if rebuilt:  # the machine went down with the store open
            (work / "OPEN").write_text(json.dumps({"boot_id": "an-earlier-boot", "pid": 1}))
        result = _in_child(work, state, mode)
        if result["outcome"] == "crashed":
            # LMDB failed one of its own assertions on the damaged page and aborted
            # the reader (FORMAT.md): nothing was served. Verify, which checks the
            # pages before LMDB walks them, must find the damage and live.
            aborted += 1
            result = _in_child(work, state, "verify")
            if result["outcome"] == "harmless":
                result["outcome"] = "missed after an abort"
        outcomes[result["outcome"]] += 1
        if result["outcome"] == "detected":
            channels[result["by"]] += 1
        by_type[(kind, result["outcome"])] += 1
        if result["outcome"] not in ("detected", "harmless"):
            bad.append(f"{kind} page, offset {offset} bit {bit}: {result}")
    detected, harmless = outcomes["detected"], outcomes["harmless"]
    kinds = ", ".join(f"{kind} {sum(n for (k, _), n in by_type.items() if k == kind)}"
                      for kind in ("meta", "branch", "leaf", "overflow", "other"))
    flip_summary.add(f"{target}/data.mdb ({mode})", len(flips), len(flips),
                     f"detected {detected} (open or read {channels['open or read']}, a write "
                     f"{channels['a write']}, verify {channels['verify']}; of these, reads "
                     f"aborted by LMDB {aborted}), harmless {harmless}, "
                     f"wrong {len(flips) - detected - harmless}; by page: {kinds}")
    assert not bad, "\n".join(bad[:10])
    assert detected > 0


def test_the_flipped_files_hold_every_page_type(pristine: tuple[Path, dict[str, Any]]) -> None:
    """What the sample claims to cover: LMDB's own count of the live pages agrees."""
    source, _state = pristine
    for directory in ("snapshot", "snapshot-base"):
        env = lmdb.open(str(source / directory), readonly=True, lock=False, max_dbs=8)
        try:
            with env.begin() as txn:
                stat = txn.stat(env.open_db(b"data", txn=txn, create=False))
        finally:
            env.close()
        assert stat["branch_pages"] >= 1, (directory, stat)
        assert stat["overflow_pages"] >= 8, (directory, stat)
        assert stat["entries"] >= 300, (directory, stat)
