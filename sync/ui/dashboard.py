"""The dashboard's routes over one store, apart from any socket (``Dashboard.handle``).

Every read goes through one read-only open of the store, which works beside a
live writer (another process holding the writer lock) and sees its commits as
they land. The reader is reopened when the snapshot file behind it changes (a
writer's ``compact`` swaps the directory; an old handle would keep showing
the past).

Read-only unless made with ``allow_actions``: then three POST routes exist
(resolve a ``needs_attention`` step, roll a run back to a named checkpoint,
resolve a conflict). Each opens the store as its writer for the one call, so
each fails with 409 and the holder's pid when another process is the writer.
Without ``allow_actions`` no route writes: every POST is refused with 405. An
action must carry JSON and the page's token (``/api/meta``).

Verify reads every WAL frame and checksum without any lock, like ``walsync
verify`` (safe beside a writer; it costs one read of the WAL, which
checkpoints keep below the size of the live data); it runs when the page
asks, one at a time, and its last result is kept while the dashboard lives.

Threads: any; store access is serialised (one reader handle).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from walsync import engine
from walsync.engine import Delete, Put, Store
from walsync.engine.errors import (
    CheckpointNotFoundError,
    RunNotFoundError,
    StoreLockedError,
    StoreNotFoundError,
    WalsyncError,
)
from walsync.engine.layout import StoreLayout
from walsync.engine.workflow import Workflows

from . import views
from .replication import ReplicationView, known_nodes, local_state

__all__ = ["JSON_TYPE", "Dashboard", "Response", "json_response"]

log = logging.getLogger("walsync.ui")

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
JSON_TYPE = "application/json; charset=utf-8"
_RESOLVE_ACTIONS = ("retry", "skip", "succeed")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: Mapping[str, str] = field(default_factory=dict)


class _ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.hint = hint


def json_response(doc: Any, status: int = HTTPStatus.OK,
                  headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, json.dumps(views.jsonable(doc), ensure_ascii=False).encode(),
                    headers=dict(headers or {}))


def _error(status: HTTPStatus, message: str, hint: str | None, **extra: Any) -> Response:
    return json_response({"error": message, "hint": hint, **extra}, status)


class _Reader:
    """The store opened read-only, reopened when the snapshot file is replaced."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._layout = StoreLayout(path)
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._identity: tuple[int, int] | None = None

    def _snapshot_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._layout.snapshot_dir / "data.mdb")
        except OSError:
            return None
        return st.st_dev, st.st_ino

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        with self._lock:
            identity = self._snapshot_identity()
            if self._store is not None and identity != self._identity:
                self._close()
            if self._store is None:
                self._store = Store.open(self.path, readonly=True)
                self._identity = identity
            yield self._store

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """The reader closed, and kept closed, for a block that opens the store itself.

        LMDB allows one handle per environment and process (py-lmdb refuses a
        second), so verify and the actions' writer need the reader out of the way.
        """
        with self._lock:
            self._close()
            yield

    @contextlib.contextmanager
    def writer(self) -> Iterator[Store]:
        """The store opened as its writer, for one action; the reader waits meanwhile."""
        with self.released():
            store = Store.open(self.path, create=False)
            try:
                yield store
            finally:
                store.close()

    def _close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()

    def close(self) -> None:
        with self._lock:
            self._close()


class Dashboard:
    """The dashboard's routes over one store, apart from any socket (tests call ``handle``)."""

    def __init__(self, store_path: str | os.PathLike[str], *, allow_actions: bool = False,
                 environ: Mapping[str, str] | None = None) -> None:
        self.store_path = str(store_path)
        self.allow_actions = allow_actions
        #: sent by the page with every action; the page reads it from /api/meta
        self.token = secrets.token_urlsafe(24)
        self._reader = _Reader(self.store_path)
        self._replication = ReplicationView(environ)
        self._verify_lock = threading.Lock()
        self._last_verify: dict[str, Any] | None = None

    def check(self) -> None:
        """Open the store once, so a wrong path fails at start rather than in the page."""
        with self._reader.store():
            pass

    def close(self) -> None:
        self._reader.close()
        self._replication.close()

    # -- routing ---------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Mapping[str, str] | None = None,
               body: bytes = b"") -> Response:
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        url = urlsplit(target)
        parts = [unquote(p) for p in url.path.split("/") if p]
        try:
            if method in ("GET", "HEAD"):
                return self._get(parts, parse_qs(url.query), headers.get("if-none-match"))
            if method == "POST":
                return self._post(parts, headers, body)
            raise _ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not supported here")
        except _ApiError as exc:
            return _error(exc.status, str(exc), exc.hint)
        except StoreLockedError as exc:
            return _error(HTTPStatus.CONFLICT, str(exc), "actions need the store's writer lock, "
                          "and another process holds it: act from that process, or stop it "
                          "and try again", pid=exc.pid)
        except (RunNotFoundError, CheckpointNotFoundError) as exc:
            return _error(HTTPStatus.NOT_FOUND, str(exc), exc.hint)
        except StoreNotFoundError as exc:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), exc.hint)
        except WalsyncError as exc:
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc), exc.hint,
                          type=type(exc).__name__)

    def _get(self, parts: list[str], query: dict[str, list[str]],
             if_none_match: str | None) -> Response:
        if not parts:
            return _static("index.html")
        if parts[0] == "static" and len(parts) == 2:
            return _static(parts[1])
        if parts == ["favicon.ico"]:
            return _static("favicon.svg")
        if parts[0] != "api":
            raise _ApiError(HTTPStatus.NOT_FOUND, f"no page /{'/'.join(parts)}")
        route = parts[1:]
        if route == ["meta"]:
            return json_response(self._meta())
        if route == ["runs"]:
            statuses = frozenset(s for v in query.get("status", []) for s in v.split(",") if s)
            q = (query.get("q") or [""])[0]
            return self._versioned(if_none_match, lambda store: views.runs_page(
                store, statuses=statuses, query=q))
        if len(route) == 2 and route[0] == "runs":
            return self._versioned(if_none_match,
                                   lambda store: views.run_detail(store, route[1]))
        if len(route) == 5 and route[0] == "runs" and route[2] == "steps" \
                and route[4] == "output":
            try:
                return self._versioned(if_none_match, lambda store: views.step_output(
                    store, route[1], route[3]))
            except KeyError:
                raise _ApiError(HTTPStatus.NOT_FOUND,
                                f"run {route[1]!r} has no step {route[3]!r}") from None
        if route == ["replication"]:
            return json_response(self._replication_document())
        if route == ["health"]:
            with self._reader.store() as store:
                return json_response(views.health(store, self._last_verify))
        if route == ["verify"]:
            return json_response(self._verify())
        raise _ApiError(HTTPStatus.NOT_FOUND, f"no API route /{'/'.join(parts)}")

    def _versioned(self, if_none_match: str | None,
                   build: Callable[[Store], dict[str, Any]]) -> Response:
        """A document that depends on the store's contents alone, tagged with the applied
        LSN read before it is built: a page polling an idle store gets 304, no rebuild."""
        with self._reader.store() as store:
            tag = f'"{store.node_id}-{store.applied_lsn}"'
            if if_none_match == tag:
                return Response(HTTPStatus.NOT_MODIFIED, b"", headers={"ETag": tag})
            return json_response(build(store), headers={"ETag": tag})

    def _meta(self) -> dict[str, Any]:
        with self._reader.store() as store:
            node = store.node_id
        return {"store": self.store_path, "store_path": str(Path(self.store_path).resolve()),
                "node_id": node,
                "actions": self.allow_actions, "token": self.token,
                "poll_seconds": 2.0, "version": _version()}

    def _replication_document(self) -> dict[str, Any]:
        with self._reader.store() as store:
            local = local_state(store)
            nodes = known_nodes(store)
            conflicts = views.conflicts(store)
        # asked without holding the store: a slow server delays only this page
        doc = self._replication.document(local, nodes)
        doc["conflicts"] = conflicts
        return doc

    def _verify(self) -> dict[str, Any]:
        with self._verify_lock, self._reader.released():
            started = time.monotonic()
            report = engine.verify(self.store_path)
            self._last_verify = views.verify_summary(report, time.monotonic() - started)
            return self._last_verify

    # -- actions ---------------------------------------------------------------------

    def _post(self, parts: list[str], headers: Mapping[str, str], body: bytes) -> Response:
        if not self.allow_actions:
            raise _ApiError(HTTPStatus.METHOD_NOT_ALLOWED, "this dashboard is read-only",
                            "start it with `walsync ui --allow-actions` to resolve steps, roll "
                            "runs back and resolve conflicts")
        if headers.get("x-walsync-token") != self.token:
            raise _ApiError(HTTPStatus.FORBIDDEN, "an action needs the dashboard page's token",
                            "act from the dashboard's own page")
        if not headers.get("content-type", "").startswith("application/json"):
            raise _ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "an action's body is JSON")
        try:
            doc = json.loads(body or b"{}")
        except ValueError as exc:
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise _ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        route = parts[1:] if parts[:1] == ["api"] else []
        action: Callable[[Store], dict[str, Any]]
        if len(route) == 5 and route[0] == "runs" and route[2] == "steps" \
                and route[4] == "resolve":
            action = _resolve_step(route[1], route[3], doc)
        elif len(route) == 3 and route[0] == "runs" and route[2] == "rollback":
            action = _rollback(route[1], doc)
        elif route == ["conflicts", "resolve"]:
            action = _resolve_conflict(doc)
        else:
            raise _ApiError(HTTPStatus.NOT_FOUND, f"no action /{'/'.join(parts)}")
        with self._reader.writer() as store:
            result = action(store)
        log.info("action %s: %s", "/".join(route), result)
        return json_response(result)


def _resolve_step(run_id: str, step_id: str, doc: Mapping[str, Any]) -> Callable[[Store], Any]:
    choice = doc.get("action")
    if choice not in _RESOLVE_ACTIONS:
        raise _ApiError(HTTPStatus.BAD_REQUEST,
                        f"action must be one of {', '.join(_RESOLVE_ACTIONS)}, not {choice!r}")

    def act(store: Store) -> dict[str, Any]:
        run = Workflows(store).get_run(run_id)
        rec = run.steps.get(step_id)
        if rec is None:
            raise _ApiError(HTTPStatus.NOT_FOUND, f"run {run_id!r} has no step {step_id!r}")
        if rec.status != "needs_attention":
            raise _ApiError(HTTPStatus.CONFLICT,
                            f"step {step_id!r} of run {run_id!r} is {rec.status}, not "
                            "needs_attention: nothing to resolve", "reload the run")
        run.resolve(step_id, str(choice), doc.get("output"))
        return {"run_id": run_id, "step_id": step_id, "action": choice,
                "status": run.steps[step_id].status}

    return act


def _rollback(run_id: str, doc: Mapping[str, Any]) -> Callable[[Store], Any]:
    name = doc.get("checkpoint")
    if not isinstance(name, str) or not name:
        raise _ApiError(HTTPStatus.BAD_REQUEST, "name the checkpoint: {\"checkpoint\": NAME}")

    def act(store: Store) -> dict[str, Any]:
        report = Workflows(store).get_run(run_id).rollback(name)
        return {"run_id": run_id, "checkpoint": report.checkpoint, "rollback": report.rollback,
                "discarded_steps": report.discarded_steps,
                "reverted_steps": report.reverted_steps}

    return act


def _resolve_conflict(doc: Mapping[str, Any]) -> Callable[[Store], Any]:
    """Keep one sibling's value with a write that dominates them all, as the CLI does; only
    if the siblings are still the ones the page showed (``seen``), else 409."""
    key, keep, seen = doc.get("key"), doc.get("keep"), doc.get("seen")
    if not isinstance(key, str) or not isinstance(keep, str) or not isinstance(seen, list):
        raise _ApiError(HTTPStatus.BAD_REQUEST,
                        "send {\"key\": KEY, \"keep\": \"origin:lsn\", \"seen\": [dots shown]}")

    def act(store: Store) -> dict[str, Any]:
        versions = store.get_versions(key)
        dots = {f"{v.version.origin}:{v.version.lsn}": v for v in versions}
        if len(versions) < 2:
            raise _ApiError(HTTPStatus.CONFLICT, f"key {key!r} has no conflict any more",
                            "reload the page")
        if set(dots) != {str(d) for d in seen}:
            raise _ApiError(HTTPStatus.CONFLICT,
                            f"the versions of {key!r} changed since the page showed them",
                            "reload the page and choose again")
        chosen = dots.get(keep)
        if chosen is None:
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"{keep!r} is not a version of {key!r}")
        # keeping a value the key already holds: also for keys in walsync's reserved
        # namespace (a run's record two hosts wrote), which only walsync may write
        op = Delete(key) if chosen.version.deleted else Put(key, chosen.value)
        result = store.commit([op], internal=True)
        return {"key": key, "kept": keep, "lsn": result.lsn}

    return act


def _static(name: str) -> Response:
    content_type = _STATIC.get(name)
    if content_type is None:
        raise _ApiError(HTTPStatus.NOT_FOUND, f"no file {name}")
    data = (resources.files(__package__) / "static" / name).read_bytes()
    return Response(HTTPStatus.OK, data, content_type, {"Cache-Control": "no-cache"})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("walsync")
    except PackageNotFoundError:
        return "dev"
