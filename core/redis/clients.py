"""Every Redis client the service builds, one factory per role, so timeouts are chosen once (the roles
and their timeouts: docs/architecture.md, "Redis clients"), and the worker's, whose concurrent commands
share round trips packed by hiredis (docs/architecture.md, "Redis Functions, shared calls and round trips")."""

from __future__ import annotations

from typing import Any

import hiredis
import redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.config import Settings
from core.redis.functions import FunctionsRedis
from core.redis.group import GroupCommit

#: Commands that wait on the server, sent alone.
BLOCKING = frozenset({"BLMOVE", "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP", "WAIT"})
MAX_BATCH = 512


class BatchingRedis(AsyncRedis):
    """A ``redis.asyncio.Redis`` whose commands issued during a round trip go in the next one, as one
    pipeline (not a transaction); blocking commands are sent alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._commands: GroupCommit[tuple[tuple[Any, ...], dict[str, Any]], Any] = GroupCommit(
            self._round_trip, MAX_BATCH, direct=False
        )

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = str(args[0]).upper()
        if name in BLOCKING or (name.startswith("XREAD") and any(str(a).upper() == "BLOCK" for a in args)):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        return await self._commands.submit((args, options))

    async def _round_trip(self, batch: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        pipe = self.pipeline(transaction=False)
        for args, options in batch:
            pipe.execute_command(*args, **options)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


class HiredisPacking:
    """A connection mixin: each command packed by ``hiredis.pack_command`` in one call; what
    hiredis cannot pack (``None``, a bool) is left to redis-py, which raises its own error."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if (isinstance(first, str) and " " in first) or (isinstance(first, bytes) and b" " in first):
            args = (*first.split(), *args[1:])  # "FUNCTION LOAD" is two words, as redis-py sends it
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)  # type: ignore[misc,no-any-return]


def _pool(url: str, max_connections: int, wait: float, timeout: float, connect: float) -> BlockingConnectionPool:
    """A caller waits up to ``wait`` for a free connection (no ``MaxConnectionsError``); one immediate
    reconnect, as every wait between tries is core.redis.outage's alone (no retry layers multiplied)."""
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
    kind = pool.connection_class  # plain, TLS or Unix socket, as the URL chose
    pool.connection_class = type(f"Hiredis{kind.__name__}", (HiredisPacking, kind), {})
    return BatchingRedis.from_pool(pool)  # the client owns the pool


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
