"""RQ's bookkeeping for a batch of jobs in RQ's key layout, one Redis function per step, each safe to
run again (docs/architecture.md; docs/reliability.md, "Between dequeue and finish")."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE
from rq.job import Job
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from core.logs import get_logger
from core.redis.functions import lua_function
from core.redis.keys import dequeued_key, queue_key, text

log = get_logger("smartcar_ingest.worker")

# RQ's key prefixes, taken from RQ itself so that a change of layout fails the tests loudly.
JOB_PREFIX = Job.redis_job_namespace_prefix
EXECUTION_PREFIX = "rq:execution:"
RESULTS_PREFIX = Result.get_key("")  # type: ignore[no-untyped-call]

_CLAIM = """
-- KEYS: the queue, this worker's dequeued list. ARGV: how many ids to take.
-- Ids already in the list (an earlier claim whose answer was lost) come back first, alone.
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
if #ids == 0 then
  ids = redis.call('LPOP', KEYS[1], ARGV[1])
  if not ids then return {} end
  redis.call('RPUSH', KEYS[2], unpack(ids))
end
return ids
"""
_CLAIM_FN = lua_function("claim_jobs", _CLAIM)

_START = """
-- KEYS: this worker's dequeued list, the started registry, the worker's execution set, the worker's hash
-- ARGV: job key prefix, execution key prefix, worker name, started_at (RQ's text form),
--       created_at (seconds), registry score, set TTL, then (job id, execution id, run) triples
--       where run = 1 to start the job and 0 to only drop its id (its hash was gone).
-- Returns one flag per triple: 1 recorded (now or by an earlier attempt), 0 not held any more (or
-- its job key no longer a hash).
local held = {}
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do held[id] = true end
local flags, members, composites = {}, {}, {}
for i = 8, #ARGV, 3 do
  local id, ex, run = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local composite = id .. ':' .. ex
  local flag = 0
  if held[id] then
    held[id] = nil
    flag = 1
    if run == '1' then
      -- pcall: a job key no longer a hash (written over since the claim read it) holds no job: its id
      -- is dropped, as for a job deleted while queued, and the rest of the batch starts
      local set = redis.pcall('HSET', ARGV[1] .. id, 'status', 'started', 'started_at', ARGV[4],
        'last_heartbeat', ARGV[4], 'worker_name', ARGV[3])
      if type(set) == 'table' and set.err then
        flag = 0
      else
        redis.call('HSET', ARGV[2] .. composite, 'id', ex, 'job_id', id, 'created_at', ARGV[5],
          'last_heartbeat', ARGV[5], 'worker_name', ARGV[3])
        members[#members + 1] = ARGV[6]
        members[#members + 1] = composite
        composites[#composites + 1] = composite
      end
    end
  elseif redis.call('ZSCORE', KEYS[2], composite) then
    flag = 1
  end
  flags[#flags + 1] = flag
end
if #members > 0 then
  redis.call('ZADD', KEYS[2], unpack(members))
  redis.call('SADD', KEYS[3], unpack(composites))
  redis.call('EXPIRE', KEYS[3], ARGV[7])
  redis.call('HSET', KEYS[4], 'state', 'busy')
end
-- Whatever else is in the list (a claim applied while this batch was in hand) stays for the next claim.
local rest = {}
for id, _ in pairs(held) do rest[#rest + 1] = id end
redis.call('DEL', KEYS[1])
if #rest > 0 then redis.call('RPUSH', KEYS[1], unpack(rest)) end
return flags
"""
_START_FN = lua_function("start_jobs", _START)

_FINISH = """
-- KEYS: the started registry, the finished registry, the worker's execution set, the worker's hash
-- ARGV: job key prefix, execution key prefix, results key prefix, ended_at (RQ's text form), now
--       (seconds), working seconds, worker name, RQ's result type for success, then per job: job id,
--       composite key, result TTL (negative: kept for good), its finished registry score as RQ
--       gives it ('' for a TTL of 0: the job is deleted), return value (RQ's serialized form),
--       execution id, execution start (seconds). Numbers come as text and go out as given: Lua
--       would format each one it computed.
-- Returns how many jobs were recorded; a job whose execution is no longer registered (recorded by
-- an earlier attempt, or taken back by a reaper) is skipped.
local composites = {}
for i = 9, #ARGV, 7 do composites[#composites + 1] = ARGV[i + 1] end
local scores = redis.call('ZMSCORE', KEYS[1], unpack(composites))
local finished, done = {}, 0
for n, score in ipairs(scores) do
  if score then
    local i = 9 + (n - 1) * 7
    local id, composite, ttl, finished_score = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local job = ARGV[1] .. id
    redis.call('DEL', ARGV[2] .. composite)
    if finished_score == '' then
      redis.call('DEL', job)
    else
      redis.call('HSET', job, 'status', 'finished', 'ended_at', ARGV[4])
      local results = ARGV[3] .. id
      redis.call('XADD', results, 'MAXLEN', '~', '10', '*', 'type', ARGV[8], 'worker_name', ARGV[7],
        'return_value', ARGV[i + 4], 'execution_id', ARGV[i + 5], 'execution_started_at', ARGV[i + 6],
        'execution_ended_at', ARGV[5])
      if string.sub(ttl, 1, 1) ~= '-' then
        redis.call('EXPIRE', job, ttl)
        redis.call('EXPIRE', results, ttl)
      end
      finished[#finished + 1] = finished_score
      finished[#finished + 1] = id
    end
    done = done + 1
  end
end
if done > 0 then
  redis.call('ZREM', KEYS[1], unpack(composites))
  redis.call('SREM', KEYS[3], unpack(composites))
  if #finished > 0 then redis.call('ZADD', KEYS[2], unpack(finished)) end
  redis.call('HINCRBY', KEYS[4], 'successful_job_count', done)
  redis.call('HINCRBYFLOAT', KEYS[4], 'total_working_time', ARGV[6])
end
return done
"""
_FINISH_FN = lua_function("finish_jobs", _FINISH)

#: A longer result TTL in a job hash (not one this service writes) is cut to this, which Redis's
#: EXPIRE still takes: past it, EXPIRE would fail the finish of the whole batch halfway.
MAX_RESULT_TTL_SECONDS = 10**15


def finished_score(ttl: int, ended: datetime) -> str:
    """A finished job's score in RQ's finished registry, as RQ's own ``FinishedJobRegistry.add`` gives
    it (a TTL of -1: kept for good; another negative one: the TTL itself); '' for a TTL of 0 (RQ
    deletes the job and does not register it)."""
    if ttl == 0:
        return ""
    if ttl < 0:
        return "+inf" if ttl == -1 else str(ttl)
    return str(int(ended.timestamp()) + ttl)


@dataclass
class ClaimedJob:
    """One job this worker took from the queue: its id, raw hash and, once started, its execution."""

    job_id: str
    fields: dict[bytes, bytes]
    execution_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: datetime | None = None
    payload: Any = None  # what workers.jobs.admit read from it
    result: Any = None  # what the job returned, for the finish to record

    @property
    def composite(self) -> str:
        return f"{self.job_id}:{self.execution_id}"

    def field(self, name: bytes, default: int = 0) -> int:
        """An integer field of the job hash (``timeout``, ``result_ttl``, ``retries_left``)."""
        raw = self.fields.get(name)
        try:
            return int(raw) if raw else default
        except ValueError:
            return default

    @property
    def final_attempt(self) -> bool:
        """True when RQ has no retry left for this job (a failure now is final)."""
        return self.field(b"retries_left") <= 0

    @property
    def ttl(self) -> int:
        """The started-registry TTL RQ gives this job: its timeout, at most 30 s, plus 60 s."""
        return min(self.field(b"timeout", 180) or 180, 30) + 60

    def job(self, connection: Any) -> Job:
        """The RQ job, restored from the hash in hand (only once :func:`workers.jobs.admit` let it run)."""
        job = Job(self.job_id, connection=connection, serializer=JSONSerializer)
        job.restore(self.fields)
        return job


class Bookkeeping:
    """The claim, start and finish scripts for one worker on one queue."""

    def __init__(self, redis: Redis, queue_name: str, worker_name: str) -> None:
        self.redis = redis
        self.queue_key = queue_key(queue_name)
        self.worker_name = worker_name
        self.dequeued_key = dequeued_key(queue_name, worker_name)
        self.started_key = StartedJobRegistry.key_template.format(queue_name)
        self.finished_key = FinishedJobRegistry.key_template.format(queue_name)
        self.executions_key = WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name)
        self.worker_key = f"rq:worker:{worker_name}"
        self._claim = _CLAIM_FN.bind(redis)
        self._start = _START_FN.bind(redis)
        self._finish = _FINISH_FN.bind(redis)

    async def claim(self, count: int) -> list[ClaimedJob]:
        """Up to ``count`` jobs off the queue (or the ones this worker already held), with their hashes."""
        ids = [text(raw) for raw in await self._claim(keys=[self.queue_key, self.dequeued_key], args=[count])]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(JOB_PREFIX + job_id)
        claimed = []
        for job_id, fields in zip(ids, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(fields, ResponseError):  # a key that is not a hash holds no job: as if deleted
                log.error("dropped a queued id whose job key is not a hash", jobId=job_id)
                fields = {}
            claimed.append(ClaimedJob(job_id, fields))
        return claimed

    async def start(self, jobs: list[ClaimedJob], ttl: int) -> list[ClaimedJob]:
        """Record an execution for each job with a hash (the others leave the list); the jobs recorded."""
        if not jobs:
            return []
        started = now()
        args: list[Any] = [
            *(JOB_PREFIX, EXECUTION_PREFIX, self.worker_name, utcformat(started), started.timestamp()),
            *(started.timestamp() + ttl, ttl + 60),
        ]
        for claimed_job in jobs:
            args += [claimed_job.job_id, claimed_job.execution_id, "1" if claimed_job.fields else "0"]
        keys = [self.dequeued_key, self.started_key, self.executions_key, self.worker_key]
        flags = await self._start(keys=keys, args=args)
        recorded = [claimed_job for claimed_job, flag in zip(jobs, flags, strict=True) if flag and claimed_job.fields]
        for claimed_job in recorded:
            claimed_job.started_at = started
        return recorded

    async def finish(self, jobs: list[ClaimedJob]) -> int:
        """Record ``jobs`` (that returned) as finished, in one script; returns how many were recorded."""
        ended = now()
        serializer = JSONSerializer()
        working = sum((ended - job.started_at).total_seconds() for job in jobs if job.started_at)
        args: list[Any] = [
            *(JOB_PREFIX, EXECUTION_PREFIX, RESULTS_PREFIX, utcformat(ended), ended.timestamp(), working),
            *(self.worker_name, Result.Type.SUCCESSFUL.value),
        ]
        for claimed_job in jobs:
            started = claimed_job.started_at.timestamp() if claimed_job.started_at else ended.timestamp()
            value = Result(
                claimed_job.job_id,
                Result.Type.SUCCESSFUL,
                None,  # type: ignore[arg-type]  # only serializes: no connection needed
                return_value=claimed_job.result,
                serializer=serializer,
            ).serialize()["return_value"]
            ttl = min(claimed_job.field(b"result_ttl", 500), MAX_RESULT_TTL_SECONDS)
            args += [
                claimed_job.job_id,
                claimed_job.composite,
                ttl,
                finished_score(ttl, ended),
                value,
                claimed_job.execution_id,
                started,
            ]
        keys = [self.started_key, self.finished_key, self.executions_key, self.worker_key]
        return int(await self._finish(keys=keys, args=args))

    async def lost_executions(self, in_flight: set[str]) -> list[str]:
        """Executions recorded for this worker that it does not know of (a start's answer lost)."""
        members = await self.redis.smembers(self.executions_key)
        return [c for c in (text(m) for m in members) if c not in in_flight]
