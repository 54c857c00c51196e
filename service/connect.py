"""Smartcar Connect on the web: ``GET /connect/callback`` links the Smartcar user id of a genuine
redirect to the internal user its signed state names; ``GET /connect/start`` (off by default) sends
a browser to Connect. What each answer means: docs/migration.md, "Step 2"; the checks and why:
docs/security.md, "Connect capture"."""

from __future__ import annotations

import asyncio
import hashlib
import math
import posixpath
import re
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from core.config import Settings
from core.errors import (
    ConfigurationError,
    IngestError,
    InvalidConnectState,
    InvalidValue,
    LinkConflict,
    RecordNotFound,
    SmartcarRateLimited,
    Unreachable,
)
from core.logs import get_logger
from core.redis.functions import lua_function
from core.redis.keys import CONNECT_STATE_PREFIX
from core.smartcar.client import SmartcarClient, smartcar_client
from core.smartcar.http import LeanHttp, SmartcarHttp
from core.store.users import UserStore
from service.connect_state import ConnectState, confirm_connection, connect_link, state_keys, verify_state
from service.responses import error_response

log = get_logger("smartcar_ingest.connect")

#: The cookie a browser-bound state is bound to: ``__Host-`` behind https, the bare name only for a
#: plain-http callback (docs/security.md, "Connect capture").
BINDING_COOKIE = "smartcar_connect"
HOST_BINDING_COOKIE = "__Host-" + BINDING_COOKIE
# Smartcar user ids are UUIDs; this admits them (and test ids) and nothing that needs escaping.
_SMARTCAR_ID = re.compile(r"[A-Za-z0-9._~-]{1,36}")
# The page may be bookmarked or proxied: a state or an id must not be cached anywhere.
_NO_STORE = {"Cache-Control": "no-store"}
_CONNECT_DETAIL_LIMIT = 200
# The whole check with Smartcar, token included, must end while a browser still waits.
_VERIFY_SECONDS = 10.0
_RETRY_SECONDS = 5
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RELEASE_FN = lua_function("release_connect_state", _RELEASE)
# One body for every conflict: which side is linked, and to what, is nobody's business here.
_CONFLICT = (
    "This Smartcar account cannot be linked to this user, because one of them is already linked elsewhere. "
    "Nothing was changed."
)
_NO_CREDENTIALS = (
    "Linking is unavailable: set SMARTCAR_CLIENT_ID and SMARTCAR_CLIENT_SECRET so the web can confirm "
    "the redirect with Smartcar."
)


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return error_response(status, code, message, headers={**_NO_STORE, **(headers or {})})


def _unavailable(message: str, retry_after: float | None = None) -> Response:
    seconds = _RETRY_SECONDS if retry_after is None else max(1, math.ceil(retry_after))
    return _error(503, "unavailable", message, {"Retry-After": str(seconds)})


def _plain(value: str | None) -> str:
    """Connect's text as one short printable line (it is user-facing, but not ours to trust)."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in value or "").split())
    return text[:_CONNECT_DETAIL_LIMIT]


class ConnectEndpoints:
    """The Connect routes of one web process; ``redis`` is the web's client (spent states, token).
    The Smartcar client and the user store are built on the first callback (docs/architecture.md)."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self._settings = settings
        self._redis = redis
        self._keys = state_keys(settings)
        self._release = _RELEASE_FN.bind(redis)
        callback = urlsplit(settings.connect_redirect_uri or "")
        secure = callback.scheme != "http"
        path = "/" if secure else posixpath.dirname(callback.path)
        self._cookie_name = HOST_BINDING_COOKIE if secure else BINDING_COOKIE
        self._cookie: dict[str, Any] = {"path": path if path.startswith("/") else "/", "secure": secure}
        self._store: UserStore | None = None
        self._lock = threading.Lock()
        self._http: SmartcarHttp | None = None
        self._smartcar: SmartcarClient | None = None
        if settings.connect_start_enabled:
            # Fail at startup, not on the first user, when /connect/start cannot build a URL.
            link = connect_link(settings, 1)
            if link.note:
                log.warning("connect start", note=link.note)
            log.warning(
                "connect start is enabled: it signs a Connect state for any user id it is given, "
                "so it must only be reachable through something that authenticates that user"
            )

    def routes(self) -> list[Route]:
        routes = [Route("/connect/callback", self.callback, methods=["GET"])]
        if self._settings.connect_start_enabled:
            routes.append(Route("/connect/start", self.start, methods=["GET"]))
        return routes

    def _link(self, user_id: int, smartcar_user_id: str) -> bool:
        # Called in a worker thread: the lock keeps two first callbacks from building two pools.
        with self._lock:
            store = self._store = self._store or UserStore(self._settings.database_url)
        return store.link(user_id, smartcar_user_id)

    def _client(self) -> SmartcarClient | None:
        settings = self._settings
        if settings.smartcar_client_id is None or settings.smartcar_client_secret is None:
            return None
        if self._smartcar is None:
            self._http = LeanHttp(max_connections=8)
            # No retries here (the 401 refresh aside): a person is waiting, and a 503 with
            # Retry-After lets them retry with the same link instead of sitting out a backoff.
            self._smartcar = smartcar_client(settings, self._redis, self._http, attempts=1)
        return self._smartcar

    async def aclose(self) -> None:
        http, self._http, self._smartcar = self._http, None, None
        if http is not None:
            await http.aclose()
        store, self._store = self._store, None
        if store is not None:
            await run_in_threadpool(store.dispose)

    async def callback(self, request: Request) -> Response:
        query = request.query_params
        if "error" in query:
            return self._connect_failed(query)
        try:
            state = verify_state(self._keys, query.get("state"), request.cookies.get(self._cookie_name))
        except InvalidConnectState as exc:
            return _error(400, exc.code, exc.message)
        smartcar_user_id = (query.get("user_id") or query.get("userId") or "").strip()
        if not smartcar_user_id:
            return _error(400, "missing_user_id", "The redirect carries no user_id: go through Connect again.")
        if _SMARTCAR_ID.fullmatch(smartcar_user_id) is None:
            return _error(400, "invalid_user_id", "The user_id parameter is not a Smartcar user id.")
        smartcar = self._client()
        if smartcar is None:
            log.error("connect callback without client credentials", user_id=state.user_id)
            return _unavailable(_NO_CREDENTIALS)
        key, claim = CONNECT_STATE_PREFIX + state.nonce, secrets.token_hex(8)
        try:
            # Spent until the state would expire anyway.
            ttl = max(1, state.expires_at - int(time.time()))
            spent = await self._redis.set(key, claim, nx=True, ex=ttl)
        except (RedisError, OSError, TimeoutError) as exc:
            log.error("connect state could not be spent", user_id=state.user_id, error=type(exc).__name__)
            return _unavailable("The service cannot record the link right now; retry shortly.")
        if not spent:
            return _error(400, "state_used", "This Connect link was already used: ask for a new one to connect again.")
        response = await self._redeem(smartcar, state, smartcar_user_id)
        if response.status_code == 503:
            try:
                await self._release(keys=[key], args=[claim])
            except (RedisError, OSError, TimeoutError) as exc:
                # The state stays spent: the user has to ask for a new link, which is safe.
                log.warning("connect state could not be given back", error=type(exc).__name__)
        elif response.status_code == 200 and state.bound:
            response.delete_cookie(self._cookie_name, httponly=True, samesite="lax", **self._cookie)
        return response

    async def _redeem(self, smartcar: SmartcarClient, state: ConnectState, smartcar_user_id: str) -> Response:
        """Verify with Smartcar, then link; a 503 means "nothing happened, try again"."""
        # Logs correlate a Smartcar user id by this digest, never recording the id itself.
        user_id, digest = state.user_id, hashlib.sha256(smartcar_user_id.encode()).hexdigest()[:12]
        try:
            async with asyncio.timeout(_VERIFY_SECONDS):
                await confirm_connection(smartcar, smartcar_user_id, state.issued_at)
        except InvalidConnectState as exc:  # unverified_user or cannot_verify
            log.warning("connect link refused", user_id=user_id, smartcar_user=digest, reason=exc.code)
            return _error(403 if exc.code == "unverified_user" else 409, exc.code, exc.message)
        except (IngestError, RedisError, OSError, TimeoutError) as exc:
            # Every other failure is Smartcar's, ours or our credentials', never the redirect's.
            reason = exc.message if isinstance(exc, IngestError) else type(exc).__name__
            log.error("connect verification failed", user_id=user_id, error=reason)
            retry_after = exc.retry_after if isinstance(exc, SmartcarRateLimited) else None
            return _unavailable("Smartcar could not confirm the connection right now; retry shortly.", retry_after)
        try:
            stored = await run_in_threadpool(self._link, user_id, smartcar_user_id)
        except LinkConflict:
            log.warning("connect link refused", user_id=user_id, smartcar_user=digest, reason="link_conflict")
            return _error(409, "link_conflict", _CONFLICT)
        except RecordNotFound:
            log.warning("connect link refused", user_id=user_id, reason="user_not_found")
            return _error(404, "user_not_found", "The user this Connect link was made for no longer exists.")
        except InvalidValue:
            return _error(400, "invalid_user_id", "The user_id parameter is not a Smartcar user id.")
        except (Unreachable, ConfigurationError) as exc:
            log.error("connect link failed", user_id=user_id, error=exc.message)
            return _unavailable("The user store is unavailable; retry shortly.")
        if stored:
            log.info("connect link stored", user_id=user_id, smartcar_user=digest)
        body = {
            "status": "linked" if stored else "already_linked",
            "userId": user_id,
            "smartcarUserId": smartcar_user_id,
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
        # Leading zeros are read past; the length is checked before int(), which refuses text of
        # more than 4,300 digits with an error of its own.
        digits = raw.lstrip("0") if raw.isascii() and raw.isdigit() else ""
        if not 1 <= len(digits) <= 18:
            return _error(400, "invalid_user", "The user parameter must be an internal user id (a positive integer).")
        user_id = int(digits)
        binding = secrets.token_urlsafe(32)
        link = connect_link(self._settings, user_id, binding=binding)
        log.info("connect start", user_id=user_id)
        response = RedirectResponse(link.url, status_code=302, headers=_NO_STORE)
        ttl = self._settings.connect_state_ttl_seconds
        response.set_cookie(self._cookie_name, binding, max_age=ttl, httponly=True, samesite="lax", **self._cookie)
        return response
