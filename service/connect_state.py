"""Connect's signed, single-use ``state`` tokens, the Connect URL that carries one, and the check
with Smartcar that a redirect's ``user_id`` really just went through Connect (its paging of
``GET /v3/connections`` is also ``backfill``'s). The state's format, its keys and the checks the
callback makes: docs/security.md, "Connect capture"."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from core.config import Settings, key_list
from core.errors import ConfigurationError, InvalidConnectState
from core.smartcar.client import SmartcarClient

CONNECT_URL = "https://connect.smartcar.com/oauth/authorize"
_KEY_LABEL = b"smartcar-ingest connect state v1"
_BINDING_LABEL = b"smartcar-ingest connect binding\x00"
# user id (at most 18 digits: a BIGINT), issued and expiry (epoch seconds), binding, 16-byte nonce, 32-byte MAC.
_STATE = re.compile(
    r"v2\.([1-9][0-9]{0,17})\.([0-9]{1,12})\.([0-9]{1,12})\.([bu])\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})"
)
MAX_STATE_LENGTH = 160
#: How far Smartcar's clock may run behind ours when comparing a connection's creation time.
CLOCK_SKEW_SECONDS = 60
#: Pages of one user's connections read at most (a hundred each): a user has a handful.
MAX_VERIFY_PAGES = 5
#: Smartcar's largest page of connections: fewer calls against the application's rate limit.
PAGE_SIZE = 100
# Epoch seconds reach 1e11 in the year 5138; epoch milliseconds passed it in 1973.
_EPOCH_MS_FROM = 100_000_000_000
_CREATED_AT_FIELDS = (("attributes", "createdAt"), ("attributes", "connectedAt"), ("createdAt",), ("connectedAt",))

_NOT_OURS = "The state parameter is not one we issued: start again from a fresh Connect link."
_OTHER_BROWSER = (
    "This Connect link was started in another browser, or is not one we issued: "
    "finish Connect in the browser that opened the link, or start again."
)


@dataclass(frozen=True, slots=True)
class ConnectState:
    """What a verified state says; ``bound``: to a browser's cookie (``/connect/start``) or not (``connect-url``)."""

    user_id: int
    issued_at: int
    expires_at: int
    nonce: str
    bound: bool


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def state_keys(settings: Settings) -> tuple[bytes, ...]:
    """The signing keys, first one signing; :class:`ConfigurationError` when there is nothing to derive them from."""
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


def issue_state(
    keys: tuple[bytes, ...], user_id: int, ttl_seconds: int, binding: str | None = None, now: float | None = None
) -> str:
    """A state naming internal user ``user_id`` (at least 1) for ``ttl_seconds``; with ``binding`` (a
    browser's cookie value) it verifies only next to that value."""
    issued = int(time.time() if now is None else now)
    marker = "u" if binding is None else "b"
    signed = f"v2.{user_id}.{issued}.{issued + ttl_seconds}.{marker}.{_b64(secrets.token_bytes(16))}"
    return f"{signed}.{_mac(keys[0], signed, binding)}"


def verify_state(
    keys: tuple[bytes, ...], state: str | None, binding: str | None = None, now: float | None = None
) -> ConnectState:
    """What ``state`` says once its MAC (with ``binding``, if bound) checks out; whether it was spent
    is the caller's business. :class:`InvalidConnectState` when missing, malformed, forged, of
    version 1, bound to another binding, or expired."""
    if not state:
        raise InvalidConnectState("The state parameter is missing: start again from a Connect link issued by us.")
    if state.startswith("v1."):
        raise InvalidConnectState(
            "This Connect link was made by an earlier version of this service and is no longer accepted: "
            "ask for a new one."
        )
    match = _STATE.fullmatch(state) if len(state) <= MAX_STATE_LENGTH else None
    if match is None:
        raise InvalidConnectState(_NOT_OURS)
    bound = match.group(4) == "b"
    if bound and not binding:
        raise InvalidConnectState(_OTHER_BROWSER, "browser_mismatch")
    signed, _, mac = state.rpartition(".")
    expected = binding if bound else None
    if not any(hmac.compare_digest(_mac(key, signed, expected).encode(), mac.encode()) for key in keys):
        raise InvalidConnectState(_OTHER_BROWSER, "browser_mismatch") if bound else InvalidConnectState(_NOT_OURS)
    expires_at = int(match.group(3))
    if expires_at <= (time.time() if now is None else now):
        raise InvalidConnectState(
            "The Connect link has expired: ask for a new one and go through Connect again.", "expired_state"
        )
    return ConnectState(int(match.group(1)), int(match.group(2)), expires_at, match.group(5), bound)


@dataclass(frozen=True, slots=True)
class ConnectLink:
    """A Connect URL, when its state expires (epoch seconds) and an optional note for the operator."""

    url: str
    expires_at: int
    note: str | None = None


def connect_link(
    settings: Settings, user_id: int, mode: str | None = None, now: float | None = None, binding: str | None = None
) -> ConnectLink:
    """The Connect URL for internal user ``user_id`` (at least 1), its state bound to ``binding`` if
    given. Needs ``SMARTCAR_APPLICATION_ID`` (``SMARTCAR_CLIENT_ID`` stands in, with a note) and
    ``CONNECT_REDIRECT_URI``; :class:`ConfigurationError` names whatever is missing, in one line."""
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
    now = time.time() if now is None else now
    ttl = settings.connect_state_ttl_seconds
    params = {
        "response_type": "code",
        "client_id": application_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": issue_state(state_keys(settings), user_id, ttl, binding, now),
    }
    if mode := mode or settings.connect_mode:
        params["mode"] = mode
    # quote, not quote_plus: the scope's spaces become %20, which every OAuth server reads alike.
    return ConnectLink(f"{CONNECT_URL}?{urlencode(params, quote_via=quote)}", int(now) + ttl, note)


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
    """When a ``/connections`` item was made (epoch seconds), or ``None`` when it does not say.
    Smartcar documents no such field: the names and forms read are in docs/security.md, "Connect
    capture"; an ISO-8601 time without an offset is read as UTC."""
    for path in _CREATED_AT_FIELDS:
        value = _dig(item, *path)
        if isinstance(value, str):
            text = value.strip()
            if text.isascii() and text.isdigit():
                if len(text) > 20:  # no time; int() would refuse past 4,300 digits
                    continue
                value = int(text)
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
    """Return when Smartcar lists a connection of ``smartcar_user_id`` made since ``issued_at``
    (less :data:`CLOCK_SKEW_SECONDS`); items of other users never count. :class:`InvalidConnectState`
    coded ``unverified_user`` when none qualifies, coded ``cannot_verify`` when some carry no creation time (fail closed)."""
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
