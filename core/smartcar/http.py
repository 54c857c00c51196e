"""The HTTP client that talks to Smartcar (the token endpoint and the vehicle API): keep-alive HTTP/1.1
connections on asyncio, answers read by httptools; through aiohttp when the environment names a proxy.

Why not aiohttp or httpx for every request: docs/performance.md ("The Smartcar requests"). The
callers' unit tests still hand them an ``httpx.AsyncClient`` on a ``MockTransport``.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Mapping
from typing import Any, NamedTuple, TypeAlias
from urllib.parse import urlencode, urlsplit

import aiohttp
import certifi
import httptools
import httpx
import pydantic_core
from yarl import URL

from core import metrics
from core.errors import SmartcarUnavailable

#: The most an answer may hold; a larger one closes its connection (a v3 page of signals is well below).
MAX_ANSWER_BYTES = 32 << 20


class Answer(NamedTuple):  # one answer, read whole; header names in lower case
    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return pydantic_core.from_json(self.content)  # a ValueError when it is not JSON


class AnswerUnreadable(ConnectionError):
    """The server closed the connection before a whole answer, or sent one that is not HTTP/1.1."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: Any = None  # an asyncio.Transport in behaviour (uvloop's does not subclass it)
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[Answer] | None = None
        self.received = False  # any byte of the current answer
        self.reusable = False
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.answer is None:  # nothing asked: a server speaking out of turn loses the connection
            self.fail(AnswerUnreadable("Data arrived with no request outstanding."))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(AnswerUnreadable(f"The answer is not HTTP/1.1 ({type(exc).__name__})."))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > MAX_ANSWER_BYTES:
            raise ValueError("answer too large")  # raised out of feed_data as a parser error
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        answer = Answer(self.parser.get_status_code(), self._headers, b"".join(self._body))
        self.reusable = self.parser.should_keep_alive()
        self._headers, self._body, self._size = {}, [], 0
        if self.answer is None:  # an answer nobody asked for
            self.fail(AnswerUnreadable("An answer arrived with no request outstanding."))
        elif not self.answer.done():
            self.answer.set_result(answer)
        self.answer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.fail(AnswerUnreadable("The server closed the connection before answering."))

    def fail(self, error: Exception) -> None:
        self.reusable = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(error)
        self.answer = None
        if self.transport is not None:
            self.transport.abort()


def _head(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
    """The request's head; a name or value with CR, LF or NUL is refused (it would split the request)."""
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}", "user-agent: smartcar-ingest", "accept-encoding: identity"]
    lines += (f"{name}: {value}" for name, value in headers.items())
    if body is not None:
        lines += ["content-type: application/x-www-form-urlencoded", f"content-length: {len(body)}"]
    head = "\r\n".join(lines)
    breaks = len(lines) - 1
    if head.count("\r") != breaks or head.count("\n") != breaks or "\0" in head or " " in target:
        raise ValueError("A request's target or header holds a space, CR, LF or NUL.")
    return head.encode("latin-1") + b"\r\n\r\n"


class LeanHttp:
    """Pooled keep-alive connections, at most ``max_connections`` requests at once; a request takes at
    most ``timeout_seconds`` in all, 5 s of them to connect. Opened lazily inside the running loop."""

    def __init__(
        self, max_connections: int = 100, timeout_seconds: float = 15.0, tls: ssl.SSLContext | None = None
    ) -> None:
        self._max_connections = max_connections
        self._timeout = timeout_seconds
        self._connect_timeout = min(5.0, timeout_seconds)
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._tls = tls  # by default certifi's authorities
        self._proxied: aiohttp.ClientSession | None = None
        self._checked_proxies = False

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One request, as ``httpx.AsyncClient.request`` makes it (``data``: a form; the URL as given,
        already quoted). Connection failures raise ``OSError``s, the time limit ``TimeoutError``."""
        if not self._checked_proxies:
            self._open()
        if self._proxied is not None:
            return await self._through_proxy(method, url, params, data, headers)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("Only http and https URLs with a host are requested.")
        tls = parts.scheme == "https"
        origin = (parts.scheme, parts.hostname, parts.port or (443 if tls else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if params:
            target += ("&" if parts.query else "?") + urlencode(params)
        body = urlencode(data).encode() if data is not None else None
        host = parts.netloc.rpartition("@")[2]  # never the URL's credentials
        message = _head(method, target, host, headers or {}, body) + (body or b"")
        assert self._slots is not None
        async with self._slots:
            deadline = asyncio.get_running_loop().time() + self._timeout
            while True:
                connection, reused = await self._connection(origin, deadline)
                try:
                    return await self._exchange(origin, connection, message, deadline)
                except AnswerUnreadable:
                    # A kept connection the server had just closed: once more on a new one.
                    if not reused or connection.received:
                        raise

    def _open(self) -> None:
        self._checked_proxies = True
        self._slots = asyncio.Semaphore(self._max_connections)
        self._tls = self._tls or ssl.create_default_context(cafile=certifi.where())
        if urllib.request.getproxies():  # proxies as httpx reads them from the environment
            self._proxied = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ssl=self._tls),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=self._timeout, connect=self._connect_timeout),
                headers={"user-agent": "smartcar-ingest"},
                trust_env=True,
            )

    async def _connection(self, origin: tuple[str, str, int], deadline: float) -> tuple[_Connection, bool]:
        """An idle kept connection to ``origin`` (reused: True), else a new one."""
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable and connection.transport is not None and not connection.transport.is_closing():
                return connection, True
        loop = asyncio.get_running_loop()
        scheme, host, port = origin
        tls = self._tls if scheme == "https" else None
        async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout)):
            _, connection = await loop.create_connection(
                _Connection, host, port, ssl=tls, server_hostname=host if tls else None
            )
        return connection, False

    async def _exchange(
        self, origin: tuple[str, str, int], connection: _Connection, message: bytes, deadline: float
    ) -> Answer:
        loop = asyncio.get_running_loop()
        assert connection.transport is not None
        answer: asyncio.Future[Answer] = loop.create_future()
        connection.answer = answer
        connection.received = False
        timer = loop.call_at(deadline, connection.fail, TimeoutError("Smartcar did not answer in time."))
        try:
            connection.transport.write(message)
            result = await answer
        finally:
            timer.cancel()
            if not answer.done() or answer.cancelled():  # cancelled mid-request: the connection's state is unknown
                connection.fail(AnswerUnreadable("The request was cancelled."))
        if connection.reusable and len(idle := self._idle.setdefault(origin, [])) < self._max_connections:
            idle.append(connection)
        elif connection.transport is not None:
            connection.transport.close()
        return result

    async def _through_proxy(
        self,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        data: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
    ) -> Answer:
        assert self._proxied is not None
        async with self._proxied.request(
            method, URL(url, encoded=True), params=params, data=data, headers=headers
        ) as response:
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read())

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connection in (c for kept in idle.values() for c in kept):
            if connection.transport is not None:
                connection.transport.close()
        if self._proxied is not None:
            session, self._proxied = self._proxied, None
            await session.close()
        self._checked_proxies = False


#: What the callers are handed: a LeanHttp, or in their unit tests an httpx.AsyncClient on a MockTransport.
SmartcarHttp: TypeAlias = LeanHttp | httpx.AsyncClient
HttpAnswer: TypeAlias = Answer | httpx.Response


async def observed(endpoint: str, request: Awaitable[HttpAnswer]) -> HttpAnswer:
    """The answer to ``request``, counted and timed under ``endpoint``; not reached: :class:`SmartcarUnavailable`."""
    started = time.perf_counter()
    try:
        answer = await request
    except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:  # httpx: the callers' test clients
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
