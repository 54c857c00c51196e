"""Redis's memory as a health signal: used and max memory; at start, a warning without a limit
and (the web) a refusal of an evicting policy.

Why ``maxmemory`` with ``noeviction``: docs/reliability.md, "Redis requirements"; sizing it:
docs/capacity.md. Reads ``INFO memory`` only, which the web's ACL user may run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis

from core.errors import ConfigurationError
from core.logs import get_logger
from core.redis.keys import text

log = get_logger("smartcar_ingest.redis")


@dataclass(frozen=True)
class RedisMemory:
    """Redis's memory as ``INFO memory`` reports it."""

    used_bytes: int
    max_bytes: int
    """``maxmemory``; 0 means no limit (Redis grows until the OS kills it)."""
    policy: str


def memory_from_info(info: Mapping[str, Any]) -> RedisMemory:
    """:class:`RedisMemory` from the parsed reply of ``INFO memory``."""
    return RedisMemory(
        used_bytes=int(info.get("used_memory", 0)),
        max_bytes=int(info.get("maxmemory", 0)),
        policy=text(info.get("maxmemory_policy", "")),
    )


def read_memory(client: redis.Redis) -> RedisMemory:
    return memory_from_info(client.info("memory"))


def warn_without_maxmemory(client: redis.Redis) -> None:
    """Log a warning when Redis has no ``maxmemory`` (the worker, at start)."""
    try:
        _warn_unlimited(read_memory(client))
    except (redis.RedisError, OSError) as exc:
        log.warning("could not read Redis memory at startup", error=type(exc).__name__)


async def check_memory_async(client: AsyncRedis, deadline_seconds: float, allow_evicting: bool) -> None:
    """The web's check at start, bounded by ``deadline_seconds``: refuse a Redis that may evict keys
    (eviction silently drops queued events; with ``allow_evicting``, a loud error line instead), and
    :func:`warn_without_maxmemory`. A Redis that does not answer is not checked: the web starts and
    answers 503 until it does."""
    try:
        async with asyncio.timeout(deadline_seconds):
            memory = memory_from_info(await client.info("memory"))
    except (redis.RedisError, OSError, TimeoutError) as exc:
        log.warning("could not read Redis memory at startup", error=type(exc).__name__)
        return
    if memory.policy not in ("", "noeviction"):
        message = (
            f"Redis maxmemory-policy is {memory.policy}: it may evict queued events and dedupe marks. "
            "Set it to noeviction (or ALLOW_EVICTING_REDIS=true to run anyway)."
        )
        if not allow_evicting:
            raise ConfigurationError(message)
        log.error(message)
    _warn_unlimited(memory)


def _warn_unlimited(memory: RedisMemory) -> None:
    if not memory.max_bytes:
        log.warning(
            "Redis has no maxmemory: it grows until the OS kills it, losing what AOF has not written. "
            "Set maxmemory (docs/capacity.md sizes it) with maxmemory-policy noeviction.",
            usedBytes=memory.used_bytes,
        )
