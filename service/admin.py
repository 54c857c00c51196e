"""The admin endpoints, ``GET /readyz`` and ``GET /metrics``, served apart from the public port.

``smartcar-ingest web`` serves this app on ``ADMIN_PORT`` (bound to ``ADMIN_HOST``): what only the
orchestrator and Prometheus should ask stays off the port that Smartcar, the load balancer and the
Internet reach. The public app (:func:`service.app.create_app`) answers 404 for both paths.

The app keeps its own small Redis client for the readiness check and registers the queue gauges,
so nothing it does competes with the webhook's connection pool. ``web_status`` reports on the
public server the admin server stands beside: None while it serves, otherwise what is wrong. It is
asked on every ``/readyz``, so a web process that has not finished starting, is shutting down, or
(under ``web --workers N``) has lost one of its processes is reported not ready.
"""

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
from core.redis.queue_metrics import QueueCollector, register_queue_collector, unregister_queue_collector
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
    """Build the admin app: ``/readyz`` (Redis and, when given, ``web_status``) and ``/metrics``."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[AdminState]:
        redis = web_redis(settings.model_copy(update={"redis_max_connections": _ADMIN_REDIS_CONNECTIONS}))
        collector = register_queue_collector(settings.redis_url, settings)
        try:
            yield {
                "redis": redis,
                "redis_deadline_seconds": redis_deadline_seconds(settings),
                "queue_collector": collector,
                "web_status": web_status,
            }
        finally:
            unregister_queue_collector(collector)
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
