"""The inbox: deduplicate by ``eventId`` and enqueue durably, in one atomic step.

A 2xx to Smartcar promises that the event is safe, so the dedupe mark and the RQ job must be
written together: a mark without a job would swallow every redelivery of a lost event, and a
job without a mark would let a racing redelivery enqueue it twice. Both are written by one Lua
script, which Redis runs atomically; concurrent redeliveries of one ``eventId`` therefore give
exactly one job, whatever the interleaving. The mark is a field of a small hash
(:mod:`core.redis.dedupe`: ≈ 20 B per event, remembered ``DEDUPE_TTL_SECONDS``), and the same
mark later records the publish. The job itself is described in :mod:`core.redis.jobs`.

Cost on Redis, per event: one lookup per live slot of the marks (8 with the defaults), a field
written with its hash's size checked, the job hash and the queue push; the registry of slots is
read once per batch (docs/capacity.md has the measured figures).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from rq.job import Job
from rq.queue import Queue
from rq.utils import now, utcformat

from core import metrics
from core.config import DEFAULT_PARKED_RETENTION_SECONDS
from core.redis.dedupe import LIBRARY, Marks, event_marks, job_digest
from core.redis.jobs import JobOptions, JobTemplate
from core.redis.keys import queue_key
from core.redis.parked import ParkedStream

_ENQUEUE_MANY = (
    LIBRARY
    + """
-- KEYS: queue list, RQ's set of queues
-- ARGV: the marks head (registry, ttl, width, clock, legacy prefix), job key prefix, enqueue
--       time, number of constant job fields (n), n constant field/value pairs, then per event:
--       job id, digest, data, description
-- Returns one 1 (enqueued) or 0 (already seen) per event, in order.
-- The per-event keys are derived here rather than passed in KEYS: it halves the arguments per
-- event, and RQ (hence this service) runs on a single Redis, not a cluster.
local st = ids.open(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
local constant_end = 8 + 2 * tonumber(ARGV[8])
local results = {}
for at = constant_end + 1, #ARGV, 4 do
  local job_id = ARGV[at]
  local head, field = ids.locate(ARGV[at + 1])
  if ids.find(st, head, field) or (st.legacy and redis.call('EXISTS', st.legacy .. job_id) == 1) then
    results[#results + 1] = 0
  else
    ids.put(st, head, field, '1')
    redis.call('HSET', ARGV[6] .. job_id, 'created_at', ARGV[7], 'enqueued_at', ARGV[7],
               'data', ARGV[at + 2], 'description', ARGV[at + 3], unpack(ARGV, 9, constant_end))
    redis.call('RPUSH', KEYS[1], job_id)
    results[#results + 1] = 1
  end
end
if #results > 0 then
  redis.call('SADD', KEYS[2], KEYS[1])
end
return results
"""
)


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
        marks: Marks,
        constant_fields: Mapping[str, Any],
        max_batch: int = 256,
        max_in_flight: int = 1,
    ) -> None:
        self._script = redis.register_script(_ENQUEUE_MANY)
        self._keys = [queue_key(queue), Queue.redis_queues_keys]
        self._marks = marks
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
        args: list[Any] = [*self._marks.head(), Job.redis_job_namespace_prefix, utcformat(now()), *self._constant]
        for (job_id, data, description), _ in batch:
            args.extend((job_id, job_digest(job_id), data, description))
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
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._template = JobTemplate(options)
        self.marks = event_marks(dedupe_ttl_seconds, clock)
        self._committer = GroupCommitter(redis, options.queue, self.marks, self._template.constant)
        self.parked = ParkedStream(redis, parked_stream, dedupe_ttl_seconds, parked_retention_seconds, clock)

    async def accept(self, event_id: str, event_type: str, body: bytes | str, received_at_ms: int) -> bool:
        """Enqueue the event unless its ``eventId`` was seen; True when this call enqueued it.

        Concurrent calls share round trips (:class:`GroupCommitter`); each returns only after
        Redis has run the dedupe-and-enqueue script for its own event. A body given as bytes (a
        JSON object the edge validated) is embedded in the job verbatim
        (:meth:`JobTemplate.for_event`).
        """
        return await self._committer.submit(self._template.for_event(event_id, event_type, body, received_at_ms))

    async def park(self, event_id: str | None, reason: str, detail: str, body: str) -> bool:
        """Park a delivery (:meth:`ParkedStream.park`); False when it was parked already."""
        return await self.parked.park(event_id, reason, detail, body) is not None
