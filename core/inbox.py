"""The inbox: deduplicate by ``eventId`` and enqueue durably, in one atomic step.

A 2xx to Smartcar promises that the event is safe, so the dedupe mark and the RQ job must be
written together: a mark without a job would swallow every redelivery of a lost event, and a
job without a mark would let a racing redelivery enqueue it twice. Both are written by one Lua
script, which Redis runs atomically; concurrent redeliveries of one ``eventId`` therefore give
exactly one job, whatever the interleaving.

The job is a regular RQ job (JSON serializer, function ``workers.jobs.process_event``), built
with RQ's own :class:`rq.job.Job` so that ``rq info``, rq-dashboard and every RQ worker read it
as if ``Queue.enqueue`` had written it. Its one argument is a plain dict (see :func:`job_payload`)
holding the body exactly as received, so the worker and ``replay`` never depend on this
process's parsing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic_core
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from core import metrics
from core.config import DEFAULT_PARKED_RETENTION_SECONDS

PROCESS_EVENT = "workers.jobs.process_event"

#: How RQ's job ids may look; an eventId that fits is used as the job id unchanged.
_JOB_ID_SAFE = re.compile(r"[A-Za-z0-9_-]{1,128}")

DEDUPE_PREFIX = "smartcar-ingest:seen:"

#: Waits between RQ re-runs of a job that failed with a transient error (seconds).
RETRY_INTERVALS = (5, 15, 60, 180, 600)

_PARK = """
-- KEYS: dedupe mark ('' when the delivery has no usable eventId), parked stream
-- ARGV: dedupe ttl, oldest entry id to keep, then the stream entry as field/value pairs
if KEYS[1] ~= '' and not redis.call('SET', KEYS[1], 'parked', 'NX', 'EX', ARGV[1]) then
  return 0
end
redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[2], '*', unpack(ARGV, 3))
return 1
"""


def parked_min_id(retention_seconds: int, now_ms: int | None = None) -> str:
    """The oldest parked entry id to keep: entries older than the retention are trimmed.

    Every XADD to the parked stream carries ``MINID ~ <this>``, so the stream stays bounded by
    age whatever arrives; ``~`` lets Redis trim whole nodes only, which keeps each add cheap.
    """
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return str(max(0, now - retention_seconds * 1000))


def job_id_for(event_id: str) -> str:
    """The RQ job id for an event: the ``eventId`` itself when RQ accepts it, else a digest of it.

    One job per ``eventId``: the id is a pure function of it, so a replay, a redelivery and an
    operator all find the same job.
    """
    if _JOB_ID_SAFE.fullmatch(event_id):
        return event_id
    return "evt-" + hashlib.sha256(event_id.encode()).hexdigest()[:40]


def dedupe_key(event_id: str) -> str:
    """The Redis key that remembers an ``eventId`` for ``DEDUPE_TTL_SECONDS``."""
    return DEDUPE_PREFIX + job_id_for(event_id)


def parked_key(event_id: str) -> str:
    """The Redis key that remembers a parked ``eventId``.

    Kept apart from :func:`dedupe_key` so that parking a broken delivery never blocks a later
    valid delivery of the same event.
    """
    return f"smartcar-ingest:parked:{job_id_for(event_id)}"


def job_payload(event_id: str, event_type: str, body: str, received_at_ms: int) -> dict[str, Any]:
    """The single JSON argument of ``process_event``."""
    return {"eventId": event_id, "eventType": event_type, "body": body, "receivedAt": received_at_ms}


@dataclass(frozen=True)
class JobOptions:
    """How RQ should run ingest jobs."""

    queue: str
    timeout_seconds: int = 120
    retries: int = 5
    result_ttl_seconds: int = 600
    failure_ttl_seconds: int = 7 * 24 * 3600


def build_job_hash(payload: Mapping[str, Any], options: JobOptions) -> tuple[str, dict[str, Any]]:
    """Return ``(job_id, mapping)``: the RQ job hash that ``Queue.enqueue`` would have written."""
    job_id = job_id_for(str(payload["eventId"]))
    job = Job.create(
        PROCESS_EVENT,
        args=[dict(payload)],
        id=job_id,
        # Job.create wants a connection object; it is never used to talk to Redis here.
        connection=_NO_CONNECTION,
        serializer=JSONSerializer,
        # Describe the job by type and id only: the default would embed the whole body
        # (locations, VINs) in rq-dashboard and in worker logs.
        description=f"process_event({payload['eventType']} {payload['eventId']})",
        timeout=options.timeout_seconds,
        result_ttl=options.result_ttl_seconds,
        failure_ttl=options.failure_ttl_seconds,
        origin=options.queue,
    )
    if options.retries:
        job.retries_left = options.retries
        job.retry_intervals = list(RETRY_INTERVALS[: options.retries])
    job.enqueued_at = now()
    job._status = JobStatus.QUEUED
    mapping = job.to_dict()
    mapping["status"] = JobStatus.QUEUED.value
    return job_id, mapping


# A client that never connects: Job.create only keeps a reference to it.
_NO_CONNECTION = Redis(host="unused.invalid", single_connection_client=False)


class JobTemplate:
    """Builds the same job hash as :func:`build_job_hash`, several times faster.

    The fields that never change between events (:attr:`constant`) are taken once from a job
    built by RQ itself; per event only :data:`VARIABLE_FIELDS` are filled in. ``data`` is the
    JSON of ``(func, None, [payload], {})`` compressed with zlib (level 1: RQ reads any level).
    ``tests/test_inbox.py`` checks that RQ reads these hashes back exactly as its own.
    """

    VARIABLE_FIELDS = ("created_at", "enqueued_at", "data", "description")

    def __init__(self, options: JobOptions) -> None:
        _, reference = build_job_hash(job_payload("template", "VEHICLE_STATE", "", 0), options)
        self.constant: dict[str, Any] = {
            key: value for key, value in reference.items() if key not in self.VARIABLE_FIELDS
        }

    def variable(self, payload: Mapping[str, Any]) -> tuple[str, bytes, str]:
        """``(job_id, data, description)`` for one event; the times are added per batch."""
        event_id = str(payload["eventId"])
        data = pydantic_core.to_json([PROCESS_EVENT, None, [payload], {}])
        return job_id_for(event_id), data, f"process_event({payload['eventType']} {event_id})"

    def build(self, payload: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """``(job_id, mapping)``: the whole job hash for one event."""
        job_id, data, description = self.variable(payload)
        stamp = utcformat(now())
        variable = {"created_at": stamp, "enqueued_at": stamp, "data": data, "description": description}
        return job_id, {**variable, **self.constant}


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


def queue_key(queue: str) -> str:
    return f"{Queue.redis_queue_namespace_prefix}{queue}"


class Inbox:
    """Accepts verified deliveries into Redis."""

    def __init__(
        self,
        redis: AsyncRedis,
        options: JobOptions,
        parked_stream: str,
        dedupe_ttl_seconds: int,
        parked_retention_seconds: int = DEFAULT_PARKED_RETENTION_SECONDS,
    ) -> None:
        self._redis = redis
        self._options = options
        self._parked_stream = parked_stream
        self._ttl = dedupe_ttl_seconds
        self._parked_retention = parked_retention_seconds
        self._template = JobTemplate(options)
        self._committer = GroupCommitter(redis, options.queue, dedupe_ttl_seconds, self._template.constant)
        self._park = redis.register_script(_PARK)

    async def accept(self, event_id: str, event_type: str, body: str, received_at_ms: int) -> bool:
        """Enqueue the event unless its ``eventId`` was seen; True when this call enqueued it.

        Concurrent calls share round trips (:class:`GroupCommitter`); each returns only after
        Redis has run the dedupe-and-enqueue script for its own event.
        """
        return await self._committer.submit(
            self._template.variable(job_payload(event_id, event_type, body, received_at_ms))
        )

    async def park(self, event_id: str | None, reason: str, detail: str, body: str) -> bool:
        """Keep a delivery that cannot be processed in the parked stream; False if already kept.

        Entries older than ``parked_retention_seconds`` are trimmed by the same command.
        """
        entry = {"event_id": event_id or "", "reason": reason, "detail": detail, "payload": body}
        args: list[Any] = [self._ttl, parked_min_id(self._parked_retention)]
        for field, value in entry.items():
            args.extend((field, value))
        keys = [parked_key(event_id) if event_id else "", self._parked_stream]
        return bool(await self._park(keys=keys, args=args))


_REQUEUE = """
-- KEYS: job hash, queue list, RQ's set of queues, parked stream
-- ARGV: parked entry id, job id, then the job hash as field/value pairs
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'started' or status == 'scheduled' or status == 'deferred' then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], KEYS[2])
redis.call('XDEL', KEYS[4], ARGV[1])
return 1
"""


@dataclass
class ReplayReport:
    """What ``replay`` did: entries looked at, re-enqueued, and left in place with why."""

    scanned: int = 0
    requeued: int = 0
    busy: int = 0
    without_event_id: int = 0


async def replay_parked(
    redis: AsyncRedis,
    options: JobOptions,
    parked_stream: str,
    reason: str | None = None,
    limit: int | None = None,
    on_progress: Callable[[ReplayReport], None] | None = None,
) -> ReplayReport:
    """Re-enqueue parked entries (optionally only those with ``reason``), oldest first.

    Each entry is removed from the parked stream in the same atomic step that enqueues its job,
    so an interrupted replay neither loses nor doubles an event. Entries whose job is still
    queued or running are left in place (``busy``); entries without an ``eventId`` cannot become
    a job and stay parked (``without_event_id``).
    """
    requeue = redis.register_script(_REQUEUE)
    report = ReplayReport()
    cursor = "-"
    while limit is None or report.requeued < limit:
        batch = await redis.xrange(parked_stream, min=cursor, max="+", count=100)
        if not batch:
            break
        for raw_id, raw_fields in batch:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            cursor = "(" + entry_id
            fields = {_text(k): _text(v) for k, v in (raw_fields or {}).items()}
            if reason is not None and fields.get("reason") != reason:
                continue
            report.scanned += 1
            event_id = fields.get("event_id", "")
            if not event_id:
                report.without_event_id += 1
                continue
            body = fields.get("payload", "")
            job_id, mapping = build_job_hash(
                job_payload(event_id, _event_type_of(body), body, int(time.time() * 1000)), options
            )
            args: list[Any] = [entry_id, job_id]
            for field, value in mapping.items():
                args.extend((field, value))
            keys = [Job.key_for(job_id), queue_key(options.queue), Queue.redis_queues_keys, parked_stream]
            if await requeue(keys=keys, args=args):
                report.requeued += 1
            else:
                report.busy += 1
            if on_progress is not None:
                on_progress(report)
            if limit is not None and report.requeued >= limit:
                break
    return report


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _event_type_of(body: str) -> str:
    """The eventType named in a parked body, for the job description only."""
    try:
        document = json.loads(body)
    except ValueError:
        return "UNKNOWN"
    event_type = document.get("eventType") if isinstance(document, dict) else None
    return event_type[:40] if isinstance(event_type, str) else "UNKNOWN"
