"""Smartcar Connect capture: signed, expiring ``state`` tokens and the Connect URL carrying one.

Phase 2 of the migration guide stores each user's Smartcar ``user_id``, which Connect appends to
its redirect. The redirect says nothing trustworthy about *which internal user* went through
Connect, so every URL this service hands out carries a ``state`` that names the internal user,
signed with HMAC-SHA256 and expiring after ``CONNECT_STATE_TTL_SECONDS``. The callback
(``service/connect.py``) believes nothing else.

A state is URL-safe text: ``v1.<user id>.<expiry, epoch seconds>.<nonce>.<mac>``, where ``mac`` is
the unpadded base64url HMAC-SHA256 of everything before it. The nonce makes every URL distinct.

Keys: every entry of ``CONNECT_STATE_SECRET`` (comma-separated during rotation), or when it is
unset every management token, each run through HMAC-SHA256 with a fixed label, so the signing key
is never the webhook key itself. The first key signs; every key verifies.

Errors: :class:`ConfigurationError` for missing settings, :class:`InvalidConnectState` and
:class:`ExpiredConnectState` for a state that does not verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from core.config import Settings
from core.errors import ConfigurationError, ExpiredConnectState, InvalidConnectState

CONNECT_URL = "https://connect.smartcar.com/oauth/authorize"
_KEY_LABEL = b"smartcar-ingest connect state v1"
_VERSION = "v1"
# user id (at most 18 digits: a BIGINT), expiry (epoch seconds), 8-byte nonce, 32-byte MAC.
_STATE = re.compile(r"v1\.([1-9][0-9]{0,17})\.([0-9]{1,12})\.([A-Za-z0-9_-]{11})\.([A-Za-z0-9_-]{43})")
MAX_STATE_LENGTH = 128


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _derive(secret: bytes) -> bytes:
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


def state_keys(settings: Settings) -> tuple[bytes, ...]:
    """The signing keys, first one signing; :class:`ConfigurationError` when there is nothing to derive them from."""
    if settings.connect_state_secret is not None:
        raw = settings.connect_state_secret.get_secret_value()
        raw_keys = tuple(part.strip().encode() for part in raw.split(",") if part.strip())
    else:
        raw_keys = settings.management_tokens
    if not raw_keys:
        raise ConfigurationError(
            "neither CONNECT_STATE_SECRET nor SMARTCAR_MANAGEMENT_TOKEN is set: Connect state tokens need a key."
        )
    return tuple(_derive(secret) for secret in raw_keys)


def _mac(key: bytes, signed: str) -> str:
    return _b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())


def issue_state(keys: tuple[bytes, ...], user_id: int, ttl_seconds: int, now: float | None = None) -> str:
    """A state naming internal user ``user_id``, valid for ``ttl_seconds`` from ``now``."""
    if user_id < 1:
        raise ConfigurationError(f"the internal user id must be at least 1, got {user_id}.")
    expires = int(time.time() if now is None else now) + ttl_seconds
    signed = f"{_VERSION}.{user_id}.{expires}.{_b64(secrets.token_bytes(8))}"
    return f"{signed}.{_mac(keys[0], signed)}"


def verify_state(keys: tuple[bytes, ...], state: str | None, now: float | None = None) -> int:
    """The internal user id that ``state`` names.

    :class:`InvalidConnectState` for a missing, malformed or forged state (the MAC is compared in
    constant time against every key); :class:`ExpiredConnectState` for a genuine one past its
    expiry. The MAC is checked first, so "expired" is only ever said of states this service made.
    """
    if not state:
        raise InvalidConnectState("The state parameter is missing: start again from a Connect link issued by us.")
    match = _STATE.fullmatch(state) if len(state) <= MAX_STATE_LENGTH else None
    if match is None:
        raise InvalidConnectState("The state parameter is not one we issued: start again from a fresh Connect link.")
    signed, _, mac = state.rpartition(".")
    if not any(hmac.compare_digest(_mac(key, signed).encode(), mac.encode()) for key in keys):
        raise InvalidConnectState("The state parameter is not one we issued: start again from a fresh Connect link.")
    if int(match.group(2)) <= (time.time() if now is None else now):
        raise ExpiredConnectState("The Connect link has expired: ask for a new one and go through Connect again.")
    return int(match.group(1))


@dataclass(frozen=True, slots=True)
class ConnectLink:
    """A Connect URL, when its state expires (epoch seconds) and an optional note for the operator."""

    url: str
    expires_at: int
    note: str | None = None


def connect_link(settings: Settings, user_id: int, mode: str | None = None, now: float | None = None) -> ConnectLink:
    """The Smartcar Connect URL for internal user ``user_id``.

    Needs ``SMARTCAR_APPLICATION_ID`` (``SMARTCAR_CLIENT_ID`` stands in, with a note) and
    ``CONNECT_REDIRECT_URI``; :class:`ConfigurationError` names whatever is missing, in one line.
    """
    application_id = settings.smartcar_application_id or settings.smartcar_client_id
    missing = []
    if application_id is None:
        missing.append("SMARTCAR_APPLICATION_ID (the Application ID from the Smartcar Dashboard)")
    if settings.connect_redirect_uri is None:
        missing.append("CONNECT_REDIRECT_URI (this service's /connect/callback URL, registered in the Dashboard)")
    if missing:
        raise ConfigurationError(f"cannot build a Connect URL: set {' and '.join(missing)}.")
    assert application_id is not None
    redirect_uri = settings.connect_redirect_uri
    assert redirect_uri is not None
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
    expires_at = int(time.time() if now is None else now) + settings.connect_state_ttl_seconds
    params = {
        "response_type": "code",
        "client_id": application_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": issue_state(state_keys(settings), user_id, settings.connect_state_ttl_seconds, now),
    }
    mode = mode or settings.connect_mode
    if mode:
        params["mode"] = mode
    # quote, not quote_plus: the scope's spaces become %20, which every OAuth server reads alike.
    return ConnectLink(f"{CONNECT_URL}?{urlencode(params, quote_via=quote)}", expires_at, note)
