"""Putting back at the queue's front, without spending a retry, what a dead worker held (its dequeued
list, its executions): docs/reliability.md, "Between dequeue and finish"."""

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
from core.redis.keys import alive_key, dequeued_key, queue_key, text
from workers.batch import EXECUTION_PREFIX, JOB_PREFIX

log = get_logger("smartcar_ingest.reaper")

_RETURN_IDS = """
-- KEYS: a list of ids taken off the queue (a worker's dequeued list, RQ's intermediate list), the queue
-- ARGV: job key prefix, then the ids to take out of the list (none: every id in it). Each id taken
-- out goes back to the queue's front (in the list's order, never doubled) while its job is queued.
-- An id leaves the list last: a queue Redis refuses (not a list) stops the call with the id still
-- held, for the next reap.
local ids = #ARGV > 1 and {unpack(ARGV, 2)} or redis.call('LRANGE', KEYS[1], 0, -1)
local moved = {}
for i = #ids, 1, -1 do
  local id = ids[i]
  if redis.call('LPOS', KEYS[1], id) then
    -- pcall: a job key that is not a hash (an error, never 'queued') holds no job; its id is dropped
    if redis.pcall('HGET', ARGV[1] .. id, 'status') == 'queued' then
      redis.call('LREM', KEYS[2], 0, id)
      redis.call('LPUSH', KEYS[2], id)
      table.insert(moved, 1, id)
    end
    redis.call('LREM', KEYS[1], 1, id)
  end
end
return moved
"""
_RETURN_IDS_FN = lua_function("return_ids", _RETURN_IDS)

_REQUEUE = """
-- KEYS: started registry, the queue
-- ARGV: job key prefix, execution key prefix, execution registry key prefix, then per execution:
--       job id, execution id, name of the worker it belongs to, that worker's execution set
-- Drops each execution still registered; puts its job back at the queue's front when the job is
-- still waiting, or still running on that worker. Returns the ids put back.
-- The job goes back on the queue before anything else is written: a queue Redis refuses (not a
-- list) stops the call with the execution still registered, for the next reap.
local requeued = {}
for i = 4, #ARGV, 4 do
  local id, ex, worker = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local composite = id .. ':' .. ex
  if redis.call('ZSCORE', KEYS[1], composite) then
    local job = ARGV[1] .. id
    local status = redis.pcall('HGET', job, 'status')  -- not a hash: an error, so dropped
    if status == 'queued' or (status == 'started' and redis.call('HGET', job, 'worker_name') == worker) then
      redis.call('LREM', KEYS[2], 0, id)
      redis.call('LPUSH', KEYS[2], id)
      redis.call('HSET', job, 'status', 'queued', 'worker_name', '')
      requeued[#requeued + 1] = id
    end
    redis.call('ZREM', KEYS[1], composite)
    redis.call('DEL', ARGV[2] .. composite)
    redis.call('ZREM', ARGV[3] .. id, ex)
    redis.call('SREM', ARGV[i + 3], composite)
  end
end
return requeued
"""
_REQUEUE_FN = lua_function("requeue_executions", _REQUEUE)


def return_ids(connection: redis.Redis, queue_name: str, held: str, ids: Iterable[str] = ()) -> list[str]:
    """Take ``ids`` (none: all) out of the list ``held`` and put back those whose job is queued; returns them."""
    keys = [held, queue_key(queue_name)]
    return [text(raw) for raw in _RETURN_IDS_FN.bind(connection)(keys=keys, args=[JOB_PREFIX, *ids])]


def requeue(connection: redis.Redis, queue_name: str, executions: list[tuple[str, str, str]], why: str) -> list[str]:
    """Drop each (job id, execution id, worker name) execution still registered, putting its job back
    while ``queued`` or ``started`` by that worker; the ids put back."""
    args = [JOB_PREFIX, EXECUTION_PREFIX, ExecutionRegistry.key_template.format("")]
    for job_id, execution_id, worker_name in executions:
        args += [job_id, execution_id, worker_name, WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name)]
    if len(args) == 3:
        return []
    keys = [StartedJobRegistry.key_template.format(queue_name), queue_key(queue_name)]
    requeued = [text(raw) for raw in _REQUEUE_FN.bind(connection)(keys=keys, args=args)]
    owner_of = {job_id: owner for job_id, _, owner in executions}
    for job_id in requeued:
        log.warning("requeued a job", jobId=job_id, worker=owner_of[job_id], reason=why)
    return requeued


def reap(connection: redis.Redis, queue_name: str, dead: Collection[str]) -> list[str]:
    """Put every job the ``dead`` workers held from ``queue_name`` back at its front; returns their ids."""
    requeued: list[str] = []
    for name in dead:
        for job_id in return_ids(connection, queue_name, dequeued_key(queue_name, name)):
            requeued.append(job_id)
            log.warning("requeued a job a dead worker had dequeued", jobId=job_id, worker=name)
    composites = [text(raw) for raw in connection.zrange(StartedJobRegistry.key_template.format(queue_name), 0, -1)]
    with connection.pipeline(transaction=False) as pipe:
        for composite in composites:
            pipe.hget(Execution.from_composite_key(composite, connection).key, "worker_name")
        owners = [text(owner) if owner else "" for owner in pipe.execute()]
    # An execution whose hash is gone has expired: sweep_expired owns it.
    held = [(*parse_composite_key(c), owner) for c, owner in zip(composites, owners, strict=True) if owner in dead]
    return requeued + requeue(connection, queue_name, held, "its worker is dead")


def sweep_expired(connection: redis.Redis, queue_name: str) -> list[str]:
    """Requeue jobs whose started-registry entry expired and whose worker is not alive."""
    registry = StartedJobRegistry.key_template.format(queue_name)
    gone: list[tuple[str, str, str]] = []
    for raw in connection.zrangebyscore(registry, "-inf", time.time(), start=0, num=1000):
        job_id, execution_id = parse_composite_key(text(raw))
        try:
            status, owner = connection.hmget(Job.key_for(job_id), ["status", "worker_name"])
        except redis.ResponseError:  # a job key that is not a hash: no job, its execution is dropped
            status = owner = None
        name = text(owner) if owner else ""
        if status == b"started" and name and connection.exists(alive_key(name)):
            continue  # still running on a live worker, which will refresh or settle it
        gone.append((job_id, execution_id, name))
    return requeue(connection, queue_name, gone, "its execution expired")
