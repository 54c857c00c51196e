"""The parts of RQ's worker loop that are not jobs: registration, state, heartbeats, suspension,
registry clean-ups, the scheduler, liveness; and the worker's periodic summary line.

:class:`Housekeeping` runs RQ's own worker object (:class:`rq.SimpleWorker`) for all of it, in a
thread the async worker hands it to once a second (:meth:`Housekeeping.tick`), so ``rq info``,
``Worker.all()``, ``rq suspend`` and the scheduler see a worker exactly as RQ would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from rq import Queue, SimpleWorker, worker_registration
from rq.registry import clean_registries
from rq.suspension import is_suspended
from rq.worker import WorkerStatus

from core import metrics
from core.logs import get_logger
from core.redis.outage import redis_unavailable, until_redis_answers
from workers.reaper import Liveness, sweep_expired
from workers.scheduler import PatientScheduler

log = get_logger("smartcar_ingest.worker")

#: Seconds between worker heartbeats (RQ's worker key lives for minutes).
HEARTBEAT_SECONDS = 5.0
#: Seconds between registry clean-ups (RQ's default is 10 minutes; the reaper is faster still).
MAINTENANCE_SECONDS = 30
#: Seconds between INFO summary lines.
SUMMARY_SECONDS = 60.0


class Housekeeping:
    """RQ's worker object, driven from the async worker (see the module docstring)."""

    def __init__(self, worker: SimpleWorker, queue: Queue, in_flight: Callable[[], Iterable[tuple[str, str, int]]]):
        self.worker = worker
        self.queue = queue
        self.connection: redis.Redis = worker.connection
        self._in_flight = in_flight
        self.liveness: Liveness | None = None
        self.scheduler: PatientScheduler | None = None
        #: A long-running worker keeps a scheduler running (its own, or a peer's); a burst run does not.
        self.scheduler_wanted = False
        self.suspended = False
        #: Set after Redis trouble: the worker then looks for executions it recorded without knowing.
        self.check_lost = True
        self._state = WorkerStatus.IDLE
        self._reported: str | None = None
        self._heartbeat_at = 0.0
        self._cleaned_at = time.monotonic()

    def start(self, burst: bool) -> None:
        """Register the worker, start its liveness beat and RQ's scheduler (in burst mode: move
        due scheduled jobs once)."""
        attempts = 0

        def birth() -> None:
            nonlocal attempts
            attempts += 1
            try:
                self.worker.register_birth()  # type: ignore[no-untyped-call]
            except ValueError:
                if attempts == 1:
                    raise  # another live worker has this name
                # An earlier attempt was applied before Redis went away: registered already.

        until_redis_answers(birth)
        self.liveness = Liveness(self.connection, self.worker.name, [self.queue.name], in_flight=self._in_flight)
        until_redis_answers(self.liveness.start)
        self._report(WorkerStatus.IDLE)
        self.scheduler_wanted = not burst
        self.scheduler = PatientScheduler(
            [self.queue], connection=self.connection, serializer=self.worker.serializer, logging_level="WARNING"
        )
        until_redis_answers(self.scheduler.acquire_locks)
        if not self.scheduler.acquired_locks:
            return
        if not burst:
            self.scheduler.start()
            return
        try:
            until_redis_answers(self.scheduler.register_birth)
            until_redis_answers(self.scheduler.enqueue_scheduled_jobs)
        finally:
            self._best_effort(self.scheduler.release_locks)
            self._best_effort(self.scheduler.register_death)

    def busy(self) -> None:
        """Jobs were started; the start script reported the worker busy already."""
        self._state = self._reported = WorkerStatus.BUSY

    def idle(self) -> None:
        self._state = WorkerStatus.IDLE

    def tick(self) -> None:
        """Once a second: state, heartbeat, suspension; every :data:`MAINTENANCE_SECONDS` the clean-ups."""
        try:
            self.suspended = bool(is_suspended(self.connection))
            if self._state != self._reported:
                self._report(self._state)
            now = time.monotonic()
            if now - self._heartbeat_at >= HEARTBEAT_SECONDS:
                self._heartbeat_at = now
                self.worker.heartbeat()
            if now - self._cleaned_at >= MAINTENANCE_SECONDS and not (self.liveness and self.liveness.quiet):
                self._cleaned_at = now
                self._maintain()
        except redis.RedisError as exc:
            if not redis_unavailable(exc):
                raise
            self.check_lost = True
            log.warning("housekeeping skipped: Redis unavailable", error=type(exc).__name__)

    def _report(self, state: str) -> None:
        self.worker.set_state(state)
        self._reported = state

    def _maintain(self) -> None:
        """RQ's registry clean-up, changed in three ways: expired started entries are requeued
        (:func:`~workers.reaper.sweep_expired`) before RQ would retry or fail them; RQ's
        intermediate-list pass is left out (the reaper owns those ids); the lock lasts one interval."""
        queue = self.queue
        if self.scheduler is not None and self.scheduler_wanted and not self.scheduler.running():
            # A peer's scheduler died (take over), or this worker's own did (start it again).
            self.scheduler.acquire_locks(auto_start=True)  # type: ignore[no-untyped-call]
        if not self.connection.set(queue.registry_cleaning_key, self.worker.name, nx=True, ex=MAINTENANCE_SECONDS):
            return
        try:
            sweep_expired(self.connection, queue.name)
            clean_registries(queue, self.worker._exc_handlers)
            worker_registration.clean_worker_registry(queue)
        finally:
            with contextlib.suppress(redis.RedisError):
                self.connection.delete(queue.registry_cleaning_key)

    def stop(self) -> None:
        """Stop the scheduler, hand back anything still held, deregister."""
        self.scheduler_wanted = False
        if self.scheduler is not None:
            self.scheduler.stop_process()
        if self.liveness is not None:
            self.liveness.stop()
        self._best_effort(self.worker.register_death)

    @staticmethod
    def _best_effort(step: Callable[[], Any]) -> None:
        try:
            step()
        except redis.RedisError as exc:
            if not redis_unavailable(exc):
                raise
            log.warning("skipped while Redis is unavailable", error=type(exc).__name__)


class WorkerLog:
    """The INFO summary line: this process's jobs by outcome (``smartcar_ingest_jobs_total``)
    since the last line; per-event lines are DEBUG (workers.processor)."""

    def __init__(self) -> None:
        self._jobs = metrics.totals(metrics.JOBS)
        self._since = time.monotonic()
        self._total = 0

    def summary(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self._since
        if not final and elapsed < SUMMARY_SECONDS:
            return
        jobs = metrics.totals(metrics.JOBS)
        counts = {labels[0]: int(n - self._jobs.get(labels, 0)) for labels, n in jobs.items()}
        counts = {outcome: n for outcome, n in counts.items() if n}
        done = sum(counts.values())
        self._total += done
        if done or final:
            log.info(
                "worker summary" if not final else "worker stopped",
                jobs=done,
                perSecond=round(done / elapsed, 1) if elapsed else 0.0,
                total=self._total,
                **counts,
            )
        self._jobs, self._since = jobs, time.monotonic()


def awaiting() -> str:
    """Where each task of the running loop waits, innermost last (``kill -USR1`` logs it: for a
    worker that seems stuck)."""
    lines: list[str] = []
    for task in asyncio.all_tasks():
        chain: list[str] = []
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        lines.append(f"{task.get_name()}: {' > '.join(chain) or 'not started'}")
    return "\n".join(sorted(lines))


def report_crash(task: asyncio.Task[None]) -> None:
    """A done-callback for the worker's helper tasks: an exception that ended one is logged."""
    if not task.cancelled() and task.exception() is not None:
        log.error("worker task ended", task=task.get_name(), error=repr(task.exception()))
