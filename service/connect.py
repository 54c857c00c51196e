"""Connect: signed single-use states, ``/connect/callback``, ``/connect/start`` (off by default), ``connect-url``'s
URL and the ``/v3/connections`` paging ``backfill`` shares. The checks and why: docs/security.md, "Connect capture"."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import math
import posixpath
import re
import secrets
import time
from collections.abc import AsyncIterator
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
from core.smartcar.client import SmartcarClient, smartcar_client
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
#: How far Smartcar's clock may run behind ours when comparing a connection's creation time.
CLOCK_SKEW_SECONDS = 60
MAX_VERIFY_PAGES = 5  # of one user's connections: a user has a handful
PAGE_SIZE = 100  # Smartcar's largest page: fewer calls against the application's rate limit
# Epoch seconds reach 1e11 in the year 5138; epoch milliseconds passed it in 1973.
_EPOCH_MS_FROM = 100_000_000_000
_CREATED_AT_FIELDS = (("attributes", "createdAt"), ("attributes", "connectedAt"), ("createdAt",), ("connectedAt",))
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


def _dig(value: object, *keys: str) -> object:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


async def connection_pages(
    smartcar: SmartcarClient, smartcar_user_id: str | None, max_pages: int, page_size: int = PAGE_SIZE
) -> AsyncIterator[tuple[list[Any], int | None]]:
    """Each page of ``GET /v3/connections`` (the user's only, if given): its items and
    ``meta.totalCount``, until ``links.next`` is null, the total is reached or a page is short."""
    for page in range(1, max_pages + 1):
        body = await smartcar.list_connections(page, page_size, smartcar_user_id)
        data, links = body.get("data"), body.get("links")
        items = data if isinstance(data, list) else []
        total = _count(_dig(body, "meta", "totalCount"))
        yield items, total
        size = _count(_dig(body, "meta", "pageSize")) or page_size
        has_next = isinstance(links, dict) and "next" in links
        if not items or (has_next and not _dig(links, "next")) or (total is not None and page * size >= total):
            return
        if not has_next and total is None and len(items) < size:
            return


def connection_ids(item: object) -> tuple[str | None, str | None]:
    """The Smartcar user and vehicle ids of a ``/connections`` item, ``None`` where missing."""
    user, vehicle = _dig(item, "attributes", "user", "id"), _dig(item, "relationships", "vehicle", "data", "id")
    return (user if isinstance(user, str) and user else None, vehicle if isinstance(vehicle, str) and vehicle else None)


def connection_created_at(item: object) -> float | None:
    """When a ``/connections`` item was made (epoch seconds), or ``None`` when it does not say. The
    fields and forms read: docs/security.md, "Connect capture"; ISO-8601 without an offset is UTC."""
    for path in _CREATED_AT_FIELDS:
        value = _dig(item, *path)
        if isinstance(value, str):
            text = value.strip()
            if text.isascii() and text.isdigit():
                value = int(text) if len(text) <= 20 else None  # int() would refuse past 4,300 digits
            else:
                try:
                    parsed = dt.datetime.fromisoformat(text)
                except ValueError:
                    continue
                return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return value / 1000 if value >= _EPOCH_MS_FROM else float(value)
    return None


async def confirm_connection(smartcar: SmartcarClient, smartcar_user_id: str, issued_at: float) -> None:
    """Return when Smartcar lists a connection of ``smartcar_user_id`` made since ``issued_at`` (less the
    clock skew), else InvalidConnectState: ``unverified_user``, or ``cannot_verify`` if undated."""
    undated = False
    async for items, _ in connection_pages(smartcar, smartcar_user_id, MAX_VERIFY_PAGES):
        for item in items:
            if connection_ids(item)[0] != smartcar_user_id:
                continue
            created = connection_created_at(item)
            if created is None:
                undated = True
            elif created >= issued_at - CLOCK_SKEW_SECONDS:
                return
    if undated:
        raise InvalidConnectState(
            "Smartcar gives no creation time for this account's connections, so this redirect cannot be verified "
            "and nothing was linked; an operator can link it from Smartcar's connection list with "
            "`smartcar-ingest backfill`.",
            "cannot_verify",
        )
    raise InvalidConnectState(
        "Smartcar does not list a vehicle this account connected since the Connect link was issued; "
        "nothing was linked. Start again from a fresh Connect link.",
        "unverified_user",
    )


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
