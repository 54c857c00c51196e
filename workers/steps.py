"""How the async worker waits out Redis trouble, and where RQ's synchronous steps run.

Every step of :class:`workers.worker.AsyncWorker` is re-run until Redis answers
(:mod:`core.redis.outage`), or until the worker's stop ends the wait with :class:`Stopped`. RQ's
synchronous steps (a failure, a refusal, a give-back, the housekeeping tick) run on threads of
their own, a bounded few: a Redis outage that holds them never holds the default thread pool,
where the user lookups run, nor the housekeeping tick, which has a thread of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import redis

from core.redis.outage import redis_unavailable, until_redis_answers, until_redis_answers_async

T = TypeVar("T")

#: Threads for RQ's synchronous Redis steps; more steps than this wait their turn.
STEP_THREADS = 4


class Stopped(Exception):
    """A wait for Redis ended by a requested stop."""


class RedisSteps:
    """The worker's Redis steps. ``stopping()``: a stop was asked for; ``overdue()``: the stop has
    waited long enough for Redis to record what jobs did; ``on_trouble()``: a step met Redis trouble."""

    def __init__(
        self, stopping: Callable[[], bool], overdue: Callable[[], bool], on_trouble: Callable[[], None]
    ) -> None:
        self._stopping = stopping
        self._overdue = overdue
        self._on_trouble = on_trouble
        self._threads = ThreadPoolExecutor(STEP_THREADS, thread_name_prefix="rq-step")
        self._housekeeping = ThreadPoolExecutor(1, thread_name_prefix="rq-housekeeping")

    def _stop_check(self, or_stop: bool) -> Callable[[], bool]:
        """When a wait gives up: at a stop (``or_stop``), else (recording what jobs did) once overdue."""
        return self._stopping if or_stop else self._overdue

    async def run(self, step: Callable[[], Awaitable[T]], or_stop: bool = True) -> T:
        """``step``, waiting out Redis trouble for as long as it lasts; when ``or_stop``, a requested
        stop ends the wait with :class:`Stopped`."""
        stop = self._stop_check(or_stop)
        try:
            return await until_redis_answers_async(step, stop=stop)
        except redis.RedisError as exc:
            self._on_trouble()
            if stop() and redis_unavailable(exc):
                raise Stopped from exc
            raise

    async def blocking(self, step: Callable[[], T], or_stop: bool = True, housekeeping: bool = False) -> T:
        """A synchronous step (RQ's own code) on the step threads (the housekeeping thread when
        ``housekeeping``), waiting out Redis trouble as :meth:`run` does."""
        stop = self._stop_check(or_stop)

        def patient() -> T:
            return until_redis_answers(step, stop=stop)

        executor = self._housekeeping if housekeeping else self._threads
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, patient)
        except redis.RedisError as exc:
            if stop() and redis_unavailable(exc):
                raise Stopped from exc
            raise

    def close(self) -> None:
        """Let the threads go once their steps end (the stop checks end every wait)."""
        self._threads.shutdown(wait=False)
        self._housekeeping.shutdown(wait=False)
