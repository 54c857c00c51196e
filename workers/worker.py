"""``smartcar-ingest worker``: an RQ worker on the ingest queue.

It runs RQ's :class:`~rq.SimpleWorker` (jobs run in this process, not a fork per job), so the
runtime of :mod:`workers.runtime` (HTTP pool, Redis client, cached token) lives across jobs.
SIGTERM asks for RQ's warm shutdown: the job in flight finishes, then the process exits; a
process killed harder leaves its job in RQ's started registry, from which RQ re-runs it, and
the idempotent publish keeps the output to one entry.
"""

from __future__ import annotations

import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from core.config import Settings
from workers import runtime


def run_worker(settings: Settings, burst: bool = False) -> bool:
    """Work the ingest queue until stopped (or, with ``burst``, until it is empty)."""
    settings.require_client_credentials()
    current = runtime.Runtime(settings)
    runtime.install(current)
    connection = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.ingest_queue, connection=connection, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer)
    try:
        # The scheduler moves jobs whose retry interval elapsed back onto the queue.
        return bool(worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level))
    finally:
        runtime.install(None)
        current.close()
        connection.close()
