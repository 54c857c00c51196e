"""``smartcar-ingest worker``: an RQ worker that runs many ingest jobs at once.

Each enrichment spends almost all its time waiting on Smartcar, so a worker that runs one job
at a time enriches a handful of events per second. :class:`ConcurrentWorker` keeps RQ's own job
lifecycle — dequeue, execution record in the started registry, retries, results, the finished
and failed registries, worker registration for ``rq info`` — and only changes *where* a job
runs: in one of ``concurrency`` threads instead of inline. The job threads wait on coroutines
that all run on one shared event loop (:mod:`workers.runtime`), so the Smartcar calls of every
job in flight share one HTTP pool and one application token.

Shutdown: SIGTERM (or the end of a ``--burst`` run) stops dequeuing; jobs in flight finish
before the worker deregisters. A process killed harder leaves its jobs in the started
registry, from which they are re-run; the idempotent publish keeps the output to one entry
per event.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.worker import WorkerStatus

from core.config import Settings
from core.logs import get_logger
from workers import runtime
from workers.metrics_server import start_worker_metrics
from workers.reaper import Liveness, requeue

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
    """RQ's SimpleWorker, running up to ``concurrency`` jobs at once in a thread pool."""

    death_penalty_class = SelfTimedJob
    #: Seconds between worker heartbeats; RQ's loop would send one per job dequeued.
    heartbeat_interval = 5.0

    def __init__(self, *args: Any, concurrency: int = DEFAULT_CONCURRENCY, **kwargs: Any) -> None:
        # RQ's own clean-ups (expired started entries, stuck intermediate queue) every 30 s
        # instead of every 10 minutes; the liveness reaper catches dead workers within seconds.
        kwargs.setdefault("maintenance_interval", 30)
        super().__init__(*args, **kwargs)
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="job")
        self._state_lock = threading.Lock()
        self._in_dequeue = False
        self._last_heartbeat_at = 0.0
        self._liveness: Liveness | None = None

    def register_birth(self) -> None:
        super().register_birth()  # type: ignore[no-untyped-call]
        self._liveness = Liveness(self.connection, self.name, self.queue_names())
        self._liveness.start()

    def register_death(self) -> None:
        if self._liveness is not None:
            self._liveness.stop()
        super().register_death()  # type: ignore[no-untyped-call]

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """At most one worker heartbeat per :attr:`heartbeat_interval` (its TTL is minutes).

        Heartbeats inside a pipeline (job preparation) and with an explicit timeout are kept.
        """
        now = time.monotonic()
        if pipeline is None and timeout is None and now - self._last_heartbeat_at < self.heartbeat_interval:
            return
        self._last_heartbeat_at = now
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        try:
            super().heartbeat(timeout, pipeline)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("heartbeat skipped: Redis unavailable", error=type(exc).__name__)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        self._in_dequeue = True
        try:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        finally:
            self._in_dequeue = False

    def _shutdown(self) -> None:
        """Warm shutdown: stop dequeuing at once; the jobs in flight finish in :meth:`teardown`.

        RQ's own version waits while the worker is busy, which for this worker means "while any
        job runs"; it would then sit in the blocking dequeue until its timeout.
        """
        self._stop_requested = True
        self.set_shutdown_requested_date()  # type: ignore[no-untyped-call]
        if self.scheduler:
            self.stop_scheduler()  # type: ignore[no-untyped-call]
        if self._in_dequeue:
            raise StopRequested

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Start ``job`` in the pool; block the dequeue loop only while every slot is busy."""
        self._slots.acquire()
        try:
            execution = self._until_redis_answers(lambda: self.prepare_execution(job))
            self._pool.submit(self._perform, job, queue, execution)
        except BaseException:
            self._slots.release()
            raise

    # RQ's loop quits on any Redis error outside its blocking dequeue. A worker that should
    # outlive a Redis restart waits for Redis instead, in each step the loop takes.

    def _until_redis_answers(self, step: Callable[[], T]) -> T:
        return until_redis_answers(step, stop=lambda: self._stop_requested)

    def check_for_suspension(self, burst: bool) -> None:
        self._until_redis_answers(lambda: super(ConcurrentWorker, self).check_for_suspension(burst))

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("maintenance skipped: Redis unavailable", error=type(exc).__name__)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """Report busy while any job is in flight, even when the dequeue loop says idle."""
        if state == WorkerStatus.IDLE and self.executions:
            state = WorkerStatus.BUSY
        super().set_state(state, pipeline=pipeline)

    def _perform(self, job: Job, queue: Queue, execution: Any) -> None:
        try:
            self.perform_job(job, queue, execution)
        except (redis.ConnectionError, redis.TimeoutError):
            # Redis went away while RQ recorded the outcome: put the job back once it returns.
            # It may have published already; the idempotent publish keeps that to one entry.
            self._until_redis_answers(lambda: requeue(self.connection, queue, job, execution))
            log.warning("job requeued after losing Redis", jobId=job.id)
        finally:
            with self._state_lock:
                if not self.executions:
                    self.set_state(WorkerStatus.IDLE)
            self._slots.release()

    def teardown(self) -> None:
        # Let the jobs in flight finish (warm shutdown) before deregistering the worker.
        self._pool.shutdown(wait=True)
        super().teardown()  # type: ignore[no-untyped-call]


def until_redis_answers(
    step: Callable[[], T], stop: Callable[[], bool] = lambda: False, give_up_after: float | None = None
) -> T:
    """Run ``step``, retrying with backoff (0.2 s doubling to 5 s) while Redis cannot be reached.

    Gives up, re-raising the Redis error, once ``stop()`` is true or ``give_up_after`` seconds
    have passed.
    """
    deadline = None if give_up_after is None else time.monotonic() + give_up_after
    wait = 0.2
    while True:
        try:
            return step()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if stop() or (deadline is not None and time.monotonic() > deadline):
                raise
            log.warning("Redis unavailable; worker waiting", error=type(exc).__name__, retryIn=wait)
            time.sleep(wait)
            wait = min(wait * 2, 5.0)


def run_worker(settings: Settings, burst: bool = False, concurrency: int = DEFAULT_CONCURRENCY) -> bool:
    """Work the ingest queue until stopped (or, with ``burst``, until it is empty)."""
    settings.require_client_credentials()
    # Job threads, the dequeue loop and the event loop mostly wait on sockets; hand the GIL over
    # quickly when one of them wakes, instead of after the default 5 ms.
    sys.setswitchinterval(0.0005)
    current = runtime.Runtime(settings, max_connections=max(10, concurrency * 2))
    runtime.install(current)
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30)
    # Start once Redis answers, so a worker started during an outage waits instead of crashing.
    until_redis_answers(connection.ping, give_up_after=300.0)
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
