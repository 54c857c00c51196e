"""Per-process state of a worker: one HTTP pool, one Redis client, one user store, one token.

Ingest jobs are coroutines run on the worker's own event loop (:mod:`workers.worker`), so every job
in flight shares one HTTP keep-alive pool, one async Redis client and one cached application
token. :class:`Runtime` builds them once, inside the running loop, on first use.
"""

from __future__ import annotations

import asyncio
from typing import Any

from core.config import Settings
from core.errors import ConfigurationError
from core.redis.clients import worker_redis
from core.redis.deployment_counts import DeploymentCounts
from core.redis.parked import ParkedStream
from core.redis.published import OutputStream
from core.redis.vehicle_state import VehicleStates
from core.smartcar.http import smartcar_http
from core.smartcar.reads import vehicle_reads
from core.store.users import UserStore
from workers.processor import EventProcessor

#: Redis connections of a worker process's jobs: each call holds one for a round trip only.
REDIS_CONNECTIONS = 32


class Runtime:
    """Everything a worker process needs to run :class:`EventProcessor`, built once."""

    def __init__(self, settings: Settings, max_connections: int = 100) -> None:
        settings.require_client_credentials()
        self._max_connections = max_connections
        self.settings = settings
        self._processor: EventProcessor | None = None
        self._closers: list[Any] = []

    async def processor(self) -> EventProcessor:
        """The processor, built inside the running loop on first use."""
        if self._processor is None:
            settings = self.settings
            redis = worker_redis(settings, min(self._max_connections, REDIS_CONNECTIONS))
            http = smartcar_http(self._max_connections)
            users = UserStore(settings.database_url)
            reads = vehicle_reads(settings, redis, http)
            counts = DeploymentCounts(redis)
            counts.start()
            self._processor = EventProcessor(
                users,
                reads,
                OutputStream(
                    redis,
                    settings.output_stream,
                    published_ttl_seconds=settings.dedupe_ttl_seconds,
                    retention_seconds=settings.output_stream_retention_seconds,
                    state_ttl_seconds=settings.vehicle_state_ttl_seconds,
                ),
                ParkedStream(
                    redis, settings.parked_stream, settings.dedupe_ttl_seconds, settings.parked_retention_seconds
                ),
                vehicle_states=VehicleStates(redis, settings.vehicle_state_prefix),
                counts=counts,
            )
            self._closers = [counts.aclose, redis.aclose, http.aclose, users.dispose]
        return self._processor

    async def aclose(self) -> None:
        """Close what :meth:`processor` opened (on the loop it was opened on)."""
        closers, self._closers, self._processor = self._closers, [], None
        for closer in closers:
            result = closer()
            if asyncio.iscoroutine(result):
                await result


_current: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    """Make ``runtime`` the one jobs in this process use, or none (``None``).

    ``smartcar-ingest worker`` installs one for its lifetime; a test or benchmark that runs jobs
    in its own process installs one the same way.
    """
    global _current
    _current = runtime


def current() -> Runtime:
    """The installed runtime. Never built on demand: a job run where none is installed (a stock
    ``rq worker``, a bare import) fails with :class:`ConfigurationError` saying what runs jobs."""
    if _current is None:
        raise ConfigurationError(
            "no worker runtime is installed in this process: ingest jobs run under `smartcar-ingest worker`, "
            "which installs one (workers.runtime.install)."
        )
    return _current
