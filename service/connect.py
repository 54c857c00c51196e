"""Connect: signed single-use states, ``connect-url``'s URL, ``/connect/callback`` and ``/connect/start``
(off by default). The checks and why: docs/security.md, "Connect capture"."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import posixpath
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError
from rq.scripts import RELEASE_LOCK_SCRIPT
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from core.config import Settings, key_list
from core.errors import (
    ConfigurationError,
    IngestError,
    InvalidConnectState,
    LinkConflict,
    RecordNotFound,
    SmartcarRateLimited,
)
from core.logs import get_logger
from core.redis.functions import RQ_SCRIPTS
from core.redis.keys import CONNECT_STATE_PREFIX
from core.smartcar.client import smartcar_client
from core.smartcar.connections import confirm_connection
from core.smartcar.http import LeanHttp
from core.store.users import UserStore
from service.responses import error_response

log = get_logger("smartcar_ingest.connect")

CONNECT_URL = "https://connect.smartcar.com/oauth/authorize"
#: A browser-bound state's cookie: ``__Host-`` behind https, the bare name for a plain-http callback.
BINDING_COOKIE = "smartcar_connect"
HOST_BINDING_COOKIE = "__Host-" + BINDING_COOKIE
_KEY_LABEL = b"smartcar-ingest connect state v1"
_BINDING_LABEL = b"smartcar-ingest connect binding\x00"
# user id (at most 18 digits: a BIGINT), issued and expiry (epoch seconds), binding, 16-byte nonce, 32-byte MAC.
_STATE = re.compile(
    r"v2\.([1-9][0-9]{0,17})\.([0-9]{1,12})\.([0-9]{1,12})\.([bu])\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})"
)
# Smartcar user ids are UUIDs; this admits them (and test ids) and nothing that needs escaping.
_SMARTCAR_ID = re.compile(r"[A-Za-z0-9._~-]{1,36}")
# The whole check with Smartcar, token included, must end while a browser still waits.
_VERIFY_SECONDS = 10.0
# The page may be bookmarked or proxied: a state or an id must not be cached anywhere.
_NO_STORE = {"Cache-Control": "no-store"}
# Compare-and-delete: RQ's lock release, already one of our functions, gives a spent state back.
_RELEASE_FN = RQ_SCRIPTS[RELEASE_LOCK_SCRIPT]
_CONFLICT = (
    "This Smartcar account cannot be linked to this user, because one of them is already linked elsewhere. "
    "Nothing was changed."
)
_NO_CREDENTIALS = (
    "Linking is unavailable: set SMARTCAR_CLIENT_ID and SMARTCAR_CLIENT_SECRET so the web can confirm the "
    "redirect with Smartcar."
)
_NOT_OURS = "The state parameter is not one we issued: start again from a fresh Connect link."
_OTHER_BROWSER = (
    "This Connect link was started in another browser, or is not one we issued: "
    "finish Connect in the browser that opened the link, or start again."
)


@dataclass(frozen=True, slots=True)
class ConnectState:
    """A verified state; ``bound`` to a browser's cookie (``/connect/start``) or not (``connect-url``)."""

    user_id: int
    issued_at: int
    expires_at: int
    nonce: str
    bound: bool


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def state_keys(settings: Settings) -> tuple[bytes, ...]:
    """The signing keys, the first one signing."""
    secret = settings.connect_state_secret
    raw_keys = key_list(secret) if secret is not None else settings.management_tokens
    if not raw_keys:
        raise ConfigurationError(
            "neither CONNECT_STATE_SECRET nor SMARTCAR_MANAGEMENT_TOKEN is set: Connect state tokens need a key."
        )
    return tuple(hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest() for secret in raw_keys)


def _mac(key: bytes, signed: str, binding: str | None) -> str:
    if binding is not None:
        # The cookie itself never enters the state, only this digest of it, inside the MAC.
        signed = f"{signed}.{_b64(hashlib.sha256(_BINDING_LABEL + binding.encode()).digest())}"
    return _b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())


def issue_state(keys: tuple[bytes, ...], user_id: int, ttl_seconds: int, binding: str | None = None) -> str:
    """A state naming internal user ``user_id``; with ``binding`` (a cookie's value) it verifies only next to it."""
    issued = int(time.time())
    marker = "u" if binding is None else "b"
    signed = f"v2.{user_id}.{issued}.{issued + ttl_seconds}.{marker}.{_b64(secrets.token_bytes(16))}"
    return f"{signed}.{_mac(keys[0], signed, binding)}"


def verify_state(keys: tuple[bytes, ...], state: str | None, binding: str | None = None) -> ConnectState:
    """What ``state`` says once its MAC (with ``binding``, if bound) checks out; the caller spends it."""
    if not state:
        raise InvalidConnectState("The state parameter is missing: start again from a Connect link issued by us.")
    if state.startswith("v1."):
        raise InvalidConnectState(
            "This Connect link was made by an earlier version of this service and is no longer accepted: "
            "ask for a new one."
        )
    if (match := _STATE.fullmatch(state)) is None:
        raise InvalidConnectState(_NOT_OURS)
    bound = match.group(4) == "b"
    signed, _, mac = state.rpartition(".")
    # A bound state checked without its cookie fails here too: its MAC covers the cookie.
    if not any(hmac.compare_digest(_mac(key, signed, binding if bound else None), mac) for key in keys):
        raise InvalidConnectState(_OTHER_BROWSER, "browser_mismatch") if bound else InvalidConnectState(_NOT_OURS)
    expires_at = int(match.group(3))
    if expires_at <= time.time():
        raise InvalidConnectState(
            "The Connect link has expired: ask for a new one and go through Connect again.", "expired_state"
        )
    return ConnectState(int(match.group(1)), int(match.group(2)), expires_at, match.group(5), bound)


def connect_link(
    settings: Settings, user_id: int, mode: str | None = None, binding: str | None = None
) -> tuple[str, str | None]:
    """The Connect URL for internal user ``user_id``, its state bound to ``binding`` if given, and a
    note for the operator; :class:`ConfigurationError` names whatever setting is missing, in one line."""
    application_id = settings.smartcar_application_id or settings.smartcar_client_id
    redirect_uri = settings.connect_redirect_uri
    missing = []
    if application_id is None:
        missing.append("SMARTCAR_APPLICATION_ID (the Application ID from the Smartcar Dashboard)")
    if redirect_uri is None:
        missing.append("CONNECT_REDIRECT_URI (this service's /connect/callback URL, registered in the Dashboard)")
    if application_id is None or redirect_uri is None:
        raise ConfigurationError(f"cannot build a Connect URL: set {' and '.join(missing)}.")
    if not redirect_uri.startswith(("https://", "http://")):
        raise ConfigurationError("CONNECT_REDIRECT_URI must be an absolute http(s) URL ending in /connect/callback.")
    scope = " ".join(settings.connect_scope.split())
    if not scope:
        raise ConfigurationError("CONNECT_SCOPE is empty: list the permissions to ask for, e.g. read_vehicle_info.")
    note = None
    if settings.smartcar_application_id is None:
        note = (
            "SMARTCAR_APPLICATION_ID is not set, so the URL names SMARTCAR_CLIENT_ID instead; Connect expects the "
            "Application ID (a UUID from the Dashboard), which differs from an API-credentials client id."
        )
    ttl = settings.connect_state_ttl_seconds
    params = {
        "response_type": "code",
        "client_id": application_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": issue_state(state_keys(settings), user_id, ttl, binding),
    }
    if mode := mode or settings.connect_mode:
        params["mode"] = mode
    # quote, not quote_plus: the scope's spaces become %20, which every OAuth server reads alike.
    return f"{CONNECT_URL}?{urlencode(params, quote_via=quote)}", note


def _error(status: int, code: str, message: str, retry_after: float | None = None) -> Response:
    """Every refusal of the Connect routes; a 503 says when to retry (Smartcar's own wait for a 429)."""
    headers = dict(_NO_STORE)
    if status == 503:
        headers["Retry-After"] = str(5 if retry_after is None else max(1, math.ceil(retry_after)))
    return error_response(status, code, message, headers=headers)


def _plain(value: str | None) -> str:
    """Connect's text as one short printable line (it is user-facing, but not ours to trust)."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in value or "").split())[:200]


class ConnectEndpoints:
    """The Connect routes of one web process; ``redis`` is the web's client (spent states, token)."""

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
        # Nothing connects before the first callback: the web starts without Smartcar or a database.
        self._http = LeanHttp(max_connections=8)
        credentials = settings.smartcar_client_id is not None and settings.smartcar_client_secret is not None
        self._smartcar = smartcar_client(settings, redis, self._http, attempts=1) if credentials else None
        self._store = UserStore(settings.database_url)  # connects on the first callback, in a worker thread
        self.routes = [Route("/connect/callback", self.callback, methods=["GET"])]
        if settings.connect_start_enabled:
            self.routes.append(Route("/connect/start", self.start, methods=["GET"]))
            # Fail at startup, not on the first user, when /connect/start cannot build a URL.
            if note := connect_link(settings, 1)[1]:
                log.warning("connect start", note=note)
            log.warning("connect start signs a state for any user id: only an authenticating proxy may reach it")

    async def aclose(self) -> None:
        await self._http.aclose()
        await run_in_threadpool(self._store.dispose)

    async def callback(self, request: Request) -> Response:
        query = request.query_params
        if "error" in query:  # Connect's own failure, shown plainly
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
        try:
            state = verify_state(self._keys, query.get("state"), request.cookies.get(self._cookie_name))
        except InvalidConnectState as exc:
            return _error(400, exc.code, exc.message)
        smartcar_user_id = (query.get("user_id") or query.get("userId") or "").strip()
        if not smartcar_user_id:
            return _error(400, "missing_user_id", "The redirect carries no user_id: go through Connect again.")
        if _SMARTCAR_ID.fullmatch(smartcar_user_id) is None:
            return _error(400, "invalid_user_id", "The user_id parameter is not a Smartcar user id.")
        if self._smartcar is None:
            log.error("connect callback without client credentials", user_id=state.user_id)
            return _error(503, "unavailable", _NO_CREDENTIALS)
        # Logs correlate a Smartcar user id by this digest, never recording the id itself.
        user_id, digest = state.user_id, hashlib.sha256(smartcar_user_id.encode()).hexdigest()[:12]
        key, claim = CONNECT_STATE_PREFIX + state.nonce, secrets.token_hex(8)
        try:
            # Spent until the state would expire anyway; given back below when nothing happened.
            if not await self._redis.set(key, claim, nx=True, ex=max(1, state.expires_at - int(time.time()))):
                return _error(
                    400, "state_used", "This Connect link was already used: ask for a new one to connect again."
                )
            async with asyncio.timeout(_VERIFY_SECONDS):
                await confirm_connection(self._smartcar, smartcar_user_id, state.issued_at)
            stored = await run_in_threadpool(self._store.link, user_id, smartcar_user_id)
        except InvalidConnectState as exc:  # confirm_connection's unverified_user or cannot_verify
            log.warning("connect link refused", user_id=user_id, smartcar_user=digest, reason=exc.code)
            return _error(403 if exc.code == "unverified_user" else 409, exc.code, exc.message)
        except LinkConflict:
            # One body for both conflicts: which side is linked, and to what, is nobody's business here.
            log.warning("connect link refused", user_id=user_id, smartcar_user=digest, reason="link_conflict")
            return _error(409, "link_conflict", _CONFLICT)
        except RecordNotFound:
            log.warning("connect link refused", user_id=user_id, reason="user_not_found")
            return _error(404, "user_not_found", "The user this Connect link was made for no longer exists.")
        except (IngestError, RedisError, OSError, TimeoutError) as exc:
            # Smartcar's, the database's, Redis's or our credentials' trouble, never the redirect's.
            reason = exc.message if isinstance(exc, IngestError) else type(exc).__name__
            log.error("connect link failed", user_id=user_id, error=reason)
            try:
                await self._release(keys=[key], args=[claim])
            except (RedisError, OSError, TimeoutError) as lost:
                # The state stays spent: the user has to ask for a new link, which is safe.
                log.warning("connect state could not be given back", error=type(lost).__name__)
            retry_after = exc.retry_after if isinstance(exc, SmartcarRateLimited) else None
            return _error(503, "unavailable", "Linking is not possible right now; retry shortly.", retry_after)
        if stored:
            log.info("connect link stored", user_id=user_id, smartcar_user=digest)
        body = {
            "status": "linked" if stored else "already_linked",
            "userId": user_id,
            "smartcarUserId": smartcar_user_id,
        }
        response = JSONResponse(body, headers=_NO_STORE)
        if state.bound:
            response.delete_cookie(self._cookie_name, httponly=True, samesite="lax", **self._cookie)
        return response

    async def start(self, request: Request) -> Response:
        raw = request.query_params.get("user", "")
        # Leading zeros are read past; the length is checked before int(), which refuses text of
        # more than 4,300 digits with an error of its own.
        digits = raw.lstrip("0") if raw.isascii() and raw.isdigit() else ""
        if not 1 <= len(digits) <= 18:
            return _error(400, "invalid_user", "The user parameter must be an internal user id (a positive integer).")
        binding = secrets.token_urlsafe(32)
        url, _ = connect_link(self._settings, int(digits), binding=binding)
        log.info("connect start", user_id=int(digits))
        response = RedirectResponse(url, status_code=302, headers=_NO_STORE)
        ttl = self._settings.connect_state_ttl_seconds
        response.set_cookie(self._cookie_name, binding, max_age=ttl, httponly=True, samesite="lax", **self._cookie)
        return response
