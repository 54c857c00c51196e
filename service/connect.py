"""Smartcar Connect on the web: ``GET /connect/callback`` and, when enabled, ``GET /connect/start``.

``/connect/callback?user_id=…&state=…`` (``userId`` is accepted too) stores Smartcar's user id for
the internal user that the signed ``state`` names (:mod:`core.connect`):

| request | status | body |
|---|---|---|
| Connect's own ``error`` (the user declined, an incompatible vehicle, …) | 400 | ``connect_failed``, with Smartcar's ``error`` and ``error_description`` |
| ``state`` missing, malformed or forged | 400 | ``invalid_state`` |
| ``state`` genuine but expired | 400 | ``expired_state`` |
| no ``user_id`` / one that cannot be a Smartcar id | 400 | ``missing_user_id`` / ``invalid_user_id`` |
| the user the state names no longer exists | 404 | ``user_not_found`` |
| the user holds another Smartcar id, or the id belongs to another user | 409 | ``link_conflict`` |
| the user store is down or not migrated | 503 | ``unavailable`` (with ``Retry-After``) |
| stored, or already stored | 200 | ``{"status": "linked" or "already_linked", "userId", "smartcarUserId"}`` |

Nothing changes unless the answer is 200. ``/connect/start?user=ID`` redirects to a fresh Connect
URL; it signs a state for whoever asks, so it exists only with ``CONNECT_START_ENABLED=true``.

The user store is created on the first callback, so the web process starts (and takes webhooks)
without a database; its calls run in a worker thread, off the event loop.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from core.config import Settings
from core.connect import connect_link, state_keys, verify_state
from core.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidConnectState,
    InvalidValue,
    LinkConflict,
    PermanentError,
    UserNotFound,
)
from core.logs import get_logger
from core.users import LinkResult, UserStore
from service.responses import error_response

log = get_logger("smartcar_ingest.connect")

# Smartcar user ids are UUIDs; this admits them (and test ids) and nothing that needs escaping.
_SMARTCAR_ID = re.compile(r"[A-Za-z0-9._~-]{1,36}")
# The page may be bookmarked or proxied: a state or an id must not be cached anywhere.
_NO_STORE = {"Cache-Control": "no-store"}
_CONNECT_DETAIL_LIMIT = 200


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return error_response(status, code, message, headers={**_NO_STORE, **(headers or {})})


def _refused(status: int, user_id: int, exc: PermanentError) -> Response:
    log.warning("connect link refused", user_id=user_id, reason=exc.code)
    return _error(status, exc.code, exc.message)


def _plain(value: str | None) -> str:
    """Connect's text as one short printable line (it is user-facing, but not ours to trust)."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in value or "").split())
    return text[:_CONNECT_DETAIL_LIMIT]


class ConnectEndpoints:
    """The Connect routes of one web process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys = state_keys(settings)
        self._store: UserStore | None = None
        self._lock = threading.Lock()
        if settings.connect_start_enabled:
            # Fail at startup, not on the first user, when /connect/start cannot build a URL.
            link = connect_link(settings, 1)
            if link.note:
                log.warning("connect start", note=link.note)

    def routes(self) -> list[Route]:
        routes = [Route("/connect/callback", self.callback, methods=["GET"])]
        if self._settings.connect_start_enabled:
            routes.append(Route("/connect/start", self.start, methods=["GET"]))
        return routes

    def _users(self) -> UserStore:
        # Called in a worker thread: the lock keeps two first callbacks from building two pools.
        with self._lock:
            if self._store is None:
                self._store = UserStore(self._settings.database_url)
            return self._store

    def _link(self, user_id: int, smartcar_user_id: str) -> LinkResult:
        return self._users().link(user_id, smartcar_user_id)

    def close(self) -> None:
        """Close the user store's connections, if it was ever opened (blocking: run it in a thread)."""
        with self._lock:
            if self._store is not None:
                self._store.dispose()
                self._store = None

    async def callback(self, request: Request) -> Response:
        query = request.query_params
        if "error" in query:
            return self._connect_failed(query)
        try:
            user_id = verify_state(self._keys, query.get("state"))
        except InvalidConnectState as exc:
            return _error(400, exc.code, exc.message)
        smartcar_user_id = (query.get("user_id") or query.get("userId") or "").strip()
        if not smartcar_user_id:
            return _error(400, "missing_user_id", "The redirect carries no user_id: go through Connect again.")
        if _SMARTCAR_ID.fullmatch(smartcar_user_id) is None:
            return _error(400, "invalid_user_id", "The user_id parameter is not a Smartcar user id.")
        try:
            result = await run_in_threadpool(self._link, user_id, smartcar_user_id)
        except LinkConflict as exc:
            return _refused(409, user_id, exc)
        except UserNotFound as exc:
            return _refused(404, user_id, exc)
        except InvalidValue as exc:
            return _refused(400, user_id, exc)
        except (DatabaseUnavailable, ConfigurationError) as exc:
            log.error("connect link failed", user_id=user_id, error=exc.message)
            return _error(503, "unavailable", "The user store is unavailable; retry shortly.", {"Retry-After": "5"})
        if not result.already_linked:
            log.info("connect link stored", user_id=user_id, smartcar_user_id=smartcar_user_id)
        body = {
            "status": "already_linked" if result.already_linked else "linked",
            "userId": result.user.id,
            "smartcarUserId": result.user.smartcar_user_id,
        }
        return JSONResponse(body, headers=_NO_STORE)

    @staticmethod
    def _connect_failed(query: Mapping[str, str]) -> Response:
        error = _plain(query.get("error")) or "unknown_error"
        description = _plain(query.get("error_description"))
        message = f"Smartcar Connect did not finish: {error}"
        if description:
            message += f" ({description.rstrip('.')})"
        vehicle = " ".join(_plain(query.get(key)) for key in ("year", "make", "model") if query.get(key))
        if vehicle:
            message += f"; vehicle: {vehicle}"
        log.info("connect reported an error", error=error)
        return _error(400, "connect_failed", message + ". Nothing was changed.")

    async def start(self, request: Request) -> Response:
        raw = request.query_params.get("user", "")
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) < 10**18:
            return _error(400, "invalid_user", "The user parameter must be an internal user id (a positive integer).")
        link = connect_link(self._settings, int(raw))
        return RedirectResponse(link.url, status_code=302, headers=_NO_STORE)
