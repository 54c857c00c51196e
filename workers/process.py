"""The ``smartcar-ingest worker`` process around one :class:`~workers.worker.AsyncWorker`: its Redis
connection, its Prometheus endpoint (docs/deploy.md, "Observability") and its event loop."""

from __future__ import annotations

import gc
from collections.abc import Callable

import uvloop
from prometheus_client import start_http_server
from rq import Queue
from rq.serializers import JSONSerializer

from core.config import Settings
from core.logs import get_logger
from core.redis.clients import rq_redis
from core.redis.memory import warn_without_maxmemory
from core.redis.outage import until_redis_answers
from core.redis.queue_metrics import QueueCollector, endpoint_registry
from workers.worker import DEFAULT_CONCURRENCY, AsyncWorker

log = get_logger("smartcar_ingest.worker")


def run_worker(settings: Settings, burst: bool = False, concurrency: int = DEFAULT_CONCURRENCY) -> bool:
    """Work the ingest queue until stopped (or, with ``burst``, until it is empty)."""
    settings.require_client_credentials()
    connection = rq_redis(settings, max_connections=16)
    # Start once Redis answers, so a worker started during an outage waits instead of crashing.
    until_redis_answers(connection.ping, give_up_after=300.0)
    warn_without_maxmemory(connection)
    queue = Queue(settings.ingest_queue, connection=connection, serializer=JSONSerializer)
    stop_metrics = start_worker_metrics(settings)
    # Startup objects out of the collector's way, young collections less often (as in the web).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        # libuv's loop: less CPU per socket event than asyncio's own
        return uvloop.run(AsyncWorker(settings, connection, queue, concurrency).run(burst=burst))
    finally:
        if stop_metrics is not None:
            stop_metrics()
        connection.close()


def start_worker_metrics(settings: Settings) -> Callable[[], None] | None:
    """Serve ``/metrics`` (this process's counters, the queue gauges read at scrape time) on
    ``ADMIN_HOST``:``METRICS_PORT`` in a daemon thread; returns what stops it, or None when the
    port is 0, or taken (logged: the worker then runs without metrics)."""
    if settings.metrics_port == 0:
        return None
    collector = QueueCollector(settings)
    try:
        server, thread = start_http_server(
            settings.metrics_port, addr=settings.admin_host, registry=endpoint_registry(collector)
        )
    except OSError as exc:
        collector.close()
        log.warning(
            "worker metrics not served: METRICS_PORT is unavailable",
            port=settings.metrics_port,
            error=type(exc).__name__,
        )
        return None
    log.info("worker metrics served", host=settings.admin_host, port=settings.metrics_port, path="/metrics")

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        collector.close()

    return stop
