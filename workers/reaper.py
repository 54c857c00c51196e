"""Putting back at the queue's front, without spending a retry, every job a dead worker held: its
dequeued list and its executions in RQ's started registry; the liveness
thread that finds dead workers is :mod:`workers.housekeeping`'s. Why, and what RQ would do instead:
docs/reliability.md, "Between dequeue and finish"."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable

import redis
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution, ExecutionRegistry
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.utils import parse_composite_key

from core.logs import get_logger
from core.redis.functions import lua_function
from core.redis.keys import alive_key, dequeued_key, queue_key, rq_intermediate_key, text
from workers.batch import EXECUTION_PREFIX, JOB_PREFIX

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

_REQUEUE = """
-- KEYS: started registry, the queue
-- ARGV: job key prefix, execution key prefix, execution registry key prefix, then per execution:
--       job id, execution id, name of the worker it belongs to, that worker's execution set
-- Drops each execution still registered; puts its job back at the queue's front when the job is
-- still waiting, or still running on that worker. Returns the ids put back.
local requeued = {}
for i = 4, #ARGV, 4 do
  local id, ex, worker = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local composite = id .. ':' .. ex
  if redis.call('ZREM', KEYS[1], composite) == 1 then
    redis.call('DEL', ARGV[2] .. composite)
    redis.call('ZREM', ARGV[3] .. id, ex)
    redis.call('SREM', ARGV[i + 3], composite)
    local job = ARGV[1] .. id
    local status = redis.call('HGET', job, 'status')
    if status == 'queued' or (status == 'started' and redis.call('HGET', job, 'worker_name') == worker) then
      redis.call('HSET', job, 'status', 'queued', 'worker_name', '')
      redis.call('LREM', KEYS[2], 0, id)
      redis.call('LPUSH', KEYS[2], id)
      requeued[#requeued + 1] = id
    end
  end
end
return requeued
"""
_REQUEUE_FN = lua_function("requeue_executions", _REQUEUE)

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


def requeue(connection: redis.Redis, queue_name: str, executions: Iterable[tuple[str, str, str]]) -> list[str]:
    """Drop each (job id, execution id, worker name) execution still registered, and put its job back
    at the queue's front while ``queued`` or ``started`` by that worker; returns the ids put back."""
    args = [JOB_PREFIX, EXECUTION_PREFIX, ExecutionRegistry.key_template.format("")]
    for job_id, execution_id, worker_name in executions:
        args += [job_id, execution_id, worker_name, WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name)]
    if len(args) == 3:
        return []
    keys = [StartedJobRegistry.key_template.format(queue_name), queue_key(queue_name)]
    return [text(raw) for raw in _REQUEUE_FN.bind(connection)(keys=keys, args=args)]


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
        owners = [text(owner) if owner else "" for owner in pipe.execute()]
    # An execution whose hash is gone has expired: sweep_expired owns it.
    held = {parse_composite_key(c): owner for c, owner in zip(composites, owners, strict=True) if owner in dead}
    owner_of = {job_id: owner for (job_id, _), owner in held.items()}
    for job_id in requeue(connection, queue_name, [(*execution, owner) for execution, owner in held.items()]):
        requeued.append(job_id)
        log.warning("requeued a job of a dead worker", jobId=job_id, worker=owner_of[job_id])
    return requeued


def sweep_expired(connection: redis.Redis, queue_name: str) -> list[str]:
    """Requeue jobs whose started-registry entry expired and whose worker is not alive (a live
    worker keeps its entries fresh, so an expired one means its worker is gone, announced or not)."""
    registry = StartedJobRegistry(queue_name, connection=connection)
    expired = [text(raw) for raw in connection.zrangebyscore(registry.key, "-inf", time.time(), start=0, num=1000)]
    gone: list[tuple[str, str, str]] = []
    for composite in expired:
        job_id, execution_id = parse_composite_key(composite)
        status, owner = connection.hmget(Job.key_for(job_id), ["status", "worker_name"])
        name = text(owner) if owner else ""
        if status == b"started" and name and connection.exists(alive_key(name)):
            continue  # still running on a live worker, which will refresh or settle it
        gone.append((job_id, execution_id, name))
    requeued = requeue(connection, queue_name, gone)
    owner_of = {job_id: name for job_id, _, name in gone}
    for job_id in requeued:
        log.warning("requeued a job whose execution expired", jobId=job_id, worker=owner_of[job_id])
    return requeued
