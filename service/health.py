"""``/healthz`` (public port), ``/readyz`` and ``/metrics`` (admin port, :mod:`service.admin`): what
an orchestrator and Prometheus ask (docs/deploy.md, "Observability")."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.redis.queue_metrics import QueueCollector, endpoint_registry


async def healthz(request: Request) -> Response:
    """200 while the process can answer at all."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 when every dependency answers and the web serves; otherwise 503 naming what failed."""
    redis: Redis = request.state.redis
    deadline: float = request.state.redis_deadline_seconds
    web_status: Callable[[], str | None] | None = getattr(request.state, "web_status", None)
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
    """Prometheus text exposition: this process's metrics, or every process's under ``web --workers N``."""
    collector = getattr(request.state, "queue_collector", None)
    # The queue collector reads Redis synchronously: keep it off the loop.
    return Response(await run_in_threadpool(exposition, collector), media_type=CONTENT_TYPE_LATEST)


def exposition(queue_collector: QueueCollector | None = None) -> bytes:
    """The metrics text; with ``PROMETHEUS_MULTIPROC_DIR`` set (``web --workers N``), summed over all
    the server's processes."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    process: Collector = REGISTRY
    if directory:
        process = CollectorRegistry()
        MultiProcessCollector(process, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(process if queue_collector is None else endpoint_registry(queue_collector, process))
