"""The HTTP client that talks to Smartcar (the token endpoint and the vehicle API): aiohttp, directly.

Why not httpx, which the callers' unit tests still hand them on a ``MockTransport``: docs/performance.md.
"""

from __future__ import annotations

import math
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Mapping
from typing import Any, NamedTuple, TypeAlias

import aiohttp
import certifi
import httpx
import pydantic_core
from yarl import URL

from core import metrics
from core.errors import SmartcarUnavailable


class Answer(NamedTuple):  # one answer, read whole
    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return pydantic_core.from_json(self.content)  # a ValueError when it is not JSON


class LeanHttp:
    """One pooled keep-alive aiohttp session, opened on first use inside the running loop; a request takes
    at most ``timeout_seconds`` in all, 5 s of them to connect."""

    def __init__(self, max_connections: int = 100, timeout_seconds: float = 15.0) -> None:
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds, connect=min(5.0, timeout_seconds))
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One request, as ``httpx.AsyncClient.request`` makes it (``data``: a form; the URL as given)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, ssl=ssl.create_default_context(cafile=certifi.where())
                ),
                cookie_jar=aiohttp.DummyCookieJar(),  # Smartcar's API sets no cookie worth keeping
                timeout=self._timeout,
                headers={"user-agent": "smartcar-ingest"},
                # Proxies from the environment, as httpx reads them, per request only when one is set.
                trust_env=bool(urllib.request.getproxies()),
            )
        async with self._session.request(
            method, URL(url, encoded=True), params=params, data=data, headers=headers
        ) as response:
            return Answer(response.status, response.headers, await response.read())

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


#: What the callers are handed: a LeanHttp, or in their unit tests an httpx.AsyncClient on a MockTransport.
SmartcarHttp: TypeAlias = LeanHttp | httpx.AsyncClient
HttpAnswer: TypeAlias = Answer | httpx.Response


async def observed(endpoint: str, request: Awaitable[HttpAnswer]) -> HttpAnswer:
    """The answer to ``request``, counted and timed under ``endpoint``; not reached: :class:`SmartcarUnavailable`."""
    started = time.perf_counter()
    try:
        answer = await request
    except (httpx.HTTPError, aiohttp.ClientError, TimeoutError) as exc:  # httpx: the callers' test clients
        metrics.observe_smartcar_call(endpoint, "network_error", started)
        raise SmartcarUnavailable(
            f"Smartcar's {endpoint} endpoint could not be reached ({type(exc).__name__})."
        ) from None
    metrics.observe_smartcar_call(endpoint, str(answer.status_code), started)
    return answer


def retry_after_seconds(answer: HttpAnswer) -> float | None:
    """The ``Retry-After`` header in seconds, when present and finite (``inf``, ``nan``: absent)."""
    try:
        seconds = float(answer.headers["retry-after"])
    except (KeyError, ValueError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None
