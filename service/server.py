"""How ``smartcar-ingest web`` serves: uvicorn with bounds on what one client may hold, and the
admin server beside it.

The public port is reached by anyone who can reach the load balancer, so every connection is
bounded before the application sees a byte of it:

* **Request head size** (``MAX_HEADER_BYTES``). The HTTP implementation is pinned to h11, which
  refuses a head (request line and headers) that grows past that before it is complete with a 400
  and closes the connection; uvicorn's default when httptools is installed would keep appending
  headers without any limit. A larger head that arrives complete in one read (at most one socket
  read, 256 KiB) is answered 431 by :class:`HeadLimit` before the app sees it.
* **Head deadline** (``HEADER_TIMEOUT_SECONDS``). A connection must complete its request head
  within this long of connecting (or, on a kept-alive connection, of the first byte of its next
  request), or it is closed: a client that connects and sends nothing, or sends its head byte by
  byte, no longer holds a connection for ever. uvicorn has no such deadline of its own:
  :class:`GuardedH11Protocol` adds it.
* **Idle keep-alive** (``web --keep-alive-timeout``): a kept-alive connection with no new request
  is closed.
* **Open connections** (``web --max-connections``): past the cap, a new connection is answered
  503 and closed at once, and while the cap is reached uvicorn answers requests 503 (Smartcar
  retries a 503). Memory held by clients is then at most the cap times ``MAX_HEADER_BYTES`` plus
  a few kilobytes of bookkeeping per connection.

The body is the application's business: ``MAX_BODY_BYTES`` and ``BODY_TIMEOUT_SECONDS``.

``/readyz`` and ``/metrics`` are served by a second server on ``ADMIN_PORT``/``ADMIN_HOST``
(:mod:`service.admin`), with the same limits. With one process it runs on the public server's event
loop, so a readiness answer also proves that loop is turning. Under ``web --workers N`` the admin
server runs once, in the parent process (in a thread of its own), while the N children serve the
public port: one admin port means one scrape target whose ``/metrics`` sums every child through
``PROMETHEUS_MULTIPROC_DIR``, and ``/readyz`` also reports a child that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

from core.config import Settings
from core.errors import ConfigurationError
from core.logs import get_logger

log = get_logger("smartcar_ingest.server")

# Only probes and scrapes reach the admin port.
_ADMIN_MAX_CONNECTIONS = 64
_ADMIN_KEEP_ALIVE_SECONDS = 5
_DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 19\r\nretry-after: 1\r\nconnection: close\r\n\r\nService Unavailable"
)


@dataclass(frozen=True)
class ServeOptions:
    """The ``web`` command's arguments."""

    host: str
    port: int
    workers: int
    max_connections: int
    keep_alive_seconds: int


class HeadLimit:
    """Answers 431 (and closes) for a request whose line and headers exceed ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Method, target, version and the ": " and CRLF of each header line.
            size = len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"]) + 12
            size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 431,
                        "headers": [(b"content-length", b"0"), (b"connection", b"close")],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)


class WebConfig(uvicorn.Config):
    """uvicorn's configuration plus the head limits, which travel with it to ``--workers`` children."""

    def __init__(self, app: Any, *, header_timeout_seconds: float, max_header_bytes: int, **kwargs: Any) -> None:
        super().__init__(app, h11_max_incomplete_event_size=max_header_bytes, **kwargs)
        self.header_timeout_seconds = header_timeout_seconds
        self.max_header_bytes = max_header_bytes

    def load(self) -> None:
        super().load()
        self.loaded_app = HeadLimit(self.loaded_app, self.max_header_bytes)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on every request head and a hard cap on connections.

    The deadline runs whenever the connection waits on the client outside a request: from
    connecting until the first head is complete, and after a response from the first byte of the
    next request (uvicorn's keep-alive timer covers the silence before that byte). While the app
    handles a request, the app bounds the body itself.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timeout: float = getattr(config, "header_timeout_seconds", _DEFAULT_HEADER_TIMEOUT_SECONDS)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.config.limit_concurrency
        if limit is not None and len(self.connections) > limit:
            transport.write(_REFUSED)
            transport.close()
            return
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_deadline()
        super().connection_lost(exc)

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


class _AdminServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the public server (or supervisor) beside it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def public_config(app: Starlette | str, settings: Settings, options: ServeOptions) -> WebConfig:
    """The public server: ``app`` is the app itself, or ``module:factory`` for ``--workers`` children."""
    return WebConfig(
        app,
        header_timeout_seconds=settings.header_timeout_seconds,
        max_header_bytes=settings.max_header_bytes,
        factory=isinstance(app, str),
        host=options.host,
        port=options.port,
        workers=options.workers,
        http=GuardedH11Protocol,
        ws="none",
        lifespan="on",
        limit_concurrency=options.max_connections,
        timeout_keep_alive=options.keep_alive_seconds,
        log_config=None,
        access_log=False,
        server_header=False,
    )


def admin_config(app: Starlette, settings: Settings) -> WebConfig:
    """The admin server on ``ADMIN_HOST``:``ADMIN_PORT``, bounded like the public one."""
    return WebConfig(
        app,
        header_timeout_seconds=settings.header_timeout_seconds,
        max_header_bytes=settings.max_header_bytes,
        host=settings.admin_host,
        port=settings.admin_port,
        http=GuardedH11Protocol,
        ws="none",
        lifespan="on",
        limit_concurrency=_ADMIN_MAX_CONNECTIONS,
        timeout_keep_alive=_ADMIN_KEEP_ALIVE_SECONDS,
        proxy_headers=False,
        log_config=None,
        access_log=False,
        server_header=False,
    )


def bind_admin_socket(settings: Settings, options: ServeOptions) -> socket.socket:
    """Bind ``ADMIN_HOST``:``ADMIN_PORT`` before anything starts, so a clash stops ``web`` with one line."""
    if settings.admin_port == options.port:
        raise ConfigurationError(
            f"ADMIN_PORT {settings.admin_port} is also the public port: /readyz and /metrics must stay off it."
        )
    family = socket.AF_INET6 if ":" in settings.admin_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.admin_host, settings.admin_port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"ADMIN_PORT {settings.admin_port} on ADMIN_HOST {settings.admin_host} cannot be bound "
            f"({exc.strerror}): choose a free port, or 0 to turn the admin endpoints off."
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    log.info("admin endpoints served", host=settings.admin_host, port=settings.admin_port, paths="/readyz /metrics")
    return sock


def serve(settings: Settings, options: ServeOptions) -> None:
    """Serve the public app (and the admin app unless ``ADMIN_PORT`` is 0) until told to stop."""
    admin_socket = bind_admin_socket(settings, options) if settings.admin_port else None
    try:
        if options.workers > 1:
            _serve_processes(settings, options, admin_socket)
        else:
            _serve_one(settings, options, admin_socket)
    finally:
        if admin_socket is not None:
            admin_socket.close()


def _serve_one(settings: Settings, options: ServeOptions, admin_socket: socket.socket | None) -> None:
    from service.admin import create_admin_app
    from service.app import create_app

    config = public_config(create_app(settings), settings, options)
    public = uvicorn.Server(config)

    def web_status() -> str | None:
        if public.should_exit:
            return "shutting down"
        return None if public.started else "starting"

    async def run() -> None:
        admin, admin_task = None, None
        if admin_socket is not None:
            admin = _AdminServer(admin_config(create_admin_app(settings, web_status), settings))
            admin_task = asyncio.create_task(admin.serve(sockets=[admin_socket]))
        try:
            await public.serve()
        finally:
            if admin is not None and admin_task is not None:
                admin.should_exit = True
                await admin_task

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(run())
    if not public.started:
        sys.exit(STARTUP_FAILURE)


def _serve_processes(settings: Settings, options: ServeOptions, admin_socket: socket.socket | None) -> None:
    from service.admin import create_admin_app

    config = public_config("service.app:create_app", settings, options)
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])

    def web_status() -> str | None:
        if supervisor.should_exit.is_set():
            return "shutting down"
        down = sum(1 for child in supervisor.processes if not child.process.is_alive())
        if len(supervisor.processes) < options.workers:
            return "starting"
        return f"{down} of {options.workers} processes are down" if down else None

    admin = None
    thread = None
    if admin_socket is not None:
        admin = _AdminServer(admin_config(create_admin_app(settings, web_status), settings))
        thread = threading.Thread(target=admin.run, kwargs={"sockets": [admin_socket]}, name="admin", daemon=True)
        thread.start()
    try:
        supervisor.run()
    finally:
        if admin is not None and thread is not None:
            admin.should_exit = True
            thread.join(timeout=10)
