"""Redis's memory as a health signal, read from ``INFO memory`` (all the web's ACL user may run), and the
check at start (why ``maxmemory`` with ``noeviction``: docs/reliability.md, "Redis requirements")."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from core.errors import ConfigurationError
from core.logs import get_logger
from core.redis.keys import text

log = get_logger("smartcar_ingest.redis")


@dataclass(frozen=True)
class RedisMemory:
    used_bytes: int
    max_bytes: int  # ``maxmemory``; 0 means no limit (Redis grows until the OS kills it)
    policy: str


def read_memory(client: redis.Redis) -> RedisMemory:
    info = client.info("memory")
    return RedisMemory(
        int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)), text(info.get("maxmemory_policy", ""))
    )


def check_memory(client: redis.Redis, refuse_evicting: bool = False) -> None:
    """The check at start: a Redis that may evict keys is refused with ``refuse_evicting`` (the web's,
    unless ALLOW_EVICTING_REDIS), else logged as an error; one that does not answer is not checked."""
    try:
        memory = read_memory(client)
    except (redis.RedisError, OSError) as exc:
        log.warning("could not read Redis memory at startup", error=type(exc).__name__)
        return
    if memory.policy not in ("", "noeviction"):
        message = (
            f"Redis maxmemory-policy is {memory.policy}: it may evict queued events and dedupe marks. "
            "Set it to noeviction (or ALLOW_EVICTING_REDIS=true to run anyway)."
        )
        if refuse_evicting:
            raise ConfigurationError(message)
        log.error(message)
    if not memory.max_bytes:
        log.warning(
            "Redis has no maxmemory: it grows until the OS kills it, losing what AOF has not written. "
            "Set maxmemory (docs/capacity.md sizes it) with maxmemory-policy noeviction.",
            usedBytes=memory.used_bytes,
        )
