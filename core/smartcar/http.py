"""The HTTP client that talks to Smartcar (the token endpoint and the vehicle API): keep-alive HTTP/1.1
connections on asyncio, answers read by httptools; through aiohttp when the environment names a proxy.

Why not aiohttp or httpx for every request: docs/performance.md, "The worker's own CPU". The
callers' unit tests still hand them an ``httpx.AsyncClient`` on a ``MockTransport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Mapping
from typing import Any, NamedTuple, TypeAlias
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import certifi
import httptools
import httpx
import pydantic_core
from yarl import URL

from core import metrics
from core.errors import SmartcarUnavailable

#: The most an answer's body may hold; a larger one closes its connection (a page of signals is well below).
MAX_ANSWER_BYTES = 32 << 20
#: The most an answer's status line and headers may take.
MAX_HEAD_BYTES = 64 << 10
#: A kept connection idle longer is closed, not reused (a middlebox may have dropped it silently).
KEEP_IDLE_SECONDS = 15.0
# Any other character in a request target is percent-encoded (a target never splits the request).
_TARGET_UNSAFE = re.compile(r"[^A-Za-z0-9/?&=%:@!$'()*+,;\[\]~._-]").search
_TARGET_SAFE = "/?&=%:@!$'()*+,;[]~-._"


class Answer(NamedTuple):  # one answer, read whole; header names in lower case
    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return pydantic_core.from_json(self.content)  # a ValueError when it is not JSON


class AnswerUnreadable(ConnectionError):
    """The connection ended without a whole answer, or carried one that is not HTTP/1.1 or too large."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; what the server says out of turn
    (an answer nobody asked for, a part of one) loses it the connection."""

    def __init__(self) -> None:
        self.transport: Any = None  # an asyncio.Transport in behaviour (uvloop's does not subclass it)
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[Answer] | None = None
        self.received = False  # any byte of the current answer
        self.reusable = False
        self.idle_since = 0.0
        self._clear()

    def _clear(self) -> None:
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._head_bytes = 0
        self._in_body = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.answer is None:
            self.fail(AnswerUnreadable("Data arrived with no request outstanding."))
            return
        if not self._in_body:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.fail(AnswerUnreadable("The answer's head is larger than allowed."))
                return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.fail(AnswerUnreadable(f"The answer is not one this client reads ({type(exc).__name__})."))

    def on_message_begin(self) -> None:
        if self.answer is None:  # a second answer in the same packet as the first
            self.fail(AnswerUnreadable("An answer arrived with no request outstanding."))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_body:  # a chunked body's trailers are not headers
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_body = True

    def on_body(self, chunk: bytes) -> None:
        self._body += chunk
        if len(self._body) > MAX_ANSWER_BYTES:
            raise ValueError("answer too large")  # raised out of feed_data as a parser error

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): the final one follows
            self._clear()
            return
        self._settle(Answer(status, self._headers, bytes(self._body)), self.parser.should_keep_alive())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._in_body and "content-length" not in self._headers and "transfer-encoding" not in self._headers:
            # An answer without a length ends with its connection.
            self._settle(Answer(self.parser.get_status_code(), self._headers, bytes(self._body)), False)
        self.fail(AnswerUnreadable("The server closed the connection before a whole answer."))

    def _settle(self, answer: Answer, reusable: bool) -> None:
        self.reusable = reusable
        self._clear()
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(answer)
        self.answer = None

    def fail(self, error: Exception) -> None:
        self.reusable = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(error)
        self.answer = None
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):  # its loop has closed
                self.transport.abort()


def _head(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
    """The request's head; a header with CR, LF or NUL is refused (it would split the request)."""
    if _TARGET_UNSAFE(target):
        target = quote(target, safe=_TARGET_SAFE)
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}", "user-agent: smartcar-ingest", "accept-encoding: identity"]
    lines += (f"{name}: {value}" for name, value in headers.items())
    if body is not None:
        lines += ["content-type: application/x-www-form-urlencoded", f"content-length: {len(body)}"]
    head = "\r\n".join(lines)
    breaks = len(lines) - 1
    if head.count("\r") != breaks or head.count("\n") != breaks or "\0" in head:
        raise ValueError("A request header holds CR, LF or NUL.")
    return head.encode() + b"\r\n\r\n"  # UTF-8, as aiohttp sent it


class LeanHttp:
    """Pooled keep-alive connections, at most ``max_connections`` requests at once; a request takes at
    most ``timeout_seconds`` in all, 5 s of them to connect. Opened lazily in the running loop (and
    again in another loop, after :meth:`aclose`)."""

    def __init__(
        self, max_connections: int = 100, timeout_seconds: float = 15.0, tls: ssl.SSLContext | None = None
    ) -> None:
        self._max_connections = max_connections
        self._timeout = timeout_seconds
        self._connect_timeout = min(5.0, timeout_seconds)
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._tls = tls  # by default certifi's authorities
        self._proxied: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0  # one more at each aclose: a connection of an earlier one is never kept

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
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._open(loop)
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
        generation = self._generation
        async with self._slots:
            deadline = loop.time() + self._timeout
            while True:
                connection, reused = await self._connection(origin, deadline)
                try:
                    answer = await self._exchange(connection, message, deadline)
                except AnswerUnreadable:
                    # A kept connection the server had just closed: a GET once more, on a new one.
                    if not reused or connection.received or method != "GET":
                        raise
                    continue
                idle = self._idle.setdefault(origin, [])
                if connection.reusable and generation == self._generation and len(idle) < self._max_connections:
                    connection.idle_since = loop.time()
                    idle.append(connection)
                else:
                    connection.transport.close()
                return answer

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ready for ``loop``: what was kept for another loop is dropped (and never kept again)."""
        self._generation += 1
        self._drop_idle()
        self._loop, self._proxied = loop, None
        self._slots = asyncio.Semaphore(self._max_connections)
        self._tls = self._tls or ssl.create_default_context(cafile=certifi.where())
        proxies = urllib.request.getproxies()  # as httpx reads them from the environment
        proxies.pop("no", None)  # NO_PROXY alone names no proxy
        if proxies:
            self._proxied = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ssl=self._tls),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=self._timeout, connect=self._connect_timeout),
                headers={"user-agent": "smartcar-ingest"},
                trust_env=True,
            )

    async def _connection(self, origin: tuple[str, str, int], deadline: float) -> tuple[_Connection, bool]:
        """An idle kept connection to ``origin`` (reused: True), else a new one."""
        loop = asyncio.get_running_loop()
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable and not connection.transport.is_closing():
                if loop.time() - connection.idle_since <= KEEP_IDLE_SECONDS:
                    return connection, True
                connection.transport.close()
        scheme, host, port = origin
        tls = self._tls if scheme == "https" else None
        async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout)):
            _, connection = await loop.create_connection(
                _Connection, host, port, ssl=tls, server_hostname=host if tls else None
            )
        return connection, False

    @staticmethod
    async def _exchange(connection: _Connection, message: bytes, deadline: float) -> Answer:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        connection.answer = answer
        connection.received = False
        timer = loop.call_at(deadline, connection.fail, TimeoutError("Smartcar did not answer in time."))
        try:
            connection.transport.write(message)
            return await answer
        except BaseException:  # failed, or cancelled even as the answer came: its state is unknown
            connection.fail(AnswerUnreadable("The request ended without its answer."))
            raise
        finally:
            timer.cancel()

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

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, {}
        for connection in (c for kept in idle.values() for c in kept):
            with contextlib.suppress(RuntimeError):  # its loop has closed
                connection.transport.close()

    async def aclose(self) -> None:
        """Close the kept connections; those of requests still under way are closed as they end."""
        self._generation += 1
        self._drop_idle()
        if self._proxied is not None:
            session, self._proxied = self._proxied, None
            await session.close()
        self._loop = None


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
