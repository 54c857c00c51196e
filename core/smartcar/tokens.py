"""The application token: one client-credentials token shared by every worker process, sealed in Redis.

The token is never logged, put in a message or written anywhere but its Redis key, sealed.
Refreshing: docs/architecture.md, "The application token"; the seal: docs/security.md.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import secrets
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from rq.scripts import RELEASE_LOCK_SCRIPT

from core import metrics
from core.errors import SmartcarRateLimited, SmartcarUnavailable, TokenRequestFailed
from core.logs import get_logger
from core.redis.functions import RQ_SCRIPTS
from core.redis.keys import TOKEN_KEY, TOKEN_LOCK_KEY
from core.smartcar.http import SmartcarHttp, observed, retry_after_seconds

log = get_logger("smartcar_ingest.tokens")
#: A token is replaced this long before it expires; the refresh lock lasts at most this long.
REFRESH_MARGIN_SECONDS = 300.0
LOCK_SECONDS = 15.0
#: The longest a token is held, whatever lifetime the token endpoint claims.
MAX_LIFETIME_SECONDS = 86_400.0


@dataclass(frozen=True)
class AppToken:  # an access token and when it stops working (epoch seconds)
    access_token: str = field(repr=False)  # the secret stays out of tracebacks and debug output
    expires_at: float

    def usable(self) -> bool:
        return self.expires_at - REFRESH_MARGIN_SECONDS > time.time()


class TokenSeal:
    """Seals the cached token for Redis (docs/security.md); a value that does not open reads as no token."""

    _PREFIX = b"sealed1:"
    _LABEL = b"smartcar-ingest app-token seal v1:"

    def __init__(self, client_id: str, client_secret: str) -> None:
        key = hmac.new(client_secret.encode(), self._LABEL + client_id.encode(), hashlib.sha256).digest()
        self._aead = AESGCM(key)

    def seal(self, token: AppToken) -> bytes:
        nonce = secrets.token_bytes(12)
        plain = json.dumps({"access_token": token.access_token, "expires_at": token.expires_at})
        sealed = self._aead.encrypt(nonce, plain.encode(), TOKEN_KEY.encode())
        return self._PREFIX + base64.b64encode(nonce + sealed)

    def open(self, raw: bytes | str) -> AppToken | None:
        data = raw.encode() if isinstance(raw, str) else raw
        if not data.startswith(self._PREFIX):
            return None
        try:
            blob = base64.b64decode(data[len(self._PREFIX) :], validate=True)
            plain = self._aead.decrypt(blob[:12], blob[12:], TOKEN_KEY.encode())
            parsed = json.loads(plain)
            return AppToken(access_token=str(parsed["access_token"]), expires_at=float(parsed["expires_at"]))
        except (InvalidTag, ValueError, KeyError, TypeError):
            return None


class AppTokenProvider:
    """Hands out the shared application token, refreshing it ahead of expiry."""

    def __init__(self, redis: Redis, http: SmartcarHttp, token_url: str, client_id: str, client_secret: str) -> None:
        self._redis = redis
        self._http = http
        self._token_url = token_url
        self._form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
        self._local: AppToken | None = None
        # Coroutines of this process share one refresh instead of each taking a turn at the lock.
        self._refreshing: asyncio.Task[AppToken] | None = None
        self._release = RQ_SCRIPTS[RELEASE_LOCK_SCRIPT].bind(redis)  # compare-and-delete of the lock
        self._seal = TokenSeal(client_id, client_secret)

    async def get(self, stale: str | None = None) -> str:
        """A token valid for at least the refresh margin, and not ``stale`` (one that failed)."""
        if stale is None and self._local is not None and self._local.usable():
            return self._local.access_token
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh(stale))
        token = await asyncio.shield(self._refreshing)
        self._local = token
        return token.access_token

    async def _refresh(self, stale: str | None) -> AppToken:
        owner = secrets.token_hex(8)
        deadline = time.monotonic() + LOCK_SECONDS * 2
        while True:
            if (shared := await self._shared(stale)) is not None:
                return shared  # usable, and not the one that failed: someone else already replaced it
            if await self._redis.set(TOKEN_LOCK_KEY, owner, nx=True, px=int(LOCK_SECONDS * 1000)):
                try:
                    if (shared := await self._shared(stale)) is not None:
                        return shared
                    return await self._fetch()
                finally:
                    await self._release(keys=[TOKEN_LOCK_KEY], args=[owner])
            ttl = await self._redis.pttl(TOKEN_LOCK_KEY)
            if ttl == -1 or ttl > LOCK_SECONDS * 1000:
                # Every lock of ours expires within LOCK_SECONDS: this key was written by something
                # else, and waiting for it would stop every refresh for good.
                log.warning("the token lock is not one this service takes: refreshing without it")
                return await self._fetch()
            if time.monotonic() > deadline:
                raise SmartcarUnavailable("Timed out waiting for another process to refresh the application token.")
            await asyncio.sleep(0.05)

    async def _fetch(self) -> AppToken:
        """A new token from Smartcar, shared through Redis (a key of any type there is replaced)."""
        token = await self._request()
        ttl = max(1, int(token.expires_at - time.time()))
        await self._redis.set(TOKEN_KEY, self._seal.seal(token), ex=ttl)
        log.info("application token refreshed", expires_in=ttl)
        return token

    async def _shared(self, stale: str | None) -> AppToken | None:
        try:
            raw = await self._redis.get(TOKEN_KEY)
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            return None  # a key this service did not write: no token
        token = None if raw is None else self._seal.open(raw)
        return token if token is not None and token.access_token != stale and token.usable() else None

    async def _request(self) -> AppToken:
        metrics.TOKEN_REFRESHES.inc()
        answer = await observed(
            "token",
            self._http.request("POST", self._token_url, data=self._form, headers={"accept": "application/json"}),
        )
        status = answer.status_code
        if status == 429:
            raise SmartcarRateLimited("The token endpoint is rate limiting us.", retry_after_seconds(answer))
        if status >= 500:
            raise SmartcarUnavailable(f"The token endpoint answered {status}.")
        if status != 200:
            try:  # the RFC 6749 ``error`` code, if the body has one (never the description)
                error = answer.json().get("error")
            except (ValueError, AttributeError):
                error = None
            raise TokenRequestFailed(
                f"The token endpoint refused the client credentials ({status} "
                f"{error[:60] if isinstance(error, str) else 'no error code'}); "
                "check SMARTCAR_CLIENT_ID and SMARTCAR_CLIENT_SECRET."
            )
        try:
            data = answer.json()
            access_token = str(data["access_token"])
            expires_in = float(data.get("expires_in", 3600))
            # Positive and finite (inf or nan would break the cache's expiry); held a day at most.
            if not (math.isfinite(expires_in) and expires_in > 0):
                raise ValueError(expires_in)
        except (ValueError, KeyError, TypeError):
            raise SmartcarUnavailable("The token endpoint answered 200 without a usable token.") from None
        return AppToken(access_token=access_token, expires_at=time.time() + min(expires_in, MAX_LIFETIME_SECONDS))
