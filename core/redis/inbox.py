"""The inbox: deduplicate by ``eventId`` and enqueue durably, in one atomic step per event
(why, and how the edge calls the script: docs/architecture.md, "Accepting a delivery")."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
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
from core.redis.functions import LuaFunction, is_missing, lua_function
from core.redis.group import GroupCommit
from core.redis.jobs import JobOptions, build_job_hash, deflated, job_payload, spliced_job_data
from core.redis.keys import STAGED_JOB_PREFIX, job_id_for, queue_key
from core.redis.parked import ParkedStream

_ENQUEUE_MANY = """
-- KEYS: queue list, RQ's set of queues. ARGV: ids.open's five, job and staged job key prefixes, then
-- per event its job id and digest. Per event 1 (its staged hash renamed to the job) or 0 (seen: the
-- staged hash dropped); why so: docs/architecture.md, "Accepting a delivery".
local st = ids.open(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
local results = {}
for at = 8, #ARGV, 2 do
  local job_id = ARGV[at]
  local head, field = ids.locate(ARGV[at + 1])
  if ids.find(st, head, field) or (st.legacy and redis.call('EXISTS', st.legacy .. job_id) == 1) then
    redis.call('DEL', ARGV[7] .. job_id)
    results[#results + 1] = 0
  else
    redis.call('RENAME', ARGV[7] .. job_id, ARGV[6] .. job_id)
    redis.call('RPUSH', KEYS[1], job_id)
    -- marked last: a write Redis refuses (the queue not a list) stops the call with the event unmarked
    ids.put(st, head, field, '1')
    results[#results + 1] = 1
  end
end
redis.call('SADD', KEYS[2], KEYS[1])
return results
"""
_ENQUEUE_MANY_FN = lua_function("enqueue", _ENQUEUE_MANY, prelude=LIBRARY)


class DirectScript:
    """One Lua function called on kept connections, packed by hiredis (docs/architecture.md, "Accepting a delivery")."""

    def __init__(self, redis: AsyncRedis, function: LuaFunction) -> None:
        self._redis = redis
        self._function = function
        settings = redis.connection_pool.connection_kwargs
        self._timeout: float | None = settings.get("socket_timeout")
        self._max_idle_seconds = float(settings.get("health_check_interval") or 30.0)
        #: Connections kept between calls (none is out while no call runs), each with when it was last used.
        self.idle: list[tuple[AbstractConnection, float]] = []

    async def __call__(self, keys: Sequence[str], args: Sequence[Any], staged: Sequence[Sequence[Any]] = ()) -> Any:
        """The function's answer; with ``staged`` (commands writing each the key ``command[1]``), those
        and the call run as one ``MULTI``/``EXEC``, and the staged keys are deleted if the call fails."""
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
            commands = [("MULTI",), *staged, command, ("EXEC",)] if staged else [command]
            packed = b"".join(hiredis.pack_command(tuple(c)) for c in commands)
            reconnected = loaded = False
            while True:  # at most one reconnect and one load (a restart may need both)
                try:
                    return await self._round_trip(connection, packed, len(commands), staged)
                except RedisConnectionError:
                    if reconnected:
                        raise
                    reconnected = True
                    await connection.disconnect(nowait=True)
                except ResponseError as exc:
                    if loaded or not is_missing(exc):
                        raise
                    loaded = True
                    try:  # on this connection, which has just answered (a pooled one may be stale)
                        load: tuple[Any, ...] = ("FUNCTION", "LOAD", self._function.code)
                        await self._round_trip(connection, hiredis.pack_command(load), 1, ())
                    except ResponseError as refused:
                        self._function.refused(refused)
        except BaseException as exc:
            if not isinstance(exc, ResponseError):  # an error reply (OOM, say) leaves it in order
                await connection.disconnect(nowait=True)
            raise
        finally:
            self.idle.append((connection, time.monotonic()))

    async def _round_trip(
        self, connection: AbstractConnection, packed: bytes, replies: int, staged: Sequence[Sequence[Any]]
    ) -> Any:
        """The last reply (of a transaction, its last command's), every reply read first."""
        async with asyncio.timeout(self._timeout):
            await connection.send_packed_command(packed, check_health=False)
            error: ResponseError | None = None
            answer: Any = None
            for _ in range(replies):
                try:
                    answer = await connection.read_response()
                except ResponseError as exc:  # a command refused (OOM) aborts the transaction: report it
                    error = error or exc
            if error is not None:
                raise error
            if replies == 1:
                return answer
            answer = answer[-1]
            if isinstance(answer, ResponseError):
                unstage = hiredis.pack_command(("DEL", *(command[1] for command in staged)))
                await connection.send_packed_command(unstage, check_health=False)
                with contextlib.suppress(ResponseError):
                    await connection.read_response()
                raise answer
            return answer


MAX_BATCH = 256


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
        self.marks = event_marks(dedupe_ttl_seconds, clock)
        self.parked = ParkedStream(redis, parked_stream, dedupe_ttl_seconds, parked_retention_seconds, clock)
        self._script = DirectScript(redis, _ENQUEUE_MANY_FN)
        self._keys = [queue_key(options.queue), Queue.redis_queues_keys]
        # The job hash RQ would write, less the fields each batch or event stages itself (_enqueue)
        # and those RQ writes empty: its Job.restore reads a missing field as an empty one.
        _, reference = build_job_hash(job_payload("template", "VEHICLE_STATE", "", 0), options)
        per_event = ("created_at", "enqueued_at", "data", "description")
        self._constant: list[Any] = [x for k, v in reference.items() if k not in per_event and v != "" for x in (k, v)]
        self._group: GroupCommit[tuple[str, bytes, str], int] = GroupCommit(self._enqueue, MAX_BATCH)

    async def accept(self, event_id: str, event_type: str, body: bytes | str, received_at_ms: int) -> bool:
        """True when this call enqueued the event (its ``eventId`` unseen). A body given as bytes (a
        JSON object the edge validated) is embedded verbatim, one given as text as a JSON string; the
        job's data is deflated, as RQ's are."""
        data = deflated(
            spliced_job_data(
                event_id, event_type, pydantic_core.to_json(body) if isinstance(body, str) else body, received_at_ms
            )
        )
        job = (job_id_for(event_id), data, f"process_event({event_type} {event_id})")
        return bool(await self._group.submit(job))

    async def _enqueue(self, jobs: list[tuple[str, bytes, str]]) -> list[int]:
        enqueued_at = utcformat(now())
        fields = ("created_at", enqueued_at, "enqueued_at", enqueued_at, *self._constant)
        args: list[Any] = [*self.marks.head(), Job.redis_job_namespace_prefix, STAGED_JOB_PREFIX]
        staged: list[tuple[Any, ...]] = []
        for job_id, data, description in jobs:
            args.extend((job_id, job_digest(job_id)))
            staged.append(("HSET", STAGED_JOB_PREFIX + job_id, "data", data, "description", description, *fields))
        metrics.ENQUEUE_BATCH_SIZE.observe(len(jobs))
        results: list[int] = await self._script(self._keys, args, staged)
        return results
