"""Putting back at the queue's front, without spending a retry, every job a dead worker held: its
dequeued list and its executions in RQ's started registry; the liveness
thread that finds dead workers is :mod:`workers.housekeeping`'s. Why, and what RQ would do instead:
docs/reliability.md, "Between dequeue and finish"."""

from __future__ import annotations

import time
from collections.abc import Collection

import redis
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution, ExecutionRegistry
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.utils import parse_composite_key

from core.logs import get_logger
from core.redis.functions import lua_function
from core.redis.keys import alive_key, dequeued_key, queue_key, rq_intermediate_key, text

log = get_logger("smartcar_ingest.reaper")

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


def return_from_rq_list(connection: redis.Redis, queue_name: str, job_id: str) -> bool:
    """Take ``job_id`` out of RQ's intermediate list and, if the job still waits, put it back at the
    queue's front; True when it was put back."""
    keys = [rq_intermediate_key(queue_name), queue_key(queue_name), Job.key_for(job_id)]
    return bool(_RETURN_FROM_RQ_LIST_FN.bind(connection)(keys=keys, args=[job_id]))


def requeue_execution(
    connection: redis.Redis, queue_name: str, job_id: str, execution_id: str, worker_name: str
) -> bool:
    """Drop one execution of ``job_id`` if still registered and put the job back at the queue's
    front (only while ``queued`` or ``started`` by ``worker_name``); True when it was requeued."""
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
    give_back = _GIVE_BACK_DEQUEUED_FN.bind(connection)
    for name in dead:
        for raw in give_back(keys=[dequeued_key(queue_name, name), queue_key(queue_name)]):
            job_id = text(raw)
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
