"""The inbox: deduplicate by ``eventId`` and enqueue durably, in one atomic step.

A 2xx to Smartcar promises that the event is safe, so the dedupe mark and the RQ job must be
written together: a mark without a job would swallow every redelivery of a lost event, and a
job without a mark would let a racing redelivery enqueue it twice. Both are written by one Lua
script, which Redis runs atomically; concurrent redeliveries of one ``eventId`` therefore give
exactly one job, whatever the interleaving. The job itself is described in :mod:`core.redis.jobs`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from rq.job import Job
from rq.queue import Queue
from rq.utils import now, utcformat

from core import metrics
from core.config import DEFAULT_PARKED_RETENTION_SECONDS
from core.redis.jobs import JobOptions, JobTemplate, job_payload
from core.redis.keys import DEDUPE_PREFIX, queue_key
from core.redis.parked import ParkedStream

_ENQUEUE_MANY = """
-- KEYS: queue list, RQ's set of queues
-- ARGV: dedupe ttl, dedupe key prefix, job key prefix, enqueue time, number of constant job
--       fields (n), n constant field/value pairs, then per event: job id, data, description
-- Returns one 1 (enqueued) or 0 (already seen) per event, in order.
-- The per-event keys are derived here from the job id rather than passed in KEYS: it halves
-- the arguments per event, and RQ (hence this service) runs on a single Redis, not a cluster.
local constant_end = 5 + 2 * tonumber(ARGV[5])
local results = {}
for at = constant_end + 1, #ARGV, 3 do
  local job_id = ARGV[at]
  if redis.call('SET', ARGV[2] .. job_id, job_id, 'NX', 'EX', ARGV[1]) then
    redis.call('HSET', ARGV[3] .. job_id, 'created_at', ARGV[4], 'enqueued_at', ARGV[4],
               'data', ARGV[at + 1], 'description', ARGV[at + 2], unpack(ARGV, 6, constant_end))
    redis.call('RPUSH', KEYS[1], job_id)
    results[#results + 1] = 1
  else
    results[#results + 1] = 0
  end
end
if #results > 0 then
  redis.call('SADD', KEYS[2], KEYS[1])
end
return results
"""


class GroupCommitter:
    """Combines the enqueues of concurrent requests into one script call per round trip.

    While one batch is on its way to Redis, new events wait in ``pending``; when it returns, all
    of them go in the next call. Under light load a batch is one event and nothing waits; under
    heavy load one round trip carries many events, which is what keeps CPU per delivery low.
    Each caller still gets its own answer only after Redis has run the script for its event.
    """

    def __init__(
        self,
        redis: AsyncRedis,
        queue: str,
        ttl: int,
        constant_fields: Mapping[str, Any],
        max_batch: int = 256,
        max_in_flight: int = 1,
    ) -> None:
        self._script = redis.register_script(_ENQUEUE_MANY)
        self._keys = [queue_key(queue), Queue.redis_queues_keys]
        self._head: list[Any] = [ttl, DEDUPE_PREFIX, Job.redis_job_namespace_prefix]
        self._constant: list[Any] = [len(constant_fields)]
        for field, value in constant_fields.items():
            self._constant.extend((field, value))
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[tuple[str, bytes, str], asyncio.Future[bool]]] = []
        self._in_flight = 0

    async def submit(self, job_fields: tuple[str, bytes, str]) -> bool:
        """Enqueue one event (``job_fields`` from :meth:`JobTemplate.variable`).

        True when this call enqueued it, False when its ``eventId`` was already seen.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((job_fields, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._flush(batch)
        finally:
            self._in_flight -= 1

    async def _flush(self, batch: list[tuple[tuple[str, bytes, str], asyncio.Future[bool]]]) -> None:
        args: list[Any] = [*self._head, utcformat(now()), *self._constant]
        for job_fields, _ in batch:
            args.extend(job_fields)
        metrics.ENQUEUE_BATCH_SIZE.observe(len(batch))
        try:
            results = await self._script(keys=self._keys, args=args)
        except BaseException as exc:  # every waiter must hear about the failure, whatever it is
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(bool(result))


class Inbox:
    """What the web edge writes: accepted deliveries onto the queue, the rest onto the parked stream."""

    def __init__(
        self,
        redis: AsyncRedis,
        options: JobOptions,
        parked_stream: str,
        dedupe_ttl_seconds: int,
        parked_retention_seconds: int = DEFAULT_PARKED_RETENTION_SECONDS,
    ) -> None:
        self._template = JobTemplate(options)
        self._committer = GroupCommitter(redis, options.queue, dedupe_ttl_seconds, self._template.constant)
        self.parked = ParkedStream(redis, parked_stream, dedupe_ttl_seconds, parked_retention_seconds)

    async def accept(self, event_id: str, event_type: str, body: str, received_at_ms: int) -> bool:
        """Enqueue the event unless its ``eventId`` was seen; True when this call enqueued it.

        Concurrent calls share round trips (:class:`GroupCommitter`); each returns only after
        Redis has run the dedupe-and-enqueue script for its own event.
        """
        return await self._committer.submit(
            self._template.variable(job_payload(event_id, event_type, body, received_at_ms))
        )

    async def park(self, event_id: str | None, reason: str, detail: str, body: str) -> bool:
        """Park a delivery (:meth:`ParkedStream.park`); False when it was parked already."""
        return await self.parked.park(event_id, reason, detail, body) is not None
