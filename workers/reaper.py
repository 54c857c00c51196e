"""Worker liveness, and putting back within seconds, without spending a retry, every job a dead
worker held: its dequeued list and its executions in RQ's started registry (:mod:`core.redis.custody`).
Why, and what RQ would do instead: docs/reliability.md, "Between dequeue and finish"."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable

import redis
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution, ExecutionRegistry
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.utils import parse_composite_key

from core.logs import get_logger
from core.redis.functions import lua_function
from core.redis.keys import ALIVE_PREFIX, WORKERS_SET, alive_key, dequeued_key, queue_key, rq_intermediate_key, text
from core.redis.outage import until_redis_answers

log = get_logger("smartcar_ingest.reaper")

__all__ = ["ALIVE_PREFIX", "ALIVE_SECONDS", "BEAT_SECONDS", "WORKERS_SET", "Liveness", "alive_key", "reap"]

BEAT_SECONDS = 2.0
ALIVE_SECONDS = 8
#: An id that has sat this long in RQ's shared intermediate list has no live worker behind it.
STRANDED_AFTER_SECONDS = 10.0
#: How long a worker leaving cleanly waits for Redis to hand back what it still holds.
RELEASE_PATIENCE_SECONDS = 5.0

_GIVE_BACK_DEQUEUED = """
-- KEYS: a worker's dequeued list, the queue. Every id goes back to the queue's front, in the
-- order the worker took them; an id already on the queue is not doubled.
local moved = {}
while true do
  local id = redis.call('RPOP', KEYS[1])
  if not id then break end
  redis.call('LREM', KEYS[2], 0, id)
  redis.call('LPUSH', KEYS[2], id)
  moved[#moved + 1] = id
end
return moved
"""
_GIVE_BACK_DEQUEUED_FN = lua_function("give_back_dequeued", _GIVE_BACK_DEQUEUED)

_REQUEUE_EXECUTION = """
-- KEYS: started registry, execution hash, the job's execution registry, the worker's execution
--       set, job hash, queue
-- ARGV: composite key, execution id, job id, name of the worker the execution belongs to
-- Drops the execution if it is still registered; requeues its job (front of the queue) when the
-- job is still waiting or still running on that worker. Returns 1 when the job was requeued.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('SREM', KEYS[4], ARGV[1])
local status = redis.call('HGET', KEYS[5], 'status')
if status == 'started' then
  if redis.call('HGET', KEYS[5], 'worker_name') ~= ARGV[4] then return 0 end
elseif status ~= 'queued' then
  return 0
end
redis.call('HSET', KEYS[5], 'status', 'queued', 'worker_name', '')
redis.call('LREM', KEYS[6], 0, ARGV[3])
redis.call('LPUSH', KEYS[6], ARGV[3])
return 1
"""
_REQUEUE_EXECUTION_FN = lua_function("requeue_execution", _REQUEUE_EXECUTION)

_RETURN_FROM_RQ_LIST = """
-- KEYS: RQ's intermediate list, the queue, the job hash. ARGV: job id.
-- Takes the id out of RQ's list; puts it back on the queue's front if the job still waits.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' then return 0 end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""
_RETURN_FROM_RQ_LIST_FN = lua_function("return_from_rq_list", _RETURN_FROM_RQ_LIST)


def give_back_dequeued(connection: redis.Redis, queue_name: str, worker_name: str) -> list[str]:
    """Move every id ``worker_name`` took from ``queue_name`` but never started back to the queue's front."""
    script = _GIVE_BACK_DEQUEUED_FN.bind(connection)
    moved = script(keys=[dequeued_key(queue_name, worker_name), queue_key(queue_name)])
    return [text(job_id) for job_id in moved]


def requeue_execution(
    connection: redis.Redis, queue_name: str, job_id: str, execution_id: str, worker_name: str
) -> bool:
    """Drop one execution of ``job_id`` if still registered and put the job back at the queue's
    front, in one atomic step; True when the job was requeued.

    The job is requeued only while it is ``queued`` or ``started`` by ``worker_name``; any other
    job only loses the stale execution.
    """
    execution = Execution(execution_id, job_id, connection)
    script = _REQUEUE_EXECUTION_FN.bind(connection)
    keys = [
        StartedJobRegistry(queue_name, connection=connection).key,
        execution.key,
        ExecutionRegistry(job_id, connection).key,
        WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name),
        Job.key_for(job_id),
        queue_key(queue_name),
    ]
    return bool(script(keys=keys, args=[execution.composite_key, execution_id, job_id, worker_name]))


def reap(connection: redis.Redis, queue_name: str, dead: Collection[str]) -> list[str]:
    """Put every job the ``dead`` workers held from ``queue_name`` back at its front; returns their ids."""
    requeued: list[str] = []
    for name in dead:
        for job_id in give_back_dequeued(connection, queue_name, name):
            requeued.append(job_id)
            log.warning("requeued a job a dead worker had dequeued", jobId=job_id, worker=name)
    registry = StartedJobRegistry(queue_name, connection=connection)
    composites = [text(raw) for raw in connection.zrange(registry.key, 0, -1)]
    if not composites:
        return requeued
    with connection.pipeline(transaction=False) as pipe:
        for composite in composites:
            pipe.hget(Execution.from_composite_key(composite, connection).key, "worker_name")
        owners = pipe.execute()
    for composite, owner in zip(composites, owners, strict=True):
        # An execution whose hash is gone has expired: sweep_expired owns it.
        if owner is None or text(owner) not in dead:
            continue
        job_id, execution_id = parse_composite_key(composite)
        if requeue_execution(connection, queue_name, job_id, execution_id, text(owner)):
            requeued.append(job_id)
            log.warning("requeued a job of a dead worker", jobId=job_id, worker=text(owner))
    return requeued


def sweep_expired(connection: redis.Redis, queue_name: str) -> list[str]:
    """Requeue jobs whose started-registry entry expired and whose worker is not alive (a live
    worker keeps its entries fresh, so an expired one means its worker is gone, announced or not)."""
    registry = StartedJobRegistry(queue_name, connection=connection)
    expired = [text(raw) for raw in connection.zrangebyscore(registry.key, "-inf", time.time(), start=0, num=1000)]
    requeued: list[str] = []
    for composite in expired:
        job_id, execution_id = parse_composite_key(composite)
        status, owner = connection.hmget(Job.key_for(job_id), ["status", "worker_name"])
        name = text(owner) if owner else ""
        if status == b"started" and name and connection.exists(alive_key(name)):
            continue  # still running on a live worker, which will refresh or settle it
        if requeue_execution(connection, queue_name, job_id, execution_id, name):
            requeued.append(job_id)
            log.warning("requeued a job whose execution expired", jobId=job_id, worker=name)
    return requeued


class Liveness:
    """A thread that keeps this worker's liveness key and jobs in flight fresh and reaps dead workers' jobs.

    ``in_flight`` returns, for each job this worker is running, its queue, execution composite
    key and started-registry TTL.
    """

    def __init__(
        self,
        connection: redis.Redis,
        worker_name: str,
        queue_names: list[str],
        in_flight: Callable[[], Iterable[tuple[str, str, int]]] = lambda: (),
    ) -> None:
        self._connection = connection
        self._name = worker_name
        self._queues = queue_names
        self._in_flight = in_flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)
        # Judge nobody until every live worker has had time to beat since this one started.
        self._quiet_until = time.monotonic() + ALIVE_SECONDS
        # Ids seen in RQ's shared intermediate list, with when this thread first saw each.
        self._suspects: dict[tuple[str, str], float] = {}

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop beating, hand back anything still held, and say goodbye.

        If Redis cannot be reached in time the worker stays announced: its liveness key expires
        and a peer puts back what it held, as for a crash.
        """
        self._stop.set()
        self._thread.join(timeout=10)

        def release() -> None:
            for queue_name in self._queues:
                reap(self._connection, queue_name, {self._name})
            with self._connection.pipeline(transaction=False) as pipe:
                pipe.delete(alive_key(self._name))
                pipe.srem(WORKERS_SET, self._name)
                pipe.execute()

        try:
            until_redis_answers(release, give_up_after=RELEASE_PATIENCE_SECONDS)
        except redis.RedisError as exc:
            log.warning("left without deregistering; peers will requeue its jobs", error=type(exc).__name__)

    @property
    def quiet(self) -> bool:
        """True while this worker should not judge others (just started, or Redis just came back)."""
        return time.monotonic() < self._quiet_until

    def _beat(self) -> None:
        # EXPIRE still works when Redis refuses writes at maxmemory; SET and SADD do not.
        if not self._connection.expire(alive_key(self._name), ALIVE_SECONDS):
            with self._connection.pipeline(transaction=False) as pipe:
                pipe.set(alive_key(self._name), "1", ex=ALIVE_SECONDS)
                pipe.sadd(WORKERS_SET, self._name)
                pipe.execute()
        jobs = list(self._in_flight())
        if jobs:
            # Keep RQ's view true while this worker lives: its entries never expire under it,
            # however long a job waits out a Redis outage.
            now = time.time()
            with self._connection.pipeline(transaction=False) as pipe:
                for queue_name, composite, ttl in jobs:
                    registry = StartedJobRegistry.key_template.format(queue_name)
                    pipe.zadd(registry, {composite: now + ttl}, xx=True)
                    pipe.expire(Execution.from_composite_key(composite, self._connection).key, ttl)
                pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(BEAT_SECONDS):
            try:
                self._beat()
            except redis.RedisError as exc:
                self._quiet_until = time.monotonic() + ALIVE_SECONDS + BEAT_SECONDS
                log.warning("liveness beat failed; retrying", error=type(exc).__name__)
                continue
            try:
                self._recover()
            except redis.RedisError as exc:
                log.warning("could not requeue stranded jobs yet; retrying", error=type(exc).__name__)

    def _recover(self) -> None:
        names, shared = self._look()
        for queue_name, ids in shared.items():
            self._return_from_rq_list(queue_name, ids)
        if self.quiet:
            return
        dead = self._dead(names)
        if not dead:
            # The common case: every announced worker is alive, so no started job can be
            # abandoned and the registries need not be read at all.
            return
        for queue_name in self._queues:
            reap(self._connection, queue_name, dead)
        with self._connection.pipeline(transaction=False) as pipe:
            pipe.srem(WORKERS_SET, *dead)
            pipe.execute()

    def _look(self) -> tuple[list[str], dict[str, list[str]]]:
        """The announced workers, and the ids in each queue's shared RQ list (one round trip)."""
        with self._connection.pipeline(transaction=False) as pipe:
            pipe.smembers(WORKERS_SET)
            for queue_name in self._queues:
                pipe.lrange(rq_intermediate_key(queue_name), 0, 99)
            members, *lists = pipe.execute()
        names = [text(raw) for raw in members]
        shared = {q: [text(raw) for raw in ids] for q, ids in zip(self._queues, lists, strict=True)}
        return names, shared

    def _dead(self, names: list[str]) -> set[str]:
        """Announced workers, other than this one, whose liveness key has expired."""
        others = [name for name in names if name != self._name]
        if not others:
            return set()
        with self._connection.pipeline(transaction=False) as pipe:
            for name in others:
                pipe.exists(alive_key(name))
            alive = pipe.execute()
        return {name for name, up in zip(others, alive, strict=True) if not up}

    def _return_from_rq_list(self, queue_name: str, ids: list[str]) -> None:
        """Put back ids that have sat in RQ's shared list across beats for :data:`STRANDED_AFTER_SECONDS`."""
        now = time.monotonic()
        for key in [key for key in self._suspects if key[0] == queue_name and key[1] not in ids]:
            del self._suspects[key]
        if not ids:
            return
        script = _RETURN_FROM_RQ_LIST_FN.bind(self._connection)
        for job_id in ids:
            first_seen = self._suspects.setdefault((queue_name, job_id), now)
            if now - first_seen < STRANDED_AFTER_SECONDS:
                continue
            keys = [rq_intermediate_key(queue_name), queue_key(queue_name), Job.key_for(job_id)]
            if script(keys=keys, args=[job_id]):
                log.warning("requeued a job stranded in RQ's intermediate list", jobId=job_id)
            self._suspects.pop((queue_name, job_id), None)
