"""Every Redis client the service builds, one factory per role, so timeouts are chosen once
(the roles and their timeouts: docs/architecture.md, "Redis clients")."""

from __future__ import annotations

import redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.config import Settings
from core.redis.batching import BatchingRedis, hiredis_packing
from core.redis.functions import FunctionsRedis


def _pool(url: str, max_connections: int, wait: float, timeout: float, connect: float) -> BlockingConnectionPool:
    """A caller that finds every connection busy waits up to ``wait`` for one, instead of redis-py's
    ``MaxConnectionsError``; one immediate reconnect lets the first call after a Redis restart
    succeed (every wait between tries is core.redis.outage's alone, so retry layers never multiply)."""
    return BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait,
        socket_timeout=timeout,
        socket_connect_timeout=connect,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def web_redis(settings: Settings) -> AsyncRedis:
    seconds = settings.redis_timeout_seconds  # a request waits for a connection within its deadline
    return AsyncRedis(
        connection_pool=_pool(settings.redis_url, settings.redis_max_connections, seconds, seconds, seconds)
    )


def worker_redis(settings: Settings, max_connections: int = 100) -> AsyncRedis:
    pool = _pool(settings.redis_url, max_connections, wait=30, timeout=10, connect=5)
    pool.connection_class = hiredis_packing(pool.connection_class)
    # Commands issued together share round trips (core.redis.batching); the client owns the pool.
    return BatchingRedis.from_pool(pool)


def rq_redis(settings: Settings, max_connections: int) -> redis.Redis:
    """The scripts RQ runs there are called as functions (:class:`core.redis.functions.FunctionsRedis`)."""
    return FunctionsRedis.from_url(
        settings.redis_url, socket_connect_timeout=5, socket_timeout=30, max_connections=max_connections
    )


def command_redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10)


def command_redis_async(settings: Settings) -> AsyncRedis:
    return AsyncRedis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10)


def probe_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
