"""The Smartcar v3 vehicle API client: the application token plus ``sc-user-id`` on every call.

How each answer maps onto the error tree and which are retried: docs/architecture.md, "The v3 client".
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import stamina
from redis.asyncio import Redis

from core import metrics
from core.config import Settings
from core.errors import (
    InvalidPayload,
    SmartcarRateLimited,
    SmartcarRejected,
    SmartcarUnauthorized,
    SmartcarUnavailable,
    TransientError,
)
from core.events.wire import VEHICLE_ID_PATTERN
from core.smartcar.http import HttpAnswer, SmartcarHttp, observed, retry_after_seconds
from core.smartcar.limiter import OverBudget, RequestLimiter
from core.smartcar.tokens import AppTokenProvider

#: The most one call takes, retries included (a longer Retry-After is left to the job-level retry).
BUDGET_SECONDS = 30.0
#: Signal pages followed at most, so a misbehaving ``links.next`` cannot loop forever.
MAX_SIGNAL_PAGES = 20
_VEHICLE_ID = re.compile(VEHICLE_ID_PATTERN)


def vehicle_path(vehicle_id: str) -> str:
    """``vehicles/{id}`` for an id that cannot move the path (docs/security.md); else :class:`InvalidPayload`."""
    if _VEHICLE_ID.fullmatch(vehicle_id) is None:
        raise InvalidPayload("The vehicle id is not a Smartcar vehicle id; no request was sent.")
    return f"vehicles/{vehicle_id}"


def _segment(value: str) -> str:
    """One path segment: ``/`` and ``%`` encoded, and dot segments (which resolvers collapse) refused."""
    if value in {"", ".", ".."}:
        raise InvalidPayload("A path segment of a Smartcar URL was empty or a dot segment; no request was sent.")
    return quote(value, safe="")


def parse_error(response: HttpAnswer) -> tuple[str | None, str | None, str | None]:
    """``(type, code, request_id)`` from either v3 error shape (``errors[]`` or the flat object)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
        body = body["errors"][0]
    item: dict[str, Any] = body if isinstance(body, dict) else {}
    meta = item.get("meta")
    debug = meta.get("debug") if isinstance(meta, dict) else None
    request_id = (
        (debug.get("requestId") if isinstance(debug, dict) else None)
        or item.get("requestId")
        or response.headers.get("sc-request-id")
    )

    def text(value: object) -> str | None:
        return str(value)[:80] if isinstance(value, str | int) and not isinstance(value, bool) else None

    return text(item.get("type")), text(item.get("code")), text(request_id)


class SmartcarClient:
    """Reads vehicles, signals and connections from the v3 API for one application."""

    def __init__(
        self,
        http: SmartcarHttp,
        api_url: str,
        tokens: AppTokenProvider,
        attempts: int = 4,
        gate: RequestLimiter | None = None,
    ) -> None:
        self._http = http
        self._base = api_url.rstrip("/") + "/"
        self._tokens = tokens
        self._attempts = attempts
        self._gate = gate

    async def get_vehicle(self, vehicle_id: str, user_id: str) -> dict[str, Any]:
        """``GET /vehicles/{id}``: the vehicle resource (``id``, ``attributes{make,model,year}``)."""
        return await self._get("vehicle", self._base + vehicle_path(vehicle_id), user_id, vehicle_id=vehicle_id)

    async def get_signals(self, vehicle_id: str, user_id: str) -> list[dict[str, Any]]:
        """``GET /vehicles/{id}/signals``: every signal resource, following ``links.next`` pages."""
        url = f"{self._base}{vehicle_path(vehicle_id)}/signals"
        params: dict[str, str] | None = {"page[size]": "100"}
        resources: list[dict[str, Any]] = []
        for _ in range(MAX_SIGNAL_PAGES):
            body = await self._get("signals", url, user_id, params, vehicle_id=vehicle_id)
            resources.extend(item for item in body.get("data") or () if isinstance(item, dict))
            links = body.get("links")
            next_link = links.get("next") if isinstance(links, dict) else None
            url = self._follow(next_link) if isinstance(next_link, str) and next_link else ""
            if not url:
                break
            params = None
        return resources

    async def get_signal(self, vehicle_id: str, user_id: str, code: str) -> dict[str, Any]:
        """``GET /vehicles/{id}/signals/{code}``: one signal; one the vehicle lacks: :class:`SmartcarRejected` (404)."""
        url = f"{self._base}{vehicle_path(vehicle_id)}/signals/{_segment(code)}"
        return await self._get("signal", url, user_id, vehicle_id=vehicle_id)

    def _follow(self, link: str) -> str:
        """The absolute URL of a ``links.next`` value (absolute, host-relative ``/v3/...`` or
        relative to the API root), or "" when it leaves the API's host: the token stays home."""
        base = urlsplit(self._base)
        if not link.startswith(("http://", "https://", base.path)):
            link = link.lstrip("/")  # relative to the API root
        url = urljoin(self._base, link)
        target = urlsplit(url)
        return url if (target.scheme, target.netloc) == (base.scheme, base.netloc) else ""

    async def list_connections(self, page_number: int, page_size: int, user_id: str | None) -> dict[str, Any]:
        """``GET /connections``, one page (``filter[userId]`` when a user is given)."""
        params = {"page[number]": str(page_number), "page[size]": str(page_size)}
        if user_id is not None:
            params["filter[userId]"] = user_id
        return await self._get("connections", self._base + "connections", user_id, params)

    def _retry_on(self, deadline: float, exc: Exception) -> bool | dt.timedelta:
        """stamina's hook; what is retried, when: docs/architecture.md, "The v3 client"."""
        if isinstance(exc, SmartcarRateLimited):
            if self._gate is not None:
                return False if isinstance(exc, OverBudget) else dt.timedelta(0)
            if exc.retry_after is not None:
                fits = time.monotonic() + exc.retry_after < deadline
                return dt.timedelta(seconds=exc.retry_after) if fits else False
        return isinstance(exc, TransientError)

    async def _get(
        self,
        endpoint: str,
        url: str,
        user_id: str | None,
        params: Mapping[str, str] | None = None,
        vehicle_id: str | None = None,
    ) -> dict[str, Any]:
        """One read with retries; ``endpoint`` is the template named in metrics (never the URL). The
        first try runs outside stamina, whose context replays its failure (why: docs/performance.md)."""
        deadline = time.monotonic() + BUDGET_SECONDS
        try:
            return await self._get_once(endpoint, url, user_id, params, vehicle_id)
        except Exception as exc:
            if self._retry_on(deadline, exc) is False:
                raise
            failure = exc
        async for attempt in stamina.retry_context(
            on=partial(self._retry_on, deadline),
            attempts=self._attempts,
            timeout=deadline - time.monotonic(),
            wait_initial=0.2,
            wait_max=5.0,
        ):
            with attempt:
                if attempt.num == 1:
                    raise failure
                metrics.SMARTCAR_RETRIES.labels(endpoint=endpoint).inc()
                return await self._get_once(endpoint, url, user_id, params, vehicle_id)
        raise AssertionError("unreachable: stamina either returns or raises")  # pragma: no cover

    async def _get_once(
        self, endpoint: str, url: str, user_id: str | None, params: Mapping[str, str] | None, vehicle_id: str | None
    ) -> dict[str, Any]:
        token = await self._tokens.get()
        for refreshed in (False, True):
            if self._gate is not None:
                await self._gate.admit(vehicle_id)
            headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
            if user_id is not None:
                headers["sc-user-id"] = user_id
            response = await observed(endpoint, self._http.request("GET", url, params=params, headers=headers))
            if response.status_code != 401 or refreshed:
                break
            # The token may have been revoked or rotated: one refresh, one retry.
            token = await self._tokens.get(stale=token)
        status = response.status_code
        if status < 300:
            try:
                body = response.json()
                return body if isinstance(body, dict) else {}  # every v3 resource is an object
            except ValueError:
                raise SmartcarUnavailable(f"Smartcar answered {status} with a body that is not JSON.") from None
        error_type, code, request_id = parse_error(response)
        label = f"{error_type or ('AUTHENTICATION' if status == 401 else 'UNKNOWN')}{':' + code if code else ''}"
        labelled = f"{label}, request {request_id or 'unknown'}"
        if status == 401:
            raise SmartcarUnauthorized(f"Smartcar refused a fresh application token ({labelled}).")
        if status == 429:
            retry_after = retry_after_seconds(response)
            if self._gate is not None:
                await self._gate.rate_limited(endpoint, vehicle_id, code, retry_after)
            raise SmartcarRateLimited(f"Smartcar rate limited the call ({label}).", retry_after)
        if status >= 500:
            raise SmartcarUnavailable(f"Smartcar answered {status} ({labelled}).")
        raise SmartcarRejected(f"Smartcar refused the call with {status} ({labelled}).", status, error_type, code)


def smartcar_client(settings: Settings, redis: Redis, http: SmartcarHttp, **options: Any) -> SmartcarClient:
    """The deployment's v3 client (``options``: :class:`SmartcarClient`'s), its token shared through ``redis``."""
    settings.require_client_credentials()
    assert settings.smartcar_client_id is not None
    assert settings.smartcar_client_secret is not None
    secret = settings.smartcar_client_secret.get_secret_value()
    tokens = AppTokenProvider(redis, http, settings.smartcar_token_url, settings.smartcar_client_id, secret)
    return SmartcarClient(http, settings.smartcar_api_url, tokens, **options)
