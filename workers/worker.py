"""``smartcar-ingest worker``: :class:`AsyncWorker` runs RQ jobs as coroutines on one event loop,
:func:`run_worker` is the process around it (docs/architecture.md, "The worker"; docs/reliability.md)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from functools import partial
from typing import TypeVar

import redis
import uvloop
from prometheus_client import start_http_server
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.serializers import JSONSerializer
from rq.utils import now, parse_composite_key

from core import metrics
from core.config import Settings
from core.errors import InvalidJob, TransientError
from core.logs import get_logger
from core.redis.clients import rq_redis, worker_redis
from core.redis.memory import check_memory
from core.redis.outage import redis_unavailable, until_redis_answers, until_redis_answers_async
from core.redis.queue_metrics import QueueCollector, endpoint_registry
from workers.batch import Bookkeeping, ClaimedJob
from workers.housekeeping import Housekeeping, awaiting
from workers.jobs import admit, refuse
from workers.processor import EventProcessor, open_processor
from workers.reaper import requeue

log = get_logger("smartcar_ingest.worker")
T = TypeVar("T")

#: Jobs in flight per worker process unless --concurrency says otherwise (see docs/performance.md).
DEFAULT_CONCURRENCY = 256
BATCH_SIZE = 64
#: How long finished jobs wait to be recorded together.
FLUSH_SECONDS = 0.005
#: Once stopping, how long the worker waits for Redis to record what its jobs did before it leaves.
SHUTDOWN_PATIENCE_SECONDS = 20.0
#: Seconds a blocking wait on an empty queue lasts before the loop looks around again.
IDLE_WAIT_SECONDS = 1
#: Threads for RQ's synchronous Redis steps; more steps than this wait their turn.
STEP_THREADS = 4


class Stopped(Exception):
    """A wait for Redis ended by a requested stop."""


class AsyncWorker:
    """Works one RQ queue with up to ``concurrency`` coroutine jobs in flight (module docstring)."""

    def __init__(
        self, settings: Settings, connection: redis.Redis, queue: Queue, concurrency: int = DEFAULT_CONCURRENCY
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.queue = queue
        self.concurrency = concurrency
        self.batch_size = max(1, min(BATCH_SIZE, concurrency))
        # RQ's worker object: registration, state, heartbeats, counters and failure handling.
        self.rq = SimpleWorker([queue], connection=connection, serializer=JSONSerializer)
        self.name: str = self.rq.name
        self.redis = worker_redis(settings, max_connections=16)
        self.bookkeeping = Bookkeeping(self.redis, queue.name, self.name)
        self.housekeeping = Housekeeping(self.rq, queue, lambda: [(h.composite, h.ttl) for h in self.claimed_jobs()])
        self.processor: EventProcessor  # opened on the loop, by run()
        self._clients = AsyncExitStack()
        self._in_flight: dict[str, ClaimedJob] = {}  # by execution composite key, until recorded
        self._tasks: set[asyncio.Task[None]] = set()
        self._finished: list[ClaimedJob] = []
        self._slot_free = asyncio.Event()
        self._stopping = False
        self._stopped_at: float | None = None
        self._cancelled = False
        # RQ's synchronous steps: an outage that holds them never holds the default pool (user lookups).
        self._step_threads = ThreadPoolExecutor(STEP_THREADS, thread_name_prefix="rq-step")
        self._in_flight_lock = threading.Lock()  # the liveness thread reads what the loop changes

    def claimed_jobs(self) -> list[ClaimedJob]:
        with self._in_flight_lock:
            return list(self._in_flight.values())

    def _release(self, claimed_job: ClaimedJob) -> None:
        with self._in_flight_lock:
            self._in_flight.pop(claimed_job.composite, None)

    def _stop_overdue(self) -> bool:
        waited = 0.0 if self._stopped_at is None else time.monotonic() - self._stopped_at
        return self._cancelled or waited > SHUTDOWN_PATIENCE_SECONDS

    async def _redis(self, step: Callable[[], Awaitable[T]], or_stop: bool = True) -> T:
        """``step``, waiting out Redis trouble until a stop (``or_stop``; else until it is overdue)."""
        stop: Callable[[], bool] = (lambda: self._stopping) if or_stop else self._stop_overdue
        try:
            return await until_redis_answers_async(step, stop=stop)
        except redis.RedisError as exc:
            self.housekeeping.check_lost = True
            if stop() and redis_unavailable(exc):
                raise Stopped from exc
            raise

    async def _blocking(self, step: Callable[[], T], or_stop: bool = True) -> T:
        """A synchronous step (RQ's own code), as :meth:`_redis` runs one, on a step thread."""
        loop = asyncio.get_running_loop()
        return await self._redis(lambda: loop.run_in_executor(self._step_threads, step), or_stop)

    def request_stop(self) -> None:
        """Warm shutdown on the first call; the second cancels the jobs in flight (they are put back)."""
        if self._stopping:
            self._cancelled = True
            for task in list(self._tasks):
                task.cancel()
            return
        log.info("warm shutdown: finishing the jobs in flight", inFlight=len(self._tasks))
        self._stopping = True
        self._stopped_at = time.monotonic()
        self._slot_free.set()

    async def run(self, burst: bool = False) -> None:
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGTERM: self.request_stop, signal.SIGINT: self.request_stop}
        handlers[signal.SIGUSR1] = lambda: log.warning("what the worker awaits", tasks=awaiting())
        for signum, handler in handlers.items():
            with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, handler)
        await self._blocking(lambda: self.housekeeping.start(burst))
        log.info("worker started", worker=self.name, queue=self.queue.name, concurrency=self.concurrency)
        try:
            self.processor = await open_processor(self.settings, max(10, self.concurrency * 2), self._clients)
            await self._work(burst)
        finally:
            self._stopping = True
            self._stopped_at = self._stopped_at or time.monotonic()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._flush()
            await asyncio.to_thread(self.housekeeping.stop)  # puts back what is still held
            self._step_threads.shutdown(wait=False)  # the stop checks end every wait
            await self.redis.aclose()
            await self._clients.aclose()
            self.housekeeping.summary(final=True)

    async def _work(self, burst: bool) -> None:
        while not self._stopping:
            free = self.concurrency - len(self._tasks)
            if free <= 0 or self.housekeeping.suspended:
                await self._wait_for_slot(1.0)
                continue
            try:
                if self.housekeeping.check_lost:  # here, never while a start's answer is on its way
                    await self._recover_lost_starts()
                claimed = await self._redis(partial(self.bookkeeping.claim, min(free, self.batch_size)))
                if not claimed and burst:
                    if not self._tasks:
                        return
                    await self._wait_for_slot(0.5)  # a job in flight may yet be retried: wait for it to end
                    continue
                if not claimed:  # wait on the queue itself, moving the next id into this worker's list
                    dequeued = self.bookkeeping.dequeued_key
                    await self._redis(partial(self.redis.blmove, self.queue.key, dequeued, IDLE_WAIT_SECONDS))
                    continue
            except Stopped:
                return
            await self._start(claimed)

    async def _wait_for_slot(self, seconds: float) -> None:
        self._slot_free.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot_free.wait(), timeout=seconds)

    async def _start(self, claimed: list[ClaimedJob]) -> None:
        runnable: list[ClaimedJob] = []
        refusal = partial(refuse, self.connection, self.queue.name, dequeued=self.bookkeeping.dequeued_key)
        for claimed_job in claimed:
            if claimed_job.fields:  # else deleted while queued: the start only drops its id
                claimed_job.payload = reason = admit(claimed_job, self.connection, self.settings.max_body_bytes)
                if isinstance(reason, str):
                    await self._blocking(partial(refusal, claimed_job.job_id, reason))
                    continue
            runnable.append(claimed_job)
        ttl = max((h.ttl for h in runnable), default=90)
        started = await self._redis(lambda: self.bookkeeping.start(runnable, ttl), or_stop=False)
        for claimed_job in started:
            with self._in_flight_lock:
                self._in_flight[claimed_job.composite] = claimed_job
            task = asyncio.create_task(self._run_job(claimed_job))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_free.set()

    async def _run_job(self, claimed_job: ClaimedJob) -> None:
        try:
            payload = claimed_job.payload
            if isinstance(payload, InvalidJob):
                raise payload
            # The job's RQ timeout less a margin, so that it stops itself before RQ would.
            budget = max(1.0, (claimed_job.field(b"timeout") or self.settings.job_timeout_seconds) - 5)
            ran_before = bool(claimed_job.fields.get(b"started_at"))  # then its event may be out already
            async with asyncio.timeout(budget + 15):
                result = await self.processor.process(payload, claimed_job.final_attempt, budget, ran_before)
        except asyncio.CancelledError:
            if not self._cancelled:
                raise
            await self._give_back(claimed_job, "the worker was stopped")
            return
        except Exception as exc:
            metrics.JOBS.labels(outcome="retried" if isinstance(exc, TransientError) else "error").inc()
            if redis_unavailable(exc):
                log.warning("job interrupted by Redis trouble; it will be requeued", jobId=claimed_job.job_id)
                await self._give_back(claimed_job, "Redis trouble")
            else:
                await self._fail(claimed_job, exc)
            return
        parked = result["status"] == "parked"
        metrics.JOBS.labels(outcome=f"parked_{result['reason']}" if parked else result["status"]).inc()
        claimed_job.result = result
        self._finished.append(claimed_job)
        if len(self._finished) == 1 and self.batch_size > 1:
            # The job that opens a batch records it, once the jobs that finish meanwhile have joined.
            await asyncio.sleep(FLUSH_SECONDS)
            await self._flush()
        elif len(self._finished) >= self.batch_size:
            await self._flush()

    async def _fail(self, claimed_job: ClaimedJob, exc: Exception) -> None:
        log.warning(
            "job failed", jobId=claimed_job.job_id, error=type(exc).__name__, finalAttempt=claimed_job.final_attempt
        )

        def record() -> None:
            self.connection.ping()  # RQ logs instead of raising when its pipeline fails: wait for Redis first
            job = claimed_job.job(self.connection)
            if isinstance(exc, InvalidJob):  # it would fail the same way again
                job.retries_left = 0
            job.started_at = claimed_job.started_at
            job.ended_at = now()
            execution = Execution(claimed_job.execution_id, claimed_job.job_id, self.connection, worker_name=self.name)
            execution.created_at = claimed_job.started_at or execution.created_at
            exc_string = "".join(traceback.format_exception(exc))
            self.rq.handle_job_failure(job, self.queue, exc_string=exc_string, execution=execution)

        try:
            await self._blocking(record)
        finally:
            self._release(claimed_job)

    async def _give_back(self, claimed_job: ClaimedJob, why: str) -> None:
        """Put a job back at the queue's front without spending a retry (its execution is dropped)."""
        try:
            execution = (claimed_job.job_id, claimed_job.execution_id, self.name)
            await self._blocking(partial(requeue, self.connection, self.queue.name, [execution], why), or_stop=False)
        except (redis.RedisError, Stopped) as exc:
            log.warning("job left for a peer to requeue", jobId=claimed_job.job_id, error=type(exc).__name__)
        finally:
            self._release(claimed_job)

    async def _flush(self) -> None:
        if not self._finished:
            return
        batch, self._finished = self._finished, []
        try:
            await self._redis(lambda: self.bookkeeping.finish(batch), or_stop=False)
        except (redis.RedisError, Stopped) as exc:
            # The executions stay registered under this worker: a peer's reaper re-runs them.
            log.warning("finished jobs not recorded", jobs=len(batch), error=type(exc).__name__)
        for claimed_job in batch:
            self._release(claimed_job)

    async def _recover_lost_starts(self) -> None:
        """Put back the executions recorded for this worker that it does not hold (a start's answer lost)."""
        self.housekeeping.check_lost = False
        lost = await self._redis(lambda: self.bookkeeping.lost_executions({h.composite for h in self.claimed_jobs()}))
        executions = [(*parse_composite_key(composite), self.name) for composite in lost]
        why = "its start was recorded without this worker knowing"
        await self._blocking(partial(requeue, self.connection, self.queue.name, executions, why))


def run_worker(settings: Settings, burst: bool, concurrency: int) -> None:
    """Work the ingest queue until stopped (or, with ``burst``, until it is empty)."""
    connection = rq_redis(settings, max_connections=16)
    # Start once Redis answers, so a worker started during an outage waits instead of crashing.
    until_redis_answers(connection.ping, give_up_after=300.0)
    check_memory(connection)
    queue = Queue(settings.ingest_queue, connection=connection, serializer=JSONSerializer)
    stop_metrics = start_worker_metrics(settings)
    # Startup objects out of the collector's way, young collections less often (as in the web).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        # libuv's loop: less CPU per socket event than asyncio's own
        uvloop.run(AsyncWorker(settings, connection, queue, concurrency).run(burst=burst))
    finally:
        if stop_metrics is not None:
            stop_metrics()
        connection.close()


def start_worker_metrics(settings: Settings) -> Callable[[], None] | None:
    """Serve ``/metrics`` on ``ADMIN_HOST``:``METRICS_PORT``; what stops it, or None (port 0 or taken)."""
    if settings.metrics_port == 0:
        return None
    collector = QueueCollector(settings)
    try:
        server, thread = start_http_server(
            settings.metrics_port, addr=settings.admin_host, registry=endpoint_registry(collector)
        )
    except OSError as exc:
        collector.close()
        log.warning(
            "worker metrics not served: METRICS_PORT is unavailable",
            port=settings.metrics_port,
            error=type(exc).__name__,
        )
        return None
    log.info("worker metrics served", host=settings.admin_host, port=settings.metrics_port, path="/metrics")

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        collector.close()

    return stop
