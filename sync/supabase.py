"""The ``supabase`` transport: supabase-py, RPC over PostgREST, service-role key
(or, in tenant mode, a tenant-scoped key).

The only module that imports supabase. What supabase-py does that shapes this
module: it does not retry POSTs or timeouts (the replicator's tenacity loop
does), its errors carry PostgREST's JSON (``code`` is the SQLSTATE for
database errors, ``PGRSTnnn`` for PostgREST's own, or the HTTP status when the
body was not PostgREST's) but no HTTP status, so errors are classified by that
code; timeouts are set explicitly. Every call returns one JSON document (the
functions return ``jsonb``), so PostgREST's row cap never truncates a pull.
The key is never logged or put in an error.
"""

from __future__ import annotations

from typing import Any

import httpx
from postgrest.exceptions import APIError
from supabase import Client, ClientOptions, SupabaseException, create_client

from walsync.engine.errors import (
    RemoteAuthError,
    RemoteRejectedError,
    RemoteSchemaError,
    RemoteUnavailableError,
    SyncConfigError,
    SyncError,
    SyncProtocolError,
)

from .remote import RpcTransport, error_for_sqlstate, push_ack, push_arrays
from .transport import PushAck, WireBatch, WireEntry

__all__ = ["API_SCHEMA", "SupabaseTransport", "classify_api_error"]

API_SCHEMA = "walsync_api"


def classify_api_error(exc: APIError, where: str, status: int | None = None) -> SyncError:
    """By PostgREST's ``code``; without one (a JSON error from whatever sits in front
    of PostgREST, e.g. an API gateway's ``{"message": "Invalid API key"}``), by the
    response's HTTP ``status`` when the caller saw it."""
    code = str(exc.code or "")
    message = f"{where}: {exc.message or 'request failed'}" + (f" ({code})" if code else "")
    if not code and status is not None:
        code = str(status)
        message += f" (HTTP {status})"
    if code.startswith("PGRST"):
        if code in ("PGRST000", "PGRST001", "PGRST002", "PGRST003"):
            return RemoteUnavailableError(message)
        if code in ("PGRST300", "PGRST301", "PGRST302", "PGRST303"):
            return RemoteAuthError(message)
        if code in ("PGRST106", "PGRST202", "PGRST205"):
            return RemoteSchemaError(message)
        return RemoteRejectedError(message)
    if code.isdigit() and len(code) == 3:  # an HTTP status from a non-PostgREST body
        status = int(code)
        if status >= 500 or status in (408, 429):
            return RemoteUnavailableError(message)
        if status in (401, 403):
            return RemoteAuthError(message)
        if status == 404:
            return RemoteSchemaError(message)
        return RemoteRejectedError(message)
    return error_for_sqlstate(code, message)


class SupabaseTransport(RpcTransport):
    """Thread rules: one thread at a time (the replicator's)."""

    name = "supabase"

    def __init__(self, url: str, service_role_key: str, *, timeout_seconds: float = 30.0,
                 access_token: str | None = None) -> None:
        """``access_token``: a tenant-scoped JWT sent as the bearer token, with
        ``service_role_key`` then only the ``apikey`` (on Supabase, the project's anon
        key: its API gateway admits a request by that header; the JWT sets the role)."""
        self.where = url.rstrip("/")
        # The timeout goes on an explicit httpx client: supabase-py >= 2.20 deprecates
        # ``postgrest_client_timeout`` (a DeprecationWarning on every client created).
        self._http = httpx.Client(timeout=timeout_seconds,
                                  event_hooks={"response": [self._saw_response]})
        self._status: int | None = None
        options = ClientOptions(schema=API_SCHEMA, httpx_client=self._http,
                                auto_refresh_token=False, persist_session=False)
        if access_token is not None:
            options.headers["Authorization"] = f"Bearer {access_token}"
        try:
            self._client: Client = create_client(url, service_role_key, options=options)
        except SupabaseException as exc:  # a malformed URL or key: a configuration error
            self._http.close()
            raise SyncConfigError(f"SUPABASE_URL or the Supabase key rejected by "
                                  f"supabase-py: {exc.message} (the URL must look like "
                                  "https://<project>.supabase.co)") from None
        except BaseException:
            self._http.close()
            raise

    def _saw_response(self, response: httpx.Response) -> None:
        """The HTTP status of the last response (supabase-py's errors do not carry it)."""
        self._status = response.status_code

    def call(self, function: str, args: dict[str, Any]) -> Any:
        self._status = None
        try:
            return self._client.rpc(function, args).execute().data
        except APIError as exc:
            raise classify_api_error(exc, f"{function} on {self.where}", self._status) from None
        except httpx.TransportError as exc:
            raise RemoteUnavailableError(
                f"{function} on {self.where}: {type(exc).__name__}") from None
        except (ValueError, RecursionError) as exc:
            if self._status is None:  # raised before any answer: not the server's doing
                raise
            # postgrest-py decodes a 2xx body with json.loads and lets a UnicodeDecodeError
            # (a body that claims UTF-16 by its first bytes) or a RecursionError (nesting
            # past the interpreter's limit) through
            raise SyncProtocolError(f"{function} on {self.where}: the answer (HTTP "
                                    f"{self._status}) does not decode: {type(exc).__name__}"
                                    ) from None

    def push(self, node_id: str, through_lsn: int, entries: list[WireEntry]) -> PushAck:
        """The batch as push's parallel arrays in the JSON body: PostgREST types them by
        the function's signature (bytea elements as ``\\x`` hex text, version vectors as
        objects, JSON views as JSON text)."""
        arrays = push_arrays(entries, vv_as_text=False)
        arrays["p_data"] = [None if d is None else "\\x" + d.hex() for d in arrays["p_data"]]
        claim = entries.claim if isinstance(entries, WireBatch) else None
        if claim is not None:
            return push_ack(self.call("push_claimed", {
                "p_node": node_id, "p_incarnation": claim.incarnation,
                "p_base_lsn": claim.base_lsn, "p_after_lsn": claim.after_lsn,
                "p_through_lsn": through_lsn, **arrays}))
        return push_ack(self.call("push", {"p_node": node_id, "p_through_lsn": through_lsn,
                                           **arrays}))

    def close(self) -> None:
        self._http.close()
