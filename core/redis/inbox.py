"""The inbox: deduplicate by ``eventId`` and enqueue durably, in one atomic step per event.

Why the mark and the job are written together, and how the edge calls the script:
docs/architecture.md, "Accepting a delivery".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import hiredis
import pydantic_core
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from rq.job import Job
from rq.queue import Queue
from rq.utils import now, utcformat

from core import metrics
from core.config import DEFAULT_PARKED_RETENTION_SECONDS
from core.redis.dedupe import LIBRARY, event_marks, job_digest
from core.redis.functions import LuaFunction, is_missing, load_refused, lua_function
from core.redis.group import GroupCommit
from core.redis.jobs import PROCESS_EVENT, JobOptions, build_job_hash, job_payload, spliced_job_data
from core.redis.keys import job_id_for, queue_key
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
redis.call('SADD', KEYS[2], KEYS[1])
return results
"""
)
_ENQUEUE_MANY_FN = lua_function("enqueue", _ENQUEUE_MANY)


class DirectScript:
    """One Lua function called on connections taken from the client's pool and kept: one packed
    write and one read per call, under the client's socket timeout. Its rules (reconnect, load,
    idle connections, a failed call that may have run): docs/architecture.md, "Accepting a delivery".
    """

    def __init__(self, redis: AsyncRedis, function: LuaFunction) -> None:
        self._redis = redis
        self._function = function
        settings = redis.connection_pool.connection_kwargs
        self._timeout: float | None = settings.get("socket_timeout")
        # An idle connection is replaced after the pool's health-check interval, else after 30 s.
        self._max_idle_seconds = float(settings.get("health_check_interval") or 30.0)
        #: Connections kept between calls (none is out while no call runs), each with when it was last used.
        self.idle: list[tuple[AbstractConnection, float]] = []

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self.idle:
            connection, used = self.idle.pop()
            if time.monotonic() - used > self._max_idle_seconds:
                await connection.disconnect()  # the call reconnects
        else:
            connection = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            # Kept for this script's calls only, never handed back: its deadline is this class's.
            connection.socket_timeout = None
        try:
            command = self._function.command(keys, args)
            reconnected = loaded = False
            while True:  # at most one reconnect and one load (a restart may need both)
                try:
                    return await self._round_trip(connection, command)
                except RedisConnectionError:
                    if reconnected:
                        raise
                    reconnected = True
                    await connection.disconnect(nowait=True)
                except ResponseError as exc:
                    if loaded or not is_missing(exc):
                        raise
                    loaded = True
                    try:  # on this connection, which has just answered
                        await self._round_trip(connection, ("FUNCTION", "LOAD", self._function.code))
                    except ResponseError as refused:
                        load_refused(self._function, refused)
        except ResponseError:
            raise  # Redis answered (an error reply, OOM say): the connection is in order
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            self.idle.append((connection, time.monotonic()))

    async def _round_trip(self, connection: AbstractConnection, command: tuple[Any, ...]) -> Any:
        packed = hiredis.pack_command(command)
        async with asyncio.timeout(self._timeout):
            await connection.send_packed_command(packed, check_health=False)
            return await connection.read_response()


#: The most enqueues one script call carries.
MAX_BATCH = 256


class Inbox:
    """What the web edge writes: accepted deliveries onto the queue, the rest onto the parked stream.

    Enqueues waiting together share one script call per round trip (:mod:`core.redis.group`); each
    caller gets its own answer only after Redis has run the script for its event.
    """

    def __init__(
        self,
        redis: AsyncRedis,
        options: JobOptions,
        parked_stream: str,
        dedupe_ttl_seconds: int,
        parked_retention_seconds: int = DEFAULT_PARKED_RETENTION_SECONDS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.marks = event_marks(dedupe_ttl_seconds, clock)
        self.parked = ParkedStream(redis, parked_stream, dedupe_ttl_seconds, parked_retention_seconds, clock)
        self._script = DirectScript(redis, _ENQUEUE_MANY_FN)
        self._keys = [queue_key(options.queue), Queue.redis_queues_keys]
        # The job hash RQ would write, less what the script writes per event.
        _, reference = build_job_hash(job_payload("template", "VEHICLE_STATE", "", 0), options)
        variable = ("created_at", "enqueued_at", "data", "description")
        constant = [(k, v) for k, v in reference.items() if k not in variable]
        self._constant: list[Any] = [len(constant), *chain.from_iterable(constant)]
        self._group: GroupCommit[tuple[str, bytes, str], int] = GroupCommit(self._enqueue, MAX_BATCH)

    async def accept(self, event_id: str, event_type: str, body: bytes | str, received_at_ms: int) -> bool:
        """Enqueue the event unless its ``eventId`` was seen; True when this call enqueued it.

        Returns once Redis has run the script for this event. A body given as bytes (a JSON object
        the edge validated) is embedded in the job verbatim (:func:`spliced_job_data`); text is
        written as a JSON string, as RQ would.
        """
        if isinstance(body, str):
            payload = job_payload(event_id, event_type, body, received_at_ms)
            data = pydantic_core.to_json([PROCESS_EVENT, None, [payload], {}])
        else:
            data = spliced_job_data(event_id, event_type, body, received_at_ms)
        job = (job_id_for(event_id), data, f"process_event({event_type} {event_id})")
        return bool(await self._group.submit(job))

    async def _enqueue(self, jobs: list[tuple[str, bytes, str]]) -> list[int]:
        args: list[Any] = [*self.marks.head(), Job.redis_job_namespace_prefix, utcformat(now()), *self._constant]
        for job_id, data, description in jobs:
            args.extend((job_id, job_digest(job_id), data, description))
        metrics.ENQUEUE_BATCH_SIZE.observe(len(jobs))
        results: list[int] = await self._script(keys=self._keys, args=args)
        return results
