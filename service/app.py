"""The web's Starlette apps: the public one (the webhook, Connect, ``/healthz``; its lifespan checks
Redis's memory policy and runs the spool's drainer) and the admin one on ``ADMIN_PORT`` (``/readyz``,
``/metrics``: docs/security.md). Nothing connects at import time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from core.config import Settings, load_settings
from core.logs import configure_logging
from core.redis.clients import probe_redis, web_redis
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions
from core.redis.memory import check_memory
from core.redis.queue_metrics import QueueCollector, endpoint_registry
from service.connect import ConnectEndpoints
from service.responses import http_exception, unexpected_exception
from service.spool import Spool, drain_forever
from service.webhooks import WebhookEndpoint, redis_deadline_seconds

WEBHOOK_PATH = "/webhooks/smartcar"


class IngestApp(Starlette):
    """Starlette, with ``POST /webhooks/smartcar`` handed straight to its endpoint (the router is dearer:
    docs/performance.md). The endpoint is routed too (``root_path``)."""

    def __init__(self, webhook: WebhookEndpoint, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._webhook = webhook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            await self._webhook(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(settings: Settings | None = None) -> Starlette:
    """The public app (``uvicorn --factory``). Raises ``ConfigurationError`` without a management token."""
    if settings is None:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
    settings.require_management_token()
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
        # Startup's objects out of the collector's way, and fewer young collections (docs/performance.md).
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(50_000, 20, 20)
        drainer = None
        try:
            with contextlib.closing(probe_redis(settings.redis_url)) as probe:
                check_memory(probe, refuse_evicting=not settings.allow_evicting_redis)
            drainer = asyncio.create_task(drain_forever(spool, inbox)) if spool else None
            yield
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            if drainer is not None:
                drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drainer
            await redis.aclose(close_connection_pool=True)
            await connect.aclose()

    app = IngestApp(
        endpoint,
        routes=[
            Route(WEBHOOK_PATH, endpoint, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            *connect.routes,
        ],
        exception_handlers={HTTPException: http_exception, Exception: unexpected_exception},
        lifespan=lifespan,
    )
    # Starlette redirects a path with a trailing slash to its twin, building the Location from the
    # request's Host header: an open redirect. Every path here is exact; anything else is a 404.
    app.router.redirect_slashes = False
    return app


def create_admin_app(settings: Settings, web_status: Callable[[], str | None] | None = None) -> Starlette:
    """``/readyz`` (Redis and ``web_status``: None while the public server serves, else what is wrong) and ``/metrics``."""
    # Probes and scrapes come one at a time: a few connections are plenty.
    redis = web_redis(settings.model_copy(update={"redis_max_connections": 4}))
    deadline = redis_deadline_seconds(settings)
    collector = QueueCollector(settings)
    registry = endpoint_registry(collector)

    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}
        if web_status is not None:
            problem = web_status()
            checks["web"] = "ok" if problem is None else f"failing: {problem}"
        try:
            async with asyncio.timeout(deadline):
                await redis.ping()
            checks["redis"] = "ok"
        except (RedisError, OSError, TimeoutError) as exc:
            checks["redis"] = f"failing: {type(exc).__name__}"
        ok = all(value == "ok" for value in checks.values())
        return JSONResponse({"status": "ok" if ok else "failing", "checks": checks}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        # The queue collector reads Redis synchronously: keep it off the loop.
        return Response(await run_in_threadpool(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            collector.close()
            await redis.aclose(close_connection_pool=True)

    app = Starlette(
        routes=[Route("/readyz", readyz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])],
        exception_handlers={HTTPException: http_exception, Exception: unexpected_exception},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # as in create_app
    return app
