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


def web_redis(settings: Settings) -> AsyncRedis:
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        # Under a burst, requests wait (within their deadline) for a free connection instead of
        # failing outright as the default pool does when it runs out.
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_seconds,
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
        # One immediate retry lets the first request after a Redis restart reconnect instead of failing.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )
    return AsyncRedis(connection_pool=pool)


def worker_redis(settings: Settings, max_connections: int = 100) -> AsyncRedis:
    """A job that finds every connection busy waits for one (a blocking pool) instead of getting
    redis-py's ``MaxConnectionsError``, which the jobs would take for an outage."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections,
        timeout=30,
        socket_timeout=10,
        socket_connect_timeout=5,
        # One immediate reconnect, as the web's; every wait between tries is core.redis.outage's
        # alone (REDIS_PATIENCE_SECONDS), so two retry layers never multiply their waits.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )
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
