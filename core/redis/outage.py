"""Waiting out Redis trouble: which errors mean "Redis cannot serve us right now" (any other is a
fault, raised at once), and the wait (docs/reliability.md, "One retry policy for Redis")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
import stamina
from redis import exceptions
from stamina.instrumentation import (
    PrometheusOnRetryHook,
    RetryDetails,
    StructlogOnRetryHook,
    set_on_retry_hooks,
)

from core.logs import get_logger

log = get_logger("smartcar_ingest.worker")
T = TypeVar("T")

# Refusals that redis-py raises as classes of their own (BusyLoadingError is a ConnectionError).
_REFUSALS = (
    redis.ConnectionError,
    redis.TimeoutError,
    exceptions.OutOfMemoryError,
    exceptions.ReadOnlyError,
    exceptions.MasterDownError,
    exceptions.TryAgainError,
)
# Refusals redis-py raises as a plain ResponseError, by the reply's first word (after "caused error: " in a
# pipeline, where redis-py may show the reply as a tuple: "caused error: ('BUSY …',)").
_REFUSAL_CODES = ("MISCONF", "NOREPLICAS", "BUSY")


def redis_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means Redis cannot answer or cannot write for now (worth waiting out)."""
    if isinstance(exc, _REFUSALS):
        return True
    if isinstance(exc, redis.ResponseError):
        reply = str(exc).split("caused error: ", 1)[-1].lstrip("('\"")
        return reply.split(" ", 1)[0] in _REFUSAL_CODES
    return False


#: Seconds between two tries, doubling up to WAIT_MAX, plus up to WAIT_JITTER at random (so a
#: fleet's workers do not all try again at the same instant).
WAIT_INITIAL = 0.2
WAIT_MAX = 5.0
WAIT_JITTER = 0.2
#: How long a job's Redis call waits out trouble before the error is raised (the job is then put back).
REDIS_PATIENCE_SECONDS = 30.0

_BACKOFF = {"wait_initial": WAIT_INITIAL, "wait_max": WAIT_MAX, "wait_jitter": WAIT_JITTER}


def until_redis_answers(
    step: Callable[[], T], *, stop: Callable[[], bool] | None = None, give_up_after: float | None = None
) -> T:
    """Run ``step``, again after a backoff while Redis is unavailable, until ``stop()`` is true or
    ``give_up_after`` seconds have passed (then the error is raised; with neither, no end)."""
    return stamina.RetryingCaller(attempts=None, timeout=give_up_after, **_BACKOFF)(_worth_waiting(stop), step)


async def until_redis_answers_async(
    call: Callable[[], Awaitable[T]], *, stop: Callable[[], bool] | None = None, give_up_after: float | None = None
) -> T:
    """:func:`until_redis_answers` for a coroutine; Redis answering (the per-event case) costs one
    call and no retry machinery (except under stamina's testing mode, which counts every try)."""
    worth_waiting = _worth_waiting(stop)
    if not stamina.is_testing():
        try:
            return await call()
        except Exception as exc:
            if not worth_waiting(exc):
                raise
    return await stamina.AsyncRetryingCaller(attempts=None, timeout=give_up_after, **_BACKOFF)(worth_waiting, call)


def _worth_waiting(stop: Callable[[], bool] | None) -> Callable[[Exception], bool]:
    return redis_unavailable if stop is None else lambda exc: redis_unavailable(exc) and not stop()


_STAMINA_LOG = StructlogOnRetryHook.hook_factory()


def _log_retry(details: RetryDetails) -> None:
    """Instead of stamina's structlog hook: our line per Redis wait, stamina's for any other retry."""
    if not redis_unavailable(details.caused_by):
        _STAMINA_LOG(details)
        return
    log.warning(
        "Redis unavailable; waiting",
        error=type(details.caused_by).__name__,
        retryIn=round(details.wait_for, 2),
        waitedSoFar=round(details.waited_so_far, 1),
    )


set_on_retry_hooks((PrometheusOnRetryHook, _log_retry))
