"""The parked stream: parks, replays and counts deliveries that cannot be processed; an entry holds
``event_id``, ``reason``, ``detail`` and ``payload`` (docs/architecture.md, "Parked deliveries")."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import pydantic_core
from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job
from rq.queue import Queue

from core.config import DEFAULT_DEDUPE_TTL_SECONDS, DEFAULT_PARKED_RETENTION_SECONDS
from core.redis.dedupe import LIBRARY, job_digest, parked_marks
from core.redis.functions import lua_function
from core.redis.jobs import JobOptions, build_job_hash, job_payload
from core.redis.keys import job_id_for, queue_key, text

#: Parked entries read at most to count them by reason; beyond it the counts are marked partial.
COUNT_SCAN_LIMIT = 10_000
_COUNT_BATCH = 500

_PARK = """
-- KEYS: parked stream. ARGV: the marks head (ids.open's five), job id ('' without an eventId),
-- digest, mark (digest of reason and body), retention ms, then the entry's field/value pairs.
-- Returns the new entry id, or false when parked already for the same reason and body.
local st = ids.open(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
local head, field = ids.locate(ARGV[7])
local value, key = ids.find(st, head, field)
if value == ARGV[8] or (not value and st.legacy and ARGV[6] ~= '' and redis.call('GET', st.legacy .. ARGV[6]) == ARGV[8]) then
  return false
end
local min_id = math.max(0, math.floor(st.now * 1000) - tonumber(ARGV[9]))
local entry = redis.call('XADD', KEYS[1], 'MINID', '~', string.format('%d', min_id), '*', unpack(ARGV, 10))
-- marked once the entry is in (a refused XADD stops the call unmarked); a different reason or body
-- is remembered from now on instead
if value then redis.call('HDEL', key, field) end
ids.put(st, head, field, ARGV[8])
return entry
"""
_PARK_FN = lua_function("park", _PARK, prelude=LIBRARY)

_REQUEUE = """
-- KEYS: job hash, queue list, RQ's set of queues, parked stream. ARGV: parked entry id, job id,
-- the marks head (ids.open's five), digest, then the job hash as field/value pairs.
-- pcall: a job key that is not a hash holds no job, and is written over below
local status = redis.pcall('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'started' or status == 'scheduled' or status == 'deferred' then
  return 0
end
-- queued first: a push Redis refuses (the queue not a list) stops the call with nothing written
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
-- the replayed job may park again, for the same reason: that entry must be written
local st = ids.open(ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
local head, field = ids.locate(ARGV[8])
ids.forget(st, head, field)
if ARGV[7] ~= '' then redis.call('DEL', ARGV[7] .. ARGV[2]) end
-- the entry goes last: a mark Redis refused to forget leaves it parked, never marked and gone
redis.call('XDEL', KEYS[4], ARGV[1])
return 1
"""
_REQUEUE_FN = lua_function("replay_parked", _REQUEUE, prelude=LIBRARY)

# Counted inside Redis, so only the counts cross the network; one call per batch keeps each short.
_COUNT_REASONS = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
local counts = {}
local last = ''
for _, entry in ipairs(entries) do
  last = entry[1]
  local fields = entry[2]
  local reason = ''
  for i = 1, #fields, 2 do
    if fields[i] == 'reason' then reason = fields[i + 1] break end
  end
  counts[reason] = (counts[reason] or 0) + 1
end
local out = {#entries, last}
for reason, n in pairs(counts) do
  out[#out + 1] = reason
  out[#out + 1] = n
end
return out
"""
_COUNT_REASONS_FN = lua_function("count_parked_reasons", _COUNT_REASONS, read_only=True)


class ParkedStream:
    """The one park path of the web edge and the worker."""

    def __init__(
        self,
        redis: AsyncRedis,
        stream: str,
        mark_ttl_seconds: int,
        retention_seconds: int = DEFAULT_PARKED_RETENTION_SECONDS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.stream = stream
        self.marks = parked_marks(mark_ttl_seconds, clock)
        self._retention = retention_seconds
        self._park = _PARK_FN.bind(redis)

    async def park(self, event_id: str | None, reason: str, detail: str, body: str) -> str | None:
        """The entry id, or None for a repeat of the same event for the same reason with the same body."""
        # A lone surrogate (from a JSON escape) cannot be stored as UTF-8: written as its escape, the same JSON.
        body = body.encode("utf-8", "backslashreplace").decode("utf-8")
        mark = hashlib.blake2b(f"{reason}\0{body}".encode(), digest_size=12).hexdigest()
        # Without an eventId (a legacy v2 delivery, an id not a string) a repeat is known by the body's digest.
        job_id = job_id_for(event_id) if event_id else ""
        digest = job_digest(job_id) if event_id else hashlib.blake2b(body.encode(), digest_size=16).digest()
        args = [*self.marks.head(), job_id, digest, mark, self._retention * 1000, "event_id", event_id or ""]
        args += ["reason", reason, "detail", detail, "payload", body]
        entry_id = await self._park(keys=[self.stream], args=args)
        return None if entry_id is None else text(entry_id)


@dataclass
class ReplayReport:
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
    """Re-enqueue parked entries (with ``reason``, if given), oldest first, each leaving the stream in
    the step that enqueues its job; those whose job is queued or running stay (``busy``), as do those
    without an ``eventId``."""
    requeue = _REQUEUE_FN.bind(redis)
    marks = parked_marks(DEFAULT_DEDUPE_TTL_SECONDS)  # the TTL only sizes new slots: forgetting finds any mark
    report = ReplayReport()
    cursor = "-"
    while limit is None or report.requeued < limit:
        batch = await redis.xrange(parked_stream, min=cursor, max="+", count=100)
        if not batch:
            break
        for raw_id, raw_fields in batch:
            entry_id = text(raw_id)
            cursor = "(" + entry_id
            fields = {text(k): text(v) for k, v in (raw_fields or {}).items()}
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
            args = [entry_id, job_id, *marks.head(), job_digest(job_id), *chain.from_iterable(mapping.items())]
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


def count_by_reason(client: SyncRedis, stream: str, limit: int = COUNT_SCAN_LIMIT) -> tuple[dict[str, int], int]:
    """Entries by reason (most frequent first), and how many were read: at most ``limit``, oldest first."""
    count_reasons = _COUNT_REASONS_FN.bind(client)
    by_reason: dict[str, int] = {}
    scanned = 0
    cursor = "-"
    while scanned < limit:
        batch = min(_COUNT_BATCH, limit - scanned)
        found, last, *pairs = count_reasons(keys=[stream], args=[cursor, batch])
        scanned += int(found)
        for reason, count in zip(pairs[::2], pairs[1::2], strict=True):
            name = text(reason) or "(none)"
            by_reason[name] = by_reason.get(name, 0) + int(count)
        if int(found) < batch:
            break
        cursor = "(" + text(last)
    return dict(sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))), scanned


def _event_type_of(body: str) -> str:
    """The eventType named in a parked body, for the job description only; never raises."""
    try:
        document = pydantic_core.from_json(body)
    except (ValueError, TypeError):  # not JSON; TypeError is pydantic-core's answer to a lone surrogate
        return "UNKNOWN"
    event_type = document.get("eventType") if isinstance(document, dict) else None
    return event_type[:40] if isinstance(event_type, str) else "UNKNOWN"
