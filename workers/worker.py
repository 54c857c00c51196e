"""``smartcar-ingest worker``: an RQ worker that runs many ingest jobs at once.

Each enrichment spends almost all its time waiting on Smartcar, so a worker that runs one job
at a time enriches a handful of events per second. :class:`ConcurrentWorker` keeps RQ's own job
lifecycle — execution record in the started registry, retries, results, the finished and failed
registries, worker registration for ``rq info`` — and changes *where* a job runs: in one of
``concurrency`` threads instead of inline. The job threads wait on coroutines that all run on one
shared event loop (:mod:`workers.runtime`), so the Smartcar calls of every job in flight share one
HTTP pool and one application token.

No acknowledged event is left behind (docs/reliability.md):

* The dequeue moves each job id into this worker's own list (:mod:`core.redis.custody`) instead of
  RQ's shared intermediate list, and only once a thread slot is free, so a dequeued job starts
  at once. The id leaves that list in the same transaction that records the job's execution.
  Whatever a dead worker held is put back at the front of the queue by its peers' reapers
  (:mod:`workers.reaper`), without spending a retry; a dequeue whose answer Redis lost is found
  in the list by the worker itself.
* Redis trouble — down, restarting, loading its AOF, out of memory, read-only — is waited out at
  every step of RQ's loop (:mod:`core.redis.outage`), never a reason to quit. A job interrupted by it
  is put back on the queue once Redis answers, not failed and not charged a retry.

Shutdown: SIGTERM (or the end of a ``--burst`` run) stops dequeuing; jobs in flight finish; what
the worker still holds goes back to the queue before it deregisters.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from rq import Queue, SimpleWorker, worker_registration
from rq.exceptions import NoSuchJobError, StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.registry import clean_registries
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.utils import now
from rq.worker import WorkerStatus

from core.config import Settings
from core.logs import get_logger
from core.redis.clients import rq_redis
from core.redis.keys import dequeued_key, text
from core.redis.memory import warn_without_maxmemory
from core.redis.outage import redis_unavailable, until_redis_answers
from workers import runtime
from workers.admission import refusal_reason, refuse, refuse_unreadable
from workers.drill import DRILL_HALT_ENV, DrillHalt
from workers.metrics_server import start_worker_metrics
from workers.reaper import Liveness, requeue_execution, sweep_expired
from workers.scheduler import PatientScheduler

log = get_logger("smartcar_ingest.worker")
T = TypeVar("T")

#: Jobs in flight per worker process unless --concurrency says otherwise (see docs/performance.md).
DEFAULT_CONCURRENCY = 64


class SelfTimedJob(BaseDeathPenalty):
    """No external kill: ``process_event`` stops itself before the job's timeout.

    RQ's signal-based penalty only works in the main thread, and its timer-based one starts a
    thread per job. The job function instead bounds its own work at the job's timeout minus a
    margin (:func:`workers.jobs.process_event`), well inside the started-registry heartbeat of
    timeout + 60 s, so RQ's view of the job stays true without either.
    """

    def setup_death_penalty(self) -> None:
        return None

    def cancel_death_penalty(self) -> None:
        return None


class ConcurrentWorker(SimpleWorker):
    """RQ's SimpleWorker on one queue, running up to ``concurrency`` jobs at once in a thread pool."""

    death_penalty_class = SelfTimedJob
    #: Seconds between worker heartbeats; RQ's loop would send one per job dequeued.
    heartbeat_interval = 5.0

    def __init__(self, *args: Any, concurrency: int = DEFAULT_CONCURRENCY, **kwargs: Any) -> None:
        # RQ's registry clean-ups every 30 s instead of every 10 minutes; the liveness reaper
        # catches dead workers within seconds.
        kwargs.setdefault("maintenance_interval", 30)
        super().__init__(*args, **kwargs)
        if len(self.queues) != 1:
            raise ValueError("a ConcurrentWorker works exactly one queue")
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="job")
        self._state_lock = threading.Lock()
        self._in_dequeue = False
        self._last_heartbeat_at = 0.0
        self._liveness: Liveness | None = None
        # Jobs in flight, by execution id: (queue, execution composite key, started-registry TTL).
        self._in_flight: dict[str, tuple[str, str, int]] = {}
        # Jobs whose run Redis trouble interrupted: requeued, never failed.
        self._lost_to_redis: set[str] = set()
        # Look in this worker's own list before taking a new job. A move that Redis applied but
        # whose answer was lost (Redis restarted under it; the client may even have retried the
        # move and taken the next job) leaves an id there that this worker does not hold: it is
        # noticed at start, after a Redis error, when the list is not empty once a job's
        # execution is recorded, and whenever the queue is idle.
        self._check_dequeued = True
        self._halt = DrillHalt(os.environ.get(DRILL_HALT_ENV))

    @property
    def dequeued_key(self) -> str:
        return dequeued_key(self.queues[0].name, self.name)

    # --- registration, state and heartbeats: wait out Redis, or skip what is only reporting ---

    def register_birth(self) -> None:
        attempts = 0

        def birth() -> None:
            nonlocal attempts
            attempts += 1
            try:
                super(ConcurrentWorker, self).register_birth()  # type: ignore[no-untyped-call]
            except ValueError:
                if attempts == 1:
                    raise  # another live worker has this name
                # An earlier attempt was applied before Redis went away: registered already.

        self._until_redis_answers(birth)
        self._liveness = Liveness(
            self.connection, self.name, self.queue_names(), in_flight=lambda: list(self._in_flight.values())
        )
        self._until_redis_answers(self._liveness.start)

    def register_death(self) -> None:
        if self._liveness is not None:
            self._liveness.stop()
        self._best_effort(lambda: super(ConcurrentWorker, self).register_death())  # type: ignore[no-untyped-call]

    def subscribe(self) -> None:
        self._until_redis_answers(lambda: super(ConcurrentWorker, self).subscribe())  # type: ignore[no-untyped-call]

    def unsubscribe(self) -> None:
        self._best_effort(lambda: super(ConcurrentWorker, self).unsubscribe())  # type: ignore[no-untyped-call]

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """Report busy while any job is in flight, even when the dequeue loop says idle.

        Only reporting (``rq info``): skipped while Redis is unavailable.
        """
        if state == WorkerStatus.IDLE and self.executions:
            state = WorkerStatus.BUSY
        if pipeline is not None:
            super().set_state(state, pipeline=pipeline)
            return
        self._state = state
        self._best_effort(lambda: super(ConcurrentWorker, self).set_state(state))

    def set_shutdown_requested_date(self) -> None:
        self._best_effort(lambda: super(ConcurrentWorker, self).set_shutdown_requested_date())  # type: ignore[no-untyped-call]

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """At most one worker heartbeat per :attr:`heartbeat_interval` (its TTL is minutes).

        Heartbeats inside a pipeline (job preparation) and with an explicit timeout are kept.
        """
        now_ = time.monotonic()
        if pipeline is None and timeout is None and now_ - self._last_heartbeat_at < self.heartbeat_interval:
            return
        self._last_heartbeat_at = now_
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        self._best_effort(lambda: super(ConcurrentWorker, self).heartbeat(timeout))

    def check_for_suspension(self, burst: bool) -> None:
        self._until_redis_answers(lambda: super(ConcurrentWorker, self).check_for_suspension(burst))

    # --- the loop: maintenance, scheduler, dequeue, start ---

    def run_maintenance_tasks(self) -> None:
        if self._liveness is not None and self._liveness.quiet:
            return  # just started, or Redis just came back: let every live worker beat first
        try:
            super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            if not redis_unavailable(exc):
                raise
            self.last_cleaned_at = now()  # type: ignore[assignment]  # next interval, not every turn
            log.warning("maintenance skipped: Redis unavailable", error=type(exc).__name__)

    def clean_registries(self) -> None:
        """RQ's registry clean-up, changed in three ways.

        Expired started entries are requeued (:func:`~workers.reaper.sweep_expired`) before RQ
        would retry or fail them; RQ's intermediate-list pass is left out (the reaper owns those
        ids, without spending a retry); and the lock lasts one interval, so a pass that Redis cut
        short does not stop every worker's clean-up for RQ's 15 minutes.
        """
        for queue in self.queues:
            lock = queue.registry_cleaning_key
            if not self.connection.set(lock, self.name, nx=True, ex=max(1, int(self.maintenance_interval))):
                continue
            try:
                sweep_expired(self.connection, queue.name)
                clean_registries(queue, self._exc_handlers)
                worker_registration.clean_worker_registry(queue)
            finally:
                with contextlib.suppress(redis.RedisError):
                    self.connection.delete(lock)
        self.last_cleaned_at = now()  # type: ignore[assignment]

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = "%H:%M:%S",
        log_format: str = "%(asctime)s %(message)s",
    ) -> None:
        """RQ's scheduler (it moves jobs whose retry interval elapsed back onto the queue), in a
        process that waits out Redis trouble instead of ending (:class:`PatientScheduler`)."""
        self.scheduler = PatientScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        scheduler = self.scheduler
        self._until_redis_answers(scheduler.acquire_locks)
        if not scheduler.acquired_locks:
            return
        if not burst:
            scheduler.start()  # type: ignore[no-untyped-call]
            return
        try:
            self._until_redis_answers(scheduler.register_birth)
            self._until_redis_answers(scheduler.enqueue_scheduled_jobs)
        finally:
            self._best_effort(scheduler.release_locks)
            self._best_effort(scheduler.register_death)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """Wait for a free slot, then take the next job (None in burst mode once the queue is empty).

        Taking the slot first means a dequeued job never waits in this process for one.
        """
        while not self._slots.acquire(timeout=1.0):
            if self._stop_requested:
                raise StopRequested
        self._in_dequeue = True
        try:
            result = self._dequeue(timeout)
        except BaseException:
            self._slots.release()
            raise
        finally:
            self._in_dequeue = False
        if result is None:
            self._slots.release()
        return result

    def _dequeue(self, timeout: int | None) -> tuple[Job, Queue] | None:
        queue = self.queues[0]
        self.set_state(WorkerStatus.IDLE)
        self.procline(f"Listening on {queue.name}")  # type: ignore[no-untyped-call]
        # Redis trouble is waited out for as long as it lasts. SIGTERM ends the wait: its handler
        # raises StopRequested while this runs, from inside the wait's sleep too.
        return self._until_redis_answers(lambda: self._next_job(queue, timeout))

    def _next_job(self, queue: Queue, timeout: int | None) -> tuple[Job, Queue] | None:
        """Heartbeats and maintenance while waiting for the next job (None: burst mode, queue empty)."""
        try:
            while True:
                self.heartbeat()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                job_id = self._take(queue, timeout)
                if job_id is None:
                    if timeout is None:
                        return None  # burst mode: the queue is empty
                    continue
                self._halt.reach("dequeued")
                job = self._fetch(queue, job_id)
                if job is not None:
                    return job, queue
        except redis.RedisError as exc:
            if redis_unavailable(exc):
                self._check_dequeued = True  # the move may have been applied with its answer lost
            raise

    def _take(self, queue: Queue, timeout: int | None) -> str | None:
        """The next job id, moved from the queue into this worker's list (or found there)."""
        if self._check_dequeued:
            held = self.connection.lindex(self.dequeued_key, 0)
            if held is not None:
                log.warning("resuming a job this worker had dequeued", jobId=text(held))
                return text(held)
            self._check_dequeued = False
        if timeout is None:
            moved = self.connection.lmove(queue.key, self.dequeued_key, "LEFT", "RIGHT")
        else:
            # Wake at least once per maintenance interval, so clean-ups run on an idle queue too.
            wait = max(1, min(timeout, int(self.maintenance_interval)))
            moved = self.connection.blmove(queue.key, self.dequeued_key, wait, "LEFT", "RIGHT")
        if moved is None:
            moved = self.connection.lindex(self.dequeued_key, 0)  # idle: nothing lost in the list?
        return None if moved is None else text(moved)

    def _fetch(self, queue: Queue, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.connection, serializer=self.serializer)
        except NoSuchJobError:
            self.connection.lrem(self.dequeued_key, 1, job_id)  # deleted while queued: nothing to run
        except redis.RedisError:
            raise
        except Exception:  # a hash RQ cannot load is refused like any job this worker will not run
            self._until_redis_answers(lambda: refuse_unreadable(self.connection, queue, job_id, self.dequeued_key))
            log.error("refused a job whose hash cannot be read", jobId=job_id)
        return None

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Start ``job`` in the pool, on the slot taken before it was dequeued.

        A job that is not an ingest job (:func:`refusal_reason`) is never run: it goes straight to
        the failed registry, its function never imported.
        """
        reason = refusal_reason(job)
        if reason is not None:
            try:
                self._until_redis_answers(lambda: refuse(self.connection, queue, job, reason, self.dequeued_key))
            finally:
                self._slots.release()
            log.error("refused a job that is not an ingest job", jobId=job.id, reason=reason)
            return
        try:
            execution = self._until_redis_answers(lambda: self.prepare_execution(job))
            self._halt.reach("prepared")
            self._pool.submit(self._perform, job, queue, execution)
        except BaseException:
            self._slots.release()
            raise

    def prepare_execution(self, job: Job) -> Execution:
        """Record the job's execution and take its id out of this worker's list, in one transaction,
        so that at every instant one of the two names the worker answering for it."""
        ttl = self.get_heartbeat_ttl(job)
        with self.connection.pipeline() as pipe:
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
            pipe.lrem(self.dequeued_key, 1, job.id)
            pipe.llen(self.dequeued_key)
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            *_, left, _ = pipe.execute()
        # The main loop holds one id at a time: anything else in the list is a lost answer.
        self._check_dequeued = self._check_dequeued or bool(left)
        self.executions[execution.id] = execution
        self._in_flight[execution.id] = (job.origin, execution.composite_key, ttl)
        return execution

    # --- a job's thread ---

    def _perform(self, job: Job, queue: Queue, execution: Execution) -> None:
        settled = False
        try:
            settled = self.perform_job(job, queue, execution)
        except Exception as exc:  # RQ's bookkeeping after the job met Redis trouble
            log.warning("job outcome not recorded", jobId=job.id, error=type(exc).__name__)
        try:
            # A job that did not end cleanly may not have had its outcome recorded: Redis decides.
            # Its execution still registered means nothing was recorded, and it is put back.
            if not settled or job.id in self._lost_to_redis:
                self._lost_to_redis.discard(job.id)
                self._give_back(queue, job, execution)
        finally:
            self.executions.pop(execution.id, None)
            self._in_flight.pop(execution.id, None)
            with self._state_lock:
                if not self.executions:
                    self.set_state(WorkerStatus.IDLE)
            self._slots.release()

    def _give_back(self, queue: Queue, job: Job, execution: Execution) -> None:
        try:
            requeued = self._until_redis_answers(
                lambda: requeue_execution(self.connection, queue.name, job.id, execution.id, self.name)
            )
        except (StopRequested, redis.RedisError) as exc:
            # Shutting down with Redis away: a peer requeues it once this worker's liveness key expires.
            log.warning("job left for a peer to requeue", jobId=job.id, error=type(exc).__name__)
            return
        if requeued:
            log.warning("job requeued after Redis trouble", jobId=job.id)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """A job stopped by Redis trouble did not fail: it is requeued once Redis answers."""
        error = exc_info[1] if len(exc_info) > 1 else None
        if isinstance(error, BaseException) and redis_unavailable(error):
            self._lost_to_redis.add(job.id)
            log.warning(
                "job interrupted by Redis trouble; it will be requeued", jobId=job.id, error=type(error).__name__
            )
            return
        super().handle_exception(job, *exc_info)

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        if job.id in self._lost_to_redis:
            return  # not the job's failure: _perform requeues it, without spending a retry
        super().handle_job_failure(
            job, queue, started_job_registry=started_job_registry, exc_string=exc_string, execution=execution
        )

    def _shutdown(self) -> None:
        """Warm shutdown: stop dequeuing at once; the jobs in flight finish in :meth:`teardown`.

        RQ's own version waits while the worker is busy, which for this worker means "while any
        job runs"; it would then sit in the blocking dequeue until its timeout.
        """
        self._stop_requested = True
        self.set_shutdown_requested_date()
        if self.scheduler:
            self.stop_scheduler()  # type: ignore[no-untyped-call]
        if self._in_dequeue:
            raise StopRequested

    def teardown(self) -> None:
        # Let the jobs in flight finish (warm shutdown) before deregistering the worker.
        self._pool.shutdown(wait=True)
        super().teardown()  # type: ignore[no-untyped-call]

    # --- waiting out Redis ---

    def _until_redis_answers(self, step: Callable[[], T]) -> T:
        """``step``, waiting out Redis trouble for as long as it lasts; once a stop is requested,
        StopRequested instead of another wait."""
        try:
            return until_redis_answers(step, stop=lambda: self._stop_requested)
        except redis.RedisError as exc:
            if self._stop_requested and redis_unavailable(exc):
                raise StopRequested from exc
            raise

    def _best_effort(self, step: Callable[[], object]) -> None:
        """``step`` once, skipped with a warning while Redis is unavailable."""
        try:
            step()
        except redis.RedisError as exc:
            if not redis_unavailable(exc):
                raise
            log.warning("skipped while Redis is unavailable", error=type(exc).__name__)


def run_worker(settings: Settings, burst: bool = False, concurrency: int = DEFAULT_CONCURRENCY) -> bool:
    """Work the ingest queue until stopped (or, with ``burst``, until it is empty)."""
    settings.require_client_credentials()
    # Job threads, the dequeue loop and the event loop mostly wait on sockets; hand the GIL over
    # quickly when one of them wakes, instead of after the default 5 ms.
    sys.setswitchinterval(0.0005)
    current = runtime.Runtime(settings, max_connections=max(10, concurrency * 2))
    runtime.install(current)
    # RQ's bookkeeping runs in every job thread at once, besides the dequeue loop, the liveness
    # thread and the scheduler: redis-py's default pool (100) would run dry past 100 jobs in flight,
    # and its MaxConnectionsError would pass for Redis trouble and requeue jobs for nothing.
    connection = rq_redis(settings, max_connections=concurrency + 16)
    # Start once Redis answers, so a worker started during an outage waits instead of crashing.
    until_redis_answers(connection.ping, give_up_after=300.0)
    warn_without_maxmemory(connection)
    queue = Queue(settings.ingest_queue, connection=connection, serializer=JSONSerializer)
    worker = ConcurrentWorker([queue], connection=connection, serializer=JSONSerializer, concurrency=concurrency)
    metrics_server = start_worker_metrics(settings)
    # As in the web: startup objects out of the collector's way, young collections less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        # The scheduler moves jobs whose retry interval elapsed back onto the queue.
        return bool(worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level))
    finally:
        if metrics_server is not None:
            metrics_server.close()
        runtime.install(None)
        current.close()
        connection.close()
