"""The admin app, ``GET /readyz`` and ``GET /metrics``, served by ``smartcar-ingest web`` on
``ADMIN_PORT`` apart from the public port (docs/security.md, "``/metrics`` and ``/readyz`` on the
public port"; its own Redis client: docs/architecture.md, "Design notes")."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypedDict

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from core.config import Settings
from core.redis.clients import web_redis
from core.redis.queue_metrics import QueueCollector
from service import health
from service.app import redis_deadline_seconds
from service.responses import http_exception, unexpected_exception

WebStatus = Callable[[], str | None]

# Probes and scrapes come one at a time; a couple of connections is plenty.
_ADMIN_REDIS_CONNECTIONS = 4


class AdminState(TypedDict):
    redis: Redis
    redis_deadline_seconds: float
    queue_collector: QueueCollector
    web_status: WebStatus | None


def create_admin_app(settings: Settings, web_status: WebStatus | None = None) -> Starlette:
    """Build the admin app: ``/readyz`` (Redis and, when given, ``web_status``: None while the public
    server serves, else what is wrong) and ``/metrics``."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[AdminState]:
        redis = web_redis(settings.model_copy(update={"redis_max_connections": _ADMIN_REDIS_CONNECTIONS}))
        collector = QueueCollector(settings)
        try:
            yield {
                "redis": redis,
                "redis_deadline_seconds": redis_deadline_seconds(settings),
                "queue_collector": collector,
                "web_status": web_status,
            }
        finally:
            collector.close()
            await redis.aclose()
            await redis.connection_pool.disconnect()

    app = Starlette(
        routes=[
            Route("/readyz", health.readyz, methods=["GET"]),
            Route("/metrics", health.metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_exception, Exception: unexpected_exception},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # no Location built from the Host header (service/app.py)
    return app
