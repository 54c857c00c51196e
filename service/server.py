"""How ``smartcar-ingest web`` serves: uvicorn, every connection bounded before the app sees a byte of it
(docs/security.md, "Request heads, slow clients and idle connections"), and the admin server on ``ADMIN_PORT``."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections import deque
from typing import Any, cast

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from core.config import Settings
from core.errors import ConfigurationError
from core.logs import get_logger, quiet_uvicorn

log = get_logger("smartcar_ingest.server")

# Requests a connection may have waiting behind the one being answered (each parsed, held in memory).
_MAX_PIPELINED = 16
# Header lines in a request head (Apache's LimitRequestFields default): each costs ~140 bytes of
# Python objects however short, so the byte limit alone let 16 KB of "a:b" lines hold about 370 KB.
_MAX_HEADERS = 100

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 19\r\nretry-after: 1\r\nconnection: close\r\n\r\nService Unavailable"
)
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 31\r\nconnection: close\r\n\r\nRequest Header Fields Too Large"
)


class WebConfig(uvicorn.Config):
    """uvicorn's configuration for both servers; the head limits travel with it to ``--workers`` children."""

    def __init__(self, app: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(
            app,
            http=GuardedHttpToolsProtocol,
            ws="none",
            lifespan="on",
            log_config=None,
            access_log=False,
            server_header=False,
            **kwargs,
        )
        self.header_timeout_seconds = settings.header_timeout_seconds
        self.max_header_bytes = settings.max_header_bytes


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's private httptools protocol, bounded (h11 is dearer: docs/performance.md; uvicorn is
    pinned to this minor). Head bytes are counted per *region*: a request head, or after a chunk-size line."""

    def __init__(self, config: uvicorn.Config, **kwargs: Any) -> None:  # as uvicorn's Server calls it
        super().__init__(config, **kwargs)
        self._head_timeout = cast(WebConfig, config).header_timeout_seconds
        self._max_head = cast(WebConfig, config).max_header_bytes
        self._head_deadline: asyncio.TimerHandle | None = None
        self._region_open = False
        self._region_bytes = 0  # bytes of the open region counted so far (after each read)
        self._region_began_here = False  # the open region began in the current read
        self._read_used = 0  # bytes of the current read known to come before the open region
        # (bytes, header lines) of each queued request's head, in the order of uvicorn's pipeline.
        self._queued: deque[tuple[int, int]] = deque()
        self._queued_bytes = 0
        self._queued_headers = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.config.limit_concurrency
        if limit is not None and len(self.connections) > limit:
            transport.write(_REFUSED)
            transport.close()
            return
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        self._region_began_here = False
        self._read_used = 0
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._region_open:
            if self._region_began_here:
                self._region_bytes = len(data) - self._read_used
            else:
                self._region_bytes += len(data)
            if self._region_bytes + self._queued_bytes > self._max_head:
                self._refuse()
                return
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._open_region()
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) + self._queued_headers >= _MAX_HEADERS:
            raise self._refuse()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._region_open = False
        size = self._head_size()
        self._read_used += max(0, size - self._region_bytes)
        # While no response is under way nothing is queued, and only this head counts.
        if len(self.pipeline) >= _MAX_PIPELINED or self._queued_bytes + size > self._max_head:
            raise self._refuse()
        if not self._waiting_on_client():  # uvicorn queues this request behind the one being answered
            self._queued.appendleft((size, len(self.headers)))
            self._queued_bytes += size
            self._queued_headers += len(self.headers)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._region_open = False
        self._read_used += len(body)
        super().on_body(body)

    def on_chunk_header(self) -> None:
        # Called after the size line (at least a digit and CRLF); data or the trailers follow.
        self._open_region()
        self._read_used += 3

    def on_chunk_complete(self) -> None:
        # Called after the CRLF that ends the chunk's data, or the trailers.
        self._region_open = False
        self._read_used += 2

    def on_response_complete(self) -> None:
        super().on_response_complete()
        while len(self._queued) > len(self.pipeline):  # uvicorn started a queued request
            size, headers = self._queued.pop()
            self._queued_bytes -= size
            self._queued_headers -= headers
        if self._region_open:  # the next head began while this response was under way
            self._watch_head()

    def send_400_response(self, msg: str) -> None:
        if not self.transport.is_closing():  # else refused already, by _refuse
            super().send_400_response(msg)

    def _open_region(self) -> None:
        self._region_open = True
        self._region_began_here = True
        self._region_bytes = 0

    def _head_size(self) -> int:
        """The least the current request's line and headers can have taken on the wire."""
        # "METHOD target\r\n" (the version may be absent), "name:value\r\n" per header, "\r\n".
        size = len(self.parser.get_method()) + len(self.url) + 5
        for name, value in self.headers:
            size += len(name) + len(value) + 3
        return size

    def _refuse(self) -> ConnectionAbortedError:
        """Close the connection, answering 431 first unless a response is under way."""
        if self._waiting_on_client():
            self.transport.write(_HEAD_TOO_LARGE)
        self.transport.close()
        return ConnectionAbortedError()  # for a parser callback to raise: it stops the parser

    def _waiting_on_client(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _watch_head(self) -> None:
        if self.transport.is_closing() or not self._waiting_on_client():
            self._stop_head_deadline()
        elif self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._waiting_on_client() and not self.transport.is_closing():
            self.transport.close()


def bind_admin_socket(settings: Settings, public_port: int) -> socket.socket:
    """Bind ``ADMIN_HOST``:``ADMIN_PORT`` before anything starts, so a clash stops ``web`` with one line."""
    if settings.admin_port == public_port:
        raise ConfigurationError(
            f"ADMIN_PORT {settings.admin_port} is also the public port: /readyz and /metrics must stay off it."
        )
    family = socket.AF_INET6 if ":" in settings.admin_host else socket.AF_INET
    # SO_REUSEADDR set, as uvicorn's own sockets; "::" takes IPv4 too, as a plain socket does on Linux.
    dual = family == socket.AF_INET6 and socket.has_dualstack_ipv6()
    try:
        sock = socket.create_server((settings.admin_host, settings.admin_port), family=family, dualstack_ipv6=dual)
    except OSError as exc:
        raise ConfigurationError(
            f"ADMIN_PORT {settings.admin_port} on ADMIN_HOST {settings.admin_host} cannot be bound "
            f"({os.strerror(exc.errno or 0)}): choose a free port, or 0 to turn the admin endpoints off."
        ) from None
    sock.set_inheritable(True)
    log.info("admin endpoints served", host=settings.admin_host, port=settings.admin_port, paths="/readyz /metrics")
    return sock


def serve(settings: Settings, host: str, port: int, workers: int, max_connections: int, keep_alive: int) -> None:
    """Serve the public app (and the admin app, in a thread of its own, unless ``ADMIN_PORT`` is 0)
    until told to stop. ``--workers N`` children build the app from ``module:factory``."""
    from service.app import create_admin_app, create_app

    admin_socket = bind_admin_socket(settings, port) if settings.admin_port else None
    children = workers > 1
    config = WebConfig(
        "service.app:create_app" if children else create_app(settings),
        settings,
        factory=children,
        host=host,
        port=port,
        workers=workers,
        limit_concurrency=max_connections,
        timeout_keep_alive=keep_alive,
    )
    if children:
        config.log_level = "warning"  # in the children only (they set up logging again): the supervisor speaks
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    else:
        public = uvicorn.Server(config)

    def web_status() -> str | None:
        """None while the public server serves, else what is wrong (for ``/readyz``)."""
        if not children:
            return "shutting down" if public.should_exit else (None if public.started else "starting")
        if supervisor.should_exit.is_set():
            return "shutting down"
        down = sum(1 for child in supervisor.processes if not child.process.is_alive())
        if len(supervisor.processes) < workers:
            return "starting"
        return f"{down} of {workers} processes are down" if down else None

    if admin_socket is not None:
        admin = uvicorn.Server(
            WebConfig(
                create_admin_app(settings, web_status),
                settings,
                host=settings.admin_host,
                port=settings.admin_port,
                limit_concurrency=64,  # only probes and scrapes reach the admin port
                timeout_keep_alive=5,
                proxy_headers=False,
            )
        )

        def run_admin() -> None:
            quiet_uvicorn()  # in this thread only: its INFO lines would repeat the public server's
            admin.run([admin_socket])  # uvicorn leaves the signals to the main thread's server

        thread = threading.Thread(target=run_admin, name="admin", daemon=True)
        thread.start()
    try:
        if children:
            supervisor.run()
        else:
            public.run()
    finally:
        if admin_socket is not None:
            admin.should_exit = True
            thread.join(timeout=10)
            admin_socket.close()
    if not children and not public.started:
        sys.exit(STARTUP_FAILURE)
