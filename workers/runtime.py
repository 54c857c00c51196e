"""Per-process state of a worker: one event loop, one HTTP pool, one Redis client, one user store.

RQ calls job functions synchronously; :class:`Runtime` keeps a single asyncio loop alive for the
whole process so that the HTTP keep-alive pool, the Redis connections and the cached token are
reused from job to job instead of being rebuilt for every event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
from redis.asyncio import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from core.config import Settings, load_settings
from core.smartcar import SmartcarClient
from core.streams import StreamNames, StreamWriter
from core.tokens import AppTokenProvider
from core.users import UserStore
from workers.processor import EventProcessor

T = TypeVar("T")


def worker_redis(settings: Settings) -> Redis:
    """Redis for workers: patient (they are not answering Smartcar) and reconnecting."""
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=10,
        socket_connect_timeout=5,
        retry=Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.1), 5),
        health_check_interval=30,
    )


def smartcar_http(max_connections: int = 100) -> httpx.AsyncClient:
    """One pooled keep-alive client for the token endpoint and the vehicle API."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(15.0, connect=5.0),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        headers={"user-agent": "smartcar-ingest"},
    )


class Runtime:
    """Everything a worker process needs to run :class:`EventProcessor`, built once."""

    def __init__(self, settings: Settings) -> None:
        settings.require_client_credentials()
        self.settings = settings
        self._runner = asyncio.Runner()
        self._processor: EventProcessor | None = None
        self._closers: list[Any] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    async def processor(self) -> EventProcessor:
        """The processor, built inside the running loop on first use."""
        if self._processor is None:
            settings = self.settings
            assert settings.smartcar_client_id is not None
            assert settings.smartcar_client_secret is not None
            redis = worker_redis(settings)
            http = smartcar_http()
            tokens = AppTokenProvider(
                redis,
                http,
                settings.smartcar_token_url,
                settings.smartcar_client_id,
                settings.smartcar_client_secret.get_secret_value(),
            )
            users = UserStore(settings.database_url)
            self._processor = EventProcessor(
                redis,
                users,
                SmartcarClient(http, settings.smartcar_api_url, tokens),
                StreamWriter(
                    redis,
                    StreamNames(output=settings.output_stream, parked=settings.parked_stream),
                    published_ttl_seconds=settings.dedupe_ttl_seconds,
                ),
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
            self._runner.run(close_all())
        finally:
            self._runner.close()
            self._processor = None


_current: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    """Make ``runtime`` the one jobs in this process use (the ``worker`` command does this)."""
    global _current
    _current = runtime


def current() -> Runtime:
    """The installed runtime, or one built from the environment on first use."""
    global _current
    if _current is None:
        _current = Runtime(load_settings())
    return _current
