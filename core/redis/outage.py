"""Waiting out Redis trouble: which errors mean "Redis cannot serve us right now", and the wait.

A worker outlives every kind of Redis trouble instead of quitting over it: Redis down or
restarting (connection refused, reset, timed out), loading its AOF after a restart (``LOADING``),
or up but refusing writes (``OOM`` at ``maxmemory`` under ``noeviction``, ``READONLY`` on a
replica during a failover, ``MISCONF`` when it cannot persist, a busy script). All of these pass
once Redis recovers; waiting is the answer to each. Every other Redis error (a wrong type, a
script bug) is a fault and is raised as usual.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis import exceptions

from core.logs import get_logger

log = get_logger("smartcar_ingest.worker")
T = TypeVar("T")

# Refusals that redis-py raises as classes of their own.
_REFUSAL_CLASSES = (
    exceptions.OutOfMemoryError,
    exceptions.ReadOnlyError,
    exceptions.MasterDownError,
    exceptions.TryAgainError,
)
# Refusals that redis-py raises as a plain ResponseError, known by the reply's first word.
_REFUSAL_CODES = ("MISCONF", "NOREPLICAS", "BUSY")
# redis-py prefixes an error raised inside a pipeline with the command that caused it.
_PIPELINE_PREFIX = "caused error: "


def redis_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means Redis cannot answer or cannot write for now (worth waiting out)."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # BusyLoadingError is one
        return True
    if isinstance(exc, _REFUSAL_CLASSES):
        return True
    if isinstance(exc, redis.ResponseError):
        message = str(exc).split(_PIPELINE_PREFIX, 1)[-1]
        return message.split(" ", 1)[0] in _REFUSAL_CODES
    return False


def until_redis_answers(
    step: Callable[[], T], stop: Callable[[], bool] = lambda: False, give_up_after: float | None = None
) -> T:
    """Run ``step``, retrying with backoff (0.2 s doubling to 5 s) while Redis is unavailable.

    Gives up, re-raising the Redis error, once ``stop()`` is true or ``give_up_after`` seconds
    have passed. Any error that :func:`redis_unavailable` does not recognise is raised at once.
    """
    deadline = None if give_up_after is None else time.monotonic() + give_up_after
    wait = 0.2
    while True:
        try:
            return step()
        except redis.RedisError as exc:
            if not redis_unavailable(exc) or stop() or (deadline is not None and time.monotonic() > deadline):
                raise
            log.warning("Redis unavailable; worker waiting", error=type(exc).__name__, retryIn=wait)
            time.sleep(wait)
            wait = min(wait * 2, 5.0)
