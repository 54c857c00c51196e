"""Fast recovery of jobs whose worker died.

RQ notices an abandoned job only once its started-registry entry expires (the job timeout plus
a minute) and the next maintenance pass runs; without retries left it then lands in the failed
registry. Smartcar stops redelivering about three minutes after the first attempt, so that is
too slow to be the only net.

Every :class:`~workers.worker.ConcurrentWorker` keeps a short-lived liveness key
(``smartcar-ingest:worker-alive:<name>``, refreshed every :data:`BEAT_SECONDS`, expiring after
:data:`ALIVE_SECONDS`) and, on the same beat, looks for started jobs whose worker has announced
itself but whose liveness key is gone. Such a job is put back at the front of its queue in one
transaction with the removal of its execution record, without spending one of its retries:
being killed is not the job's failure. A job re-run this way may already have published; the
idempotent publish keeps the output stream to one entry.

A worker that merely stalls past :data:`ALIVE_SECONDS` may see its job re-run while it is still
running: the same at-least-once trade, resolved the same way.
"""

from __future__ import annotations

import threading

import redis
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from core.logs import get_logger

log = get_logger("smartcar_ingest.reaper")

ALIVE_PREFIX = "smartcar-ingest:worker-alive:"
WORKERS_SET = "smartcar-ingest:liveness-workers"
BEAT_SECONDS = 2.0
ALIVE_SECONDS = 8


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def alive_key(worker_name: str) -> str:
    return ALIVE_PREFIX + worker_name


def reap_abandoned(connection: redis.Redis, queue_name: str, holders: set[str] | None = None) -> list[str]:
    """Requeue started jobs of ``queue_name`` whose worker stopped beating; returns their ids.

    ``holders``, when given, collects the names of live workers still holding started jobs.
    """
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    registry = StartedJobRegistry(queue_name, connection=connection, serializer=JSONSerializer)
    announced = {_text(name) for name in connection.smembers(WORKERS_SET)}
    requeued: list[str] = []
    for raw in connection.zrange(registry.key, 0, -1):
        composite = _text(raw)
        execution = Execution.from_composite_key(composite, connection)
        worker_name = connection.hget(execution.key, "worker_name")
        if worker_name is None:
            continue  # execution already gone: RQ's own cleanup owns this entry
        name = _text(worker_name)
        if name not in announced or connection.exists(alive_key(name)):
            if holders is not None:
                holders.add(name)
            continue
        # Only one reaper handles a given execution, however many workers look at once.
        if not connection.set(f"smartcar-ingest:reaped:{composite}", name, nx=True, ex=600):
            continue
        try:
            job = Job.fetch(execution.job_id, connection=connection, serializer=JSONSerializer)
        except Exception:  # the job hash expired or was deleted: nothing left to re-run
            connection.zrem(registry.key, composite)
            continue
        if job.get_status(refresh=False) != JobStatus.STARTED:
            continue
        requeue(connection, queue, job, execution)
        requeued.append(job.id)
        log.warning("requeued a job of a dead worker", jobId=job.id, worker=name)
    return requeued


def requeue(connection: redis.Redis, queue: Queue, job: Job, execution: Execution) -> None:
    """Put ``job`` back at the front of ``queue`` and drop its execution record, in one transaction.

    No retry is spent: the job did not fail, its worker went away (or lost Redis) under it.
    """
    registry = StartedJobRegistry(queue.name, connection=connection, serializer=JSONSerializer)
    with connection.pipeline() as pipe:
        pipe.delete(execution.key)
        pipe.zrem(registry.key, execution.composite_key)
        pipe.hset(job.key, mapping={"status": JobStatus.QUEUED.value, "worker_name": ""})
        pipe.lrem(queue.key, 0, job.id)
        pipe.lpush(queue.key, job.id)
        pipe.execute()


class Liveness:
    """A thread that keeps this worker's liveness key fresh and reaps dead workers' jobs."""

    def __init__(self, connection: redis.Redis, worker_name: str, queue_names: list[str]) -> None:
        self._connection = connection
        self._name = worker_name
        self._queues = queue_names
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> None:
        self._beat()
        self._connection.sadd(WORKERS_SET, self._name)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and say goodbye, so nobody mistakes a clean exit for a death."""
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self._connection.delete(alive_key(self._name))
            self._connection.srem(WORKERS_SET, self._name)
        except redis.RedisError:
            pass

    def _beat(self) -> None:
        self._connection.set(alive_key(self._name), "1", ex=ALIVE_SECONDS)

    def _run(self) -> None:
        while not self._stop.wait(BEAT_SECONDS):
            try:
                self._beat()
                dead = self._dead_workers()
                if not dead:
                    # The common case: every announced worker is alive, so no started job can
                    # be abandoned and the registries need not be read at all.
                    continue
                holders: set[str] = set()
                for queue_name in self._queues:
                    reap_abandoned(self._connection, queue_name, holders)
                # A dead worker is forgotten once none of its jobs is left in a started registry.
                gone = [name for name in dead if name not in holders]
                if gone:
                    self._connection.srem(WORKERS_SET, *gone)
            except redis.RedisError as exc:
                log.warning("liveness beat failed; retrying", error=type(exc).__name__)

    def _dead_workers(self) -> list[str]:
        """Announced workers whose liveness key has expired (one round trip for all of them)."""
        names = [_text(raw) for raw in self._connection.smembers(WORKERS_SET)]
        if not names:
            return []
        with self._connection.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(alive_key(name))
            alive = pipe.execute()
        return [name for name, up in zip(names, alive, strict=True) if not up]
