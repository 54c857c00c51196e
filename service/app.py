"""The Starlette application: ``create_app(settings=None)``, served with ``uvicorn --factory``.

Nothing connects at import time. The lifespan checks Redis's memory policy, runs the spool's drainer
and closes the process's Redis client on shutdown.

This is the public app: the webhook, the Connect routes and ``/healthz``. ``/readyz`` and
``/metrics`` are served by :mod:`service.admin` on ``ADMIN_PORT`` and answer 404 here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from core.config import Settings, load_settings
from core.logs import configure_logging
from core.redis.clients import web_redis
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions
from core.redis.memory import check_memory_async
from service.connect import ConnectEndpoints
from service.responses import http_exception, unexpected_exception
from service.spool import Spool, drain_forever
from service.webhooks import WebhookEndpoint, redis_deadline_seconds

WEBHOOK_PATH = "/webhooks/smartcar"


class IngestApp(Starlette):
    """Starlette, with ``POST /webhooks/smartcar`` handed straight to its endpoint: Starlette's
    middlewares and router cost a delivery 6-7 % more CPU (docs/performance.md). Everything else,
    the webhook under a ``root_path`` included, goes through Starlette, where the endpoint is routed
    too; it answers its own errors as Starlette's handler would and reads nothing Starlette adds."""

    def __init__(self, webhook: WebhookEndpoint, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._webhook = webhook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            await self._webhook(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


async def healthz(request: Request) -> Response:
    """200 while the process can answer at all."""
    return JSONResponse({"status": "ok"})


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the web application. Raises ``ConfigurationError`` without a management token."""
    if settings is None:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
    settings.require_management_token()
    deadline = redis_deadline_seconds(settings)
    redis = web_redis(settings)
    inbox = Inbox(
        redis,
        JobOptions.from_settings(settings),
        parked_stream=settings.parked_stream,
        dedupe_ttl_seconds=settings.dedupe_ttl_seconds,
        parked_retention_seconds=settings.parked_retention_seconds,
    )
    spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes) if settings.spool_dir else None
    endpoint = WebhookEndpoint(settings, inbox, spool)
    connect = ConnectEndpoints(settings, redis)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Objects built at startup never die: move them out of the collector's way, and collect
        # the young generation less often (each request allocates a few hundred short-lived
        # objects; the default threshold of 700 runs a collection every couple of requests).
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(50_000, 20, 20)
        drainer = None
        try:
            await check_memory_async(redis, deadline, settings.allow_evicting_redis)
            drainer = asyncio.create_task(drain_forever(spool, inbox)) if spool else None
            yield
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            if drainer is not None:
                drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drainer
            await redis.aclose()
            await redis.connection_pool.disconnect()
            await connect.aclose()

    app = IngestApp(
        endpoint,
        routes=[
            Route(WEBHOOK_PATH, endpoint, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            *connect.routes(),
        ],
        exception_handlers={HTTPException: http_exception, Exception: unexpected_exception},
        lifespan=lifespan,
    )
    # Starlette redirects a path with a trailing slash to its twin, building the Location from the
    # request's Host header: an open redirect. Every path here is exact; anything else is a 404.
    app.router.redirect_slashes = False
    return app
