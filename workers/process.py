"""The ``smartcar-ingest worker`` process: its Redis connection, metrics server and event loop,
around one :class:`~workers.worker.AsyncWorker`."""

from __future__ import annotations

import gc

import uvloop
from rq import Queue
from rq.serializers import JSONSerializer

from core.config import Settings
from core.redis.clients import rq_redis
from core.redis.memory import warn_without_maxmemory
from core.redis.outage import until_redis_answers
from workers.metrics_server import start_worker_metrics
from workers.worker import DEFAULT_CONCURRENCY, AsyncWorker


def run_worker(settings: Settings, burst: bool = False, concurrency: int = DEFAULT_CONCURRENCY) -> bool:
    """Work the ingest queue until stopped (or, with ``burst``, until it is empty)."""
    settings.require_client_credentials()
    connection = rq_redis(settings, max_connections=16)
    # Start once Redis answers, so a worker started during an outage waits instead of crashing.
    until_redis_answers(connection.ping, give_up_after=300.0)
    warn_without_maxmemory(connection)
    queue = Queue(settings.ingest_queue, connection=connection, serializer=JSONSerializer)
    metrics_server = start_worker_metrics(settings)
    # Startup objects out of the collector's way, young collections less often (as in the web).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        # libuv's loop: less CPU per socket event than asyncio's own
        return uvloop.run(AsyncWorker(settings, connection, queue, concurrency).run(burst=burst))
    finally:
        if metrics_server is not None:
            metrics_server.close()
        connection.close()
