"""The worker's life besides its jobs, on two threads of its own: the tick of RQ's worker object
(so that ``rq info``, ``rq suspend`` and RQ's scheduler see it as RQ would) and the liveness beat
(docs/architecture.md, "The worker"; docs/reliability.md)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing import parent_process
from typing import Any

import redis
from rq import Queue, SimpleWorker, worker_registration
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job
from rq.registry import ScheduledJobRegistry, StartedJobRegistry, clean_registries
from rq.scheduler import RQScheduler
from rq.suspension import is_suspended
from rq.utils import current_timestamp
from rq.worker import WorkerStatus

from core import metrics
from core.logs import get_logger
from core.redis.keys import WORKERS_SET, alive_key, rq_intermediate_key, text
from core.redis.outage import redis_unavailable, until_redis_answers
from workers.jobs import refuse
from workers.reaper import reap, return_ids, sweep_expired

log = get_logger("smartcar_ingest.worker")

TICK_SECONDS = 1.0
#: RQ's worker key lives for minutes: a heartbeat (three commands) every few seconds is plenty.
HEARTBEAT_SECONDS = 5.0
#: Between registry clean-ups (RQ's default is 10 minutes; the reaper is faster still).
MAINTENANCE_SECONDS = 30
SUMMARY_SECONDS = 60.0
#: The liveness key is set again every BEAT_SECONDS and lives ALIVE_SECONDS.
BEAT_SECONDS = 2.0
ALIVE_SECONDS = 8
#: An id that has sat this long in RQ's shared intermediate list has no live worker behind it.
STRANDED_AFTER_SECONDS = 10.0
#: How long a worker leaving cleanly waits for Redis to hand back what it still holds.
RELEASE_PATIENCE_SECONDS = 5.0
#: How long the worker's stop waits for its scheduler's process to end before killing it.
STOP_SECONDS = 10.0


def _job_counts() -> collections.Counter[str]:
    return collections.Counter({labels[0]: int(n) for labels, n in metrics.totals(metrics.JOBS).items()})


class Housekeeping:
    """RQ's worker object and the liveness beat of one worker; ``in_flight``: (composite key, TTL) per job."""

    def __init__(self, worker: SimpleWorker, queue: Queue, in_flight: Callable[[], list[tuple[str, int]]]):
        self.worker = worker
        self.queue = queue
        self.connection: redis.Redis = worker.connection
        self._in_flight = in_flight
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Until then this worker judges no other (just started, or Redis just came back).
        self._quiet_until = 0.0
        # Ids seen in RQ's shared intermediate list, with when the liveness thread first saw each.
        self._suspects: dict[str, float] = {}
        #: A long-running worker keeps a scheduler running (its own, or a peer's); a burst run has none.
        self.scheduler: PatientScheduler | None = None
        self.suspended = False
        #: Set after Redis trouble: the worker then looks for executions it recorded without knowing.
        self.check_lost = True
        self._reported: str | None = None
        self._heartbeat_at = 0.0
        self._cleaned_at = time.monotonic()
        self._first_counts = _job_counts()
        self._summarised = (self._first_counts, time.monotonic())

    def start(self, burst: bool) -> None:
        """Register the worker, start its beat and RQ's scheduler (burst: move due scheduled jobs once)."""

        def birth() -> None:
            # The name is a fresh uuid: a name taken is an earlier attempt applied before Redis went away.
            with contextlib.suppress(ValueError):
                self.worker.register_birth()  # type: ignore[no-untyped-call]

        until_redis_answers(birth)
        # Judge nobody until every live worker has had time to beat since this one started.
        self._quiet_until = time.monotonic() + ALIVE_SECONDS
        until_redis_answers(self._beat)
        self._every(BEAT_SECONDS, self._live, "liveness")
        self.worker.set_state(WorkerStatus.IDLE)
        self._reported = WorkerStatus.IDLE
        scheduler = PatientScheduler(
            [self.queue], connection=self.connection, serializer=self.worker.serializer, logging_level="WARNING"
        )
        if not burst:
            self.scheduler = scheduler
            until_redis_answers(lambda: scheduler.acquire_locks(auto_start=True))  # type: ignore[no-untyped-call]
        elif until_redis_answers(scheduler.acquire_locks):
            try:
                until_redis_answers(scheduler.register_birth)
                until_redis_answers(scheduler.enqueue_scheduled_jobs)
            finally:
                self._best_effort(scheduler.release_locks)
                self._best_effort(scheduler.register_death)
        self._every(TICK_SECONDS, self.tick, "housekeeping")

    def _every(self, seconds: float, step: Callable[[], None], name: str) -> None:

        def loop() -> None:
            while not self._stopping.wait(seconds):
                try:
                    step()
                except Exception as exc:  # a thread that ended would leave RQ's view stale for good
                    log.error("worker housekeeping step failed", step=name, error=repr(exc))

        self._threads.append(threading.Thread(target=loop, name=name, daemon=True))
        self._threads[-1].start()

    def tick(self) -> None:
        """State, heartbeat, suspension; the clean-ups every :data:`MAINTENANCE_SECONDS`; the summary line."""
        try:
            self.suspended = bool(is_suspended(self.connection))
            state = WorkerStatus.BUSY if self._in_flight() else WorkerStatus.IDLE
            if state != self._reported:
                self.worker.set_state(state)
                self._reported = state
            now = time.monotonic()
            if now - self._heartbeat_at >= HEARTBEAT_SECONDS:
                self._heartbeat_at = now
                self.worker.heartbeat()
            if now - self._cleaned_at >= MAINTENANCE_SECONDS and now >= self._quiet_until:
                self._cleaned_at = now
                self._maintain()
        except redis.RedisError as exc:
            if not redis_unavailable(exc):
                raise
            self.check_lost = True
            log.warning("housekeeping skipped: Redis unavailable", error=type(exc).__name__)
        self.summary()

    def summary(self, final: bool = False) -> None:
        """Every :data:`SUMMARY_SECONDS`, the INFO line of what ``smartcar_ingest_jobs_total`` gained."""
        before, since = self._summarised
        elapsed = time.monotonic() - since
        if not final and elapsed < SUMMARY_SECONDS:
            return
        jobs = _job_counts()
        counts = jobs - before  # the outcomes that gained, by how much
        if counts or final:
            log.info(
                "worker summary" if not final else "worker stopped",
                jobs=counts.total(),
                perSecond=round(counts.total() / elapsed, 1) if elapsed else 0.0,
                total=(jobs - self._first_counts).total(),
                **counts,
            )
        self._summarised = (jobs, time.monotonic())

    def _maintain(self) -> None:
        """RQ's registry clean-up, expired started entries requeued first (docs/reliability.md)."""
        queue = self.queue
        if self.scheduler is not None and not self.scheduler.running():
            # A peer's scheduler died (take over), or this worker's own did (start it again). Its own
            # while running renews the lock itself: one stuck lets the lock run out for a peer.
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
        """Stop the threads and the scheduler, hand back anything still held, deregister."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=10)
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None:
            scheduler.stop_process()
        try:
            until_redis_answers(self._release, give_up_after=RELEASE_PATIENCE_SECONDS)
        except redis.RedisError as exc:
            log.warning("left without deregistering; peers will requeue its jobs", error=type(exc).__name__)
        self._best_effort(self.worker.register_death)

    def _release(self) -> None:
        reap(self.connection, self.queue.name, {self.worker.name})
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.delete(alive_key(self.worker.name))
            pipe.srem(WORKERS_SET, self.worker.name)
            pipe.execute()

    def _beat(self) -> None:
        alive = alive_key(self.worker.name)
        # EXPIRE still works when Redis refuses writes at maxmemory; SET and SADD do not.
        if not self.connection.expire(alive, ALIVE_SECONDS):
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.set(alive, "1", ex=ALIVE_SECONDS)
                pipe.sadd(WORKERS_SET, self.worker.name)
                pipe.execute()
        if jobs := self._in_flight():
            # Its entries never expire under a live worker, however long a job waits out Redis.
            registry = StartedJobRegistry.key_template.format(self.queue.name)
            with self.connection.pipeline(transaction=False) as pipe:
                for composite, ttl in jobs:
                    pipe.zadd(registry, {composite: time.time() + ttl}, xx=True)
                    pipe.expire(Execution.from_composite_key(composite, self.connection).key, ttl)
                pipe.execute()

    def _live(self) -> None:
        try:
            self._beat()
        except redis.RedisError as exc:
            self._quiet_until = time.monotonic() + ALIVE_SECONDS + BEAT_SECONDS
            log.warning("liveness beat failed; retrying", error=type(exc).__name__)
            return
        try:
            self._recover()
        except redis.RedisError as exc:
            log.warning("could not requeue stranded jobs yet; retrying", error=type(exc).__name__)

    def _recover(self) -> None:
        """Requeue what RQ's shared list stranded and what dead workers held."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.smembers(WORKERS_SET)
            pipe.lrange(rq_intermediate_key(self.queue.name), 0, 99)
            members, shared = pipe.execute()
        now = time.monotonic()
        self._suspects = {job_id: self._suspects.get(job_id, now) for job_id in map(text, shared)}
        if overdue := [job_id for job_id, seen in self._suspects.items() if now - seen >= STRANDED_AFTER_SECONDS]:
            for job_id in return_ids(self.connection, self.queue.name, rq_intermediate_key(self.queue.name), overdue):
                log.warning("requeued a job stranded in RQ's intermediate list", jobId=job_id)
            self._suspects = {job_id: seen for job_id, seen in self._suspects.items() if job_id not in overdue}
        others = [name for name in map(text, members) if name != self.worker.name]
        if now < self._quiet_until or not others:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for name in others:
                pipe.exists(alive_key(name))
            alive = pipe.execute()
        if dead := {name for name, up in zip(others, alive, strict=True) if not up}:
            reap(self.connection, self.queue.name, dead)
            self.connection.srem(WORKERS_SET, *dead)

    @staticmethod
    def _best_effort(step: Callable[[], Any]) -> None:
        try:
            step()
        except redis.RedisError as exc:
            if not redis_unavailable(exc):
                raise
            log.warning("skipped while Redis is unavailable", error=type(exc).__name__)


class PatientScheduler(RQScheduler):
    """RQ's scheduler, waiting out Redis trouble and ending with its worker (docs/architecture.md)."""

    def work(self) -> None:
        self._install_signal_handlers()  # type: ignore[no-untyped-call]
        # The fork kept the worker loop's signal wakeup fd: the scheduler's signals would reach that loop.
        signal.set_wakeup_fd(-1)
        self._patiently(self.register_birth)
        while not self._stopping():
            if self.should_reacquire_locks:
                self._patiently(self.acquire_locks)
            self._patiently(self.heartbeat)
            self._patiently(self.enqueue_scheduled_jobs)
            time.sleep(self.interval)
        if not self._stop_requested:
            log.warning("scheduler stopping: its worker is gone")
        try:
            self.stop()  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            log.warning("scheduler stopped without releasing its locks", error=type(exc).__name__)

    def enqueue_scheduled_jobs(self) -> None:
        """RQ's, once the due ids whose job RQ cannot load have left the scheduled registries: RQ loads
        a queue's due jobs together, so one such id (a key that is not a hash, a hash that does not
        restore) failed every pass and no retry of that queue was queued again."""
        for name in self.acquired_locks:
            registry = ScheduledJobRegistry(name, connection=self.connection, serializer=self.serializer)  # type: ignore[no-untyped-call]
            for job_id in registry.get_jobs_to_schedule(current_timestamp()):
                try:
                    Job.fetch(job_id, connection=self.connection, serializer=self.serializer)
                except NoSuchJobError:
                    continue  # RQ drops the id itself
                except Exception as exc:
                    if isinstance(exc, redis.RedisError) and redis_unavailable(exc):
                        raise
                    registry.remove(job_id)
                    if self.connection.type(Job.key_for(job_id)) == b"hash":  # refused, as the worker would
                        refuse(self.connection, name, job_id, "the job's data cannot be decoded", None)
                    else:  # no job at all: its id only goes
                        log.error("dropped a scheduled id whose job key is not a hash", jobId=job_id)
        super().enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]

    def running(self) -> bool:
        """In the worker: whether the scheduler's process it forked is alive."""
        return self._process is not None and self._process.is_alive()

    def stop_process(self) -> None:
        """In the worker: SIGTERM the scheduler's process, killing it after :data:`STOP_SECONDS`."""
        if (process := self._process) is None:
            return
        process.terminate()
        process.join(STOP_SECONDS)
        if process.is_alive():
            log.warning("scheduler did not stop; killing it", pid=process.pid)
            process.kill()
            process.join()

    def _stopping(self) -> bool:  # asked to, or the worker that forked it is gone (it has another parent)
        worker = parent_process()
        return self._stop_requested or worker is None or os.getppid() != worker.pid

    def _patiently(self, step: Callable[[], object]) -> None:
        try:
            until_redis_answers(step, stop=self._stopping)
        except redis.RedisError:
            if not self._stopping():
                raise


def awaiting() -> str:
    """Where each task of the running loop waits, innermost last (``kill -USR1`` logs it)."""
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
