"""Per-process state of a worker: one event loop, one HTTP pool, one Redis client, one user store.

RQ calls job functions synchronously, possibly from several threads at once (the concurrent
worker runs jobs in a thread pool). :class:`Runtime` runs one asyncio loop in a thread of its
own for the whole process; job functions hand their coroutine to it and wait. So every job in
flight shares one HTTP keep-alive pool, one Redis client and one cached token, and the loop
keeps dozens of Smartcar calls in flight while RQ's bookkeeping runs in the job threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from core.config import Settings
from core.errors import ConfigurationError
from core.redis.clients import worker_redis
from core.redis.parked import ParkedStream
from core.redis.published import OutputStream
from core.redis.vehicle_state import VehicleStates
from core.smartcar.http import smartcar_http
from core.smartcar.reads import vehicle_reads
from core.store.users import UserStore
from workers.processor import EventProcessor

T = TypeVar("T")


class Runtime:
    """Everything a worker process needs to run :class:`EventProcessor`, built once."""

    def __init__(self, settings: Settings, max_connections: int = 100) -> None:
        settings.require_client_credentials()
        self._max_connections = max_connections
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="enrichment-loop", daemon=True)
        self._thread.start()
        self._processor: EventProcessor | None = None
        self._closers: list[Any] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the shared loop and wait for its result (callable from any thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def processor(self) -> EventProcessor:
        """The processor, built inside the running loop on first use."""
        if self._processor is None:
            settings = self.settings
            redis = worker_redis(settings, self._max_connections)
            http = smartcar_http(self._max_connections)
            users = UserStore(settings.database_url)
            self._processor = EventProcessor(
                users,
                vehicle_reads(settings, redis, http),
                OutputStream(
                    redis,
                    settings.output_stream,
                    published_ttl_seconds=settings.dedupe_ttl_seconds,
                    retention_seconds=settings.output_stream_retention_seconds,
                ),
                ParkedStream(
                    redis, settings.parked_stream, settings.dedupe_ttl_seconds, settings.parked_retention_seconds
                ),
                vehicle_states=VehicleStates(redis, settings.vehicle_state_prefix, settings.vehicle_state_ttl_seconds),
            )
            self._closers = [redis.aclose, http.aclose, users.dispose]
        return self._processor

    def close(self) -> None:
        async def close_all() -> None:
            for closer in self._closers:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result

        try:
            if self._closers:
                self.run(close_all(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._processor = None


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
