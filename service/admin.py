"""The admin app, ``GET /readyz`` and ``GET /metrics``, served by ``smartcar-ingest web`` on
``ADMIN_PORT`` apart from the public port (docs/security.md, "``/metrics`` and ``/readyz`` on the
public port"; its own Redis client: docs/architecture.md, "Design notes")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.config import Settings
from core.redis.clients import web_redis
from core.redis.queue_metrics import QueueCollector, endpoint_registry
from service.responses import http_exception, unexpected_exception
from service.webhooks import redis_deadline_seconds

WebStatus = Callable[[], str | None]

# Probes and scrapes come one at a time; a couple of connections is plenty.
_ADMIN_REDIS_CONNECTIONS = 4


def create_admin_app(settings: Settings, web_status: WebStatus | None = None) -> Starlette:
    """Build the admin app: ``/readyz`` (Redis and, when given, ``web_status``: None while the public
    server serves, else what is wrong) and ``/metrics``."""
    redis = web_redis(settings.model_copy(update={"redis_max_connections": _ADMIN_REDIS_CONNECTIONS}))
    deadline = redis_deadline_seconds(settings)
    collector = QueueCollector(settings)
    registry = endpoint_registry(collector)

    async def readyz(request: Request) -> Response:
        """200 when every dependency answers and the web serves; otherwise 503 naming what failed."""
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
            await redis.aclose()
            await redis.connection_pool.disconnect()

    app = Starlette(
        routes=[Route("/readyz", readyz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])],
        exception_handlers={HTTPException: http_exception, Exception: unexpected_exception},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # no Location built from the Host header (service/app.py)
    return app
