"""Smartcar reads shared by every worker process through Redis: a read serves every event it may
(which read serves which event: docs/architecture.md, "Shared Smartcar reads"; the outcomes consumers
see: docs/consumers.md, "Schema version 2"). An event's two reads are put together in
:mod:`core.smartcar.event_reads`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import lz4.block
import pydantic_core
from redis.asyncio import Redis

from core.errors import (
    InvalidPayload,
    SmartcarRateLimited,
    SmartcarRejected,
    SmartcarUnauthorized,
    SmartcarUnavailable,
)
from core.redis.clock import RedisClock
from core.redis.group import GroupedCall, grouped_function
from core.redis.keys import latest_read_key, text
from core.redis.outage import REDIS_PATIENCE_SECONDS, until_redis_answers_async
from core.smartcar.http import MAX_ANSWER_BYTES

Call = Literal["vehicle", "signals"]


@dataclass(slots=True)
class Read:
    """One read as one event got it (a fresh one per event); ``fetched_at``: when Smartcar answered (epoch ms)."""

    source: Literal["fetched", "cached", "shared", "skipped"]
    data: Any = None
    fetched_at: int | None = None
    error: SmartcarRejected | None = None
    call: Call = "vehicle"  # set by VehicleReads: ReadCache does not know which call a key is

    def describe(self) -> dict[str, Any]:
        """The read as the payload's ``enrichment.reads.<call>`` shows it."""
        reason = "rejected" if self.error else "rate_limited" if self.source == "skipped" else None
        return {"source": self.source, "fetchedAt": self.fetched_at, "reason": reason}


#: How long a hash outlives its read's window: events wait in the queue before they are processed.
GRACE_MS = 600_000
#: How long a cancelled read tries to give its claim back (else the lease runs out, as after a crash).
RELEASE_SECONDS = 2.0
#: How often an event polls another process's read: the first pause, then 1.5 times longer up to the last.
POLL_FIRST_SECONDS, POLL_MAX_SECONDS = 0.02, 0.25

# Redis's clock, read once per call of a grouped function (core.redis.group).
_NOW = "local now = now_ms()\n"
_KEEP = "if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[{n}]) then redis.call('PEXPIRE', KEYS[1], ARGV[{n}]) end\n"

#: What tells whether the hash's read serves an event, and that read (ReadCache._cached).
_CACHED_FIELDS = ("startedAt", "dataGen", "gen", "data", "fetchedAt")

# ARGV: received ms, window ms, lease ms, claim token, keep ms.
_ACQUIRE = (
    _NOW
    + """
local oldest = tonumber(ARGV[1]) - tonumber(ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'startedAt', 'dataGen', 'claim', 'claimStartedAt', 'claimUntil', 'claimGen', 'gen')
local gen = tonumber(f[7]) or 0
local started = tonumber(f[1])
if started and started > oldest and (tonumber(f[2]) or 0) == gen then
  local d = redis.call('HMGET', KEYS[1], 'data', 'fetchedAt')
  return {'cached', d[1], f[1], d[2]}
end
local claimed = tonumber(f[4])
if f[3] and claimed and claimed > oldest and (tonumber(f[6]) or 0) == gen and (tonumber(f[5]) or 0) > now then
  return {'wait', f[3], f[4]}
end
redis.call('HSET', KEYS[1], 'claim', ARGV[4], 'claimStartedAt', now, 'claimUntil', now + tonumber(ARGV[3]), 'claimGen', gen)
"""
    + _KEEP.format(n=5)
    + "return {'fetch', ARGV[4], tostring(now), gen}"
)
_ACQUIRE_FN = grouped_function("read_acquire", _ACQUIRE, arity=5)

# ARGV: claim token ('' for none), started ms, data ('' when the read failed; kept only if the newest),
# failure (JSON, or '' for none and for a read given up: its waiters then claim afresh), keep ms,
# generation ('' for the current one). Ends the claim.
_COMPLETE = (
    _NOW
    + """
-- One read of what the steps below need: none of them writes these fields.
local f = redis.call('HMGET', KEYS[1], 'startedAt', 'gen', 'claim')
local held = tonumber(f[1])
if ARGV[3] ~= '' and (not held or tonumber(ARGV[2]) >= held) then
  local gen = ARGV[6]
  if gen == '' then gen = f[2] or '0' end
  redis.call('HSET', KEYS[1], 'data', ARGV[3], 'startedAt', ARGV[2], 'fetchedAt', now, 'dataGen', gen)
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'errorToken', ARGV[1], 'error', ARGV[4]) end
if ARGV[1] ~= '' and f[3] == ARGV[1] then
  -- Still our claim: the hash has lived since the claim renewed it for this read, and no TTL
  -- is ever shortened, so it lasts the read's window and grace from its start already.
  redis.call('HDEL', KEYS[1], 'claim', 'claimStartedAt', 'claimUntil', 'claimGen')
else
  """
    + _KEEP.format(n=5)
    + "end\nreturn now"
)
_COMPLETE_FN = grouped_function("read_complete", _COMPLETE, arity=6)

# ARGV: claim token, claim started ms.
_POLL = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'startedAt', 'claim', 'claimUntil', 'errorToken', 'error')
if (tonumber(f[1]) or -1) >= tonumber(ARGV[2]) then
  local d = redis.call('HMGET', KEYS[1], 'data', 'fetchedAt')
  return {'done', d[1], f[1], d[2]}
end
if f[4] == ARGV[1] then return {'failed', f[5]} end
if f[2] == ARGV[1] and (tonumber(f[3]) or 0) > now then return {'pending'} end
return {'gone'}
"""
)
_POLL_FN = grouped_function("read_poll", _POLL, arity=2, read_only=True)

# ARGV: keep ms, and the start of the read found unusable ('' after a VEHICLE_ERROR). A new generation:
# what was read or claimed before serves no event from now on. For an unusable read, only while that
# read is still the hash's and still serves (another event's new generation, or read, stands).
# A generation that is not a number (never written so) counts as 0: a new one is written, never an error.
_INVALIDATE = (
    """
local f = redis.call('HMGET', KEYS[1], 'gen', 'startedAt', 'dataGen')
local gen = tonumber(f[1]) or 0
if ARGV[2] ~= '' and (f[2] ~= ARGV[2] or (tonumber(f[3]) or 0) ~= gen) then return false end
redis.call('HSET', KEYS[1], 'gen', string.format('%d', gen + 1))
"""
    + _KEEP.format(n=1)
    + "return true"
)
_INVALIDATE_FN = grouped_function("read_invalidate", _INVALIDATE, arity=2)


class ReadCache:
    """Shared reads over one Redis client; one instance per process."""

    def __init__(self, redis: Redis, lease_seconds: float) -> None:
        self._redis = redis
        self._lease_ms = int(lease_seconds * 1000)
        # The decisions of the events in flight meanwhile share one call each (core.redis.group).
        self._acquire = GroupedCall(_ACQUIRE_FN, redis)
        self._complete = GroupedCall(_COMPLETE_FN, redis)
        self._poll = GroupedCall(_POLL_FN, redis)
        self._invalidate = GroupedCall(_INVALIDATE_FN, redis)
        self._clock = RedisClock(redis)
        # The reads this process makes or waits for, by (key, claim token): its events share one future.
        self._local: dict[tuple[str, str], asyncio.Future[Read | None]] = {}

    async def read(self, key: str, received_at_ms: int, window_ms: int, fetch: Callable[[], Awaitable[Any]]) -> Read:
        """A read that may serve an event received at ``received_at_ms``: a stored one, one in flight, or a
        new call to ``fetch`` (always, for a window of 0). Failures are raised, but a refusal of a read
        it waited for is returned."""
        keep = window_ms + GRACE_MS
        if window_ms == 0:
            data = await fetch()
            return Read("fetched", data, await self._keep_latest(key, data, keep))
        while True:
            cached = await self._cached(key, received_at_ms - window_ms)
            if cached is not None:
                return cached
            token = secrets.token_hex(8)
            claim: list[str | int] = [received_at_ms, window_ms, self._lease_ms, token, keep]
            reply = await self._call(partial(self._acquire, keys=[key], args=claim))
            kind = text(reply[0])
            if kind == "cached":
                with contextlib.suppress(ValueError):
                    return Read("cached", _answer(reply[1]), _int(reply[3]))
                # An answer the service never wrote serves no event: a new generation, and a fresh read.
                await self._call(partial(self._invalidate, keys=[key], args=[keep, text(reply[2])]))
                continue
            if kind == "fetch":
                claimed = self._register(key, token, self._fetch(key, token, int(reply[2]), int(reply[3]), keep, fetch))
                outcome = await asyncio.shield(claimed)
                assert outcome is not None
                return outcome
            joined = await self._join(key, text(reply[1]), int(reply[2]))
            if joined is not None:
                return joined
            # The read went away without an outcome (its worker died): try again.

    async def latest(self, key: str) -> Read:
        """The last read of ``key``, whatever its age: what a skipped read publishes (the hash's, or
        the one a window-0 read kept, whichever answered last)."""
        (data, fetched_at), kept = await self._call(
            lambda: asyncio.gather(self._redis.hmget(key, ["data", "fetchedAt"]), self._redis.get(latest_read_key(key)))
        )
        at, _, kept_data = (kept.encode() if isinstance(kept, str) else kept or b"").partition(b":")
        kept_at = _int(at) if kept_data else None
        reads = [(kept_data, kept_at), (data, _int(fetched_at))]
        if kept_at is None or (fetched_at is not None and kept_at < (_int(fetched_at) or 0)):
            reads.reverse()
        for stored, answered_at in reads:  # one that is not what the service writes leaves the other
            with contextlib.suppress(ValueError):
                return Read("skipped", _answer(stored), answered_at)
        return Read("skipped")  # no read to publish

    async def invalidate(self, key: str, window_ms: int) -> None:
        """No read that started before now serves any event from now on (after a VEHICLE_ERROR)."""
        await self._call(lambda: self._invalidate(keys=[key], args=[window_ms + GRACE_MS, ""]))

    async def _cached(self, key: str, oldest: int) -> Read | None:
        """The hash's read if it started after ``oldest`` (an event's receipt less its window) and since the
        last invalidation, read with one plain ``HMGET``: no script, nothing written. In a fleet that keeps
        reporting most reads are served so (a vehicle's read a day long, its signals four events in five),
        and through a script Lua would hash each byte of the answer (docs/architecture.md, "Shared
        Smartcar reads"). Anything else, what the service never writes included, is left to the acquire
        function, which decides atomically and tests this again."""
        started, data_gen, gen, data, fetched_at = await self._call(lambda: self._redis.hmget(key, _CACHED_FIELDS))
        started_at, read_gen, current_gen = _whole(started), _whole(data_gen or b"0"), _whole(gen or b"0")
        if data is None or started_at is None or started_at <= oldest or read_gen is None or read_gen != current_gen:
            return None
        with contextlib.suppress(ValueError):
            return Read("cached", _answer(data), _int(fetched_at))
        return None

    async def _keep_latest(self, key: str, data: Any, keep: int) -> int:
        """Keep a window-0 read's data, compressed, for a later skipped read, the last read to answer
        winning; returns when it answered, by Redis's clock (core.redis.clock). It serves no other
        event, so it goes in a key of its own in one plain ``SET``, not through a script, where Lua
        would hash each byte of it (docs/architecture.md, "Shared Smartcar reads")."""
        fetched_at: int = await self._call(self._clock.now_ms)
        value = b"%d:%s" % (fetched_at, _deflate(_dumps(data)))
        await self._call(lambda: self._redis.set(latest_read_key(key), value, px=keep))
        return fetched_at

    async def _fetch(
        self, key: str, token: str, started_at: int, generation: int, keep: int, fetch: Callable[[], Awaitable[Any]]
    ) -> Read:
        """Make the call this process claimed and record its outcome for the events sharing it (run as
        a task of its own, so that they do not lose it when the event that started it is cancelled)."""
        try:
            data = await fetch()
        except asyncio.CancelledError:
            # Given up here (the worker stops): the others claim the read now, not after the lease.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(RELEASE_SECONDS):
                    await self._complete(keys=[key], args=[token, started_at, "", "", keep, generation])
            raise
        except Exception as exc:
            failure = _dumps(_describe(exc))
            await self._call(
                lambda: self._complete(keys=[key], args=[token, started_at, "", failure, keep, generation])
            )
            raise
        stored = _deflate(_dumps(data))  # once, whatever the outage's retries
        fetched_at = await self._call(
            lambda: self._complete(keys=[key], args=[token, started_at, stored, "", keep, generation])
        )
        return Read("fetched", data, int(fetched_at))

    async def _join(self, key: str, token: str, started_at: int) -> Read | None:
        """Wait for the read ``token`` to finish: its data, its refusal, or None when it was given up."""
        running = self._local.get((key, token))
        if running is None:
            running = self._register(key, token, self._watch(key, token, started_at))
        try:
            outcome = await asyncio.shield(running)
        except SmartcarRejected as exc:  # a refusal is an outcome the events share, as a value
            return Read("shared", error=exc)
        return None if outcome is None else Read("shared", outcome.data, outcome.fetched_at)

    async def _watch(self, key: str, token: str, started_at: int) -> Read | None:  # another process's read
        pause = POLL_FIRST_SECONDS
        while True:
            reply = await self._call(lambda: self._poll(keys=[key], args=[token, started_at]))
            kind = text(reply[0])
            if kind == "done":
                with contextlib.suppress(ValueError):
                    return Read("shared", _answer(reply[1]), _int(reply[3]))
                return None  # not what the service writes: as if the read went away
            if kind == "failed":
                raise _restore(_loads(reply[1]))
            if kind == "gone":
                return None
            await asyncio.sleep(pause)
            pause = min(POLL_MAX_SECONDS, pause * 1.5)

    def _register(self, key: str, token: str, work: Awaitable[Any]) -> asyncio.Future[Read | None]:
        future: asyncio.Future[Read | None] = asyncio.ensure_future(work)
        self._local[key, token] = future

        def done(finished: asyncio.Future[Read | None]) -> None:
            self._local.pop((key, token), None)
            if not finished.cancelled():
                finished.exception()  # retrieved: the events that shared it may all have gone

        future.add_done_callback(done)
        return future

    @staticmethod
    async def _call(call: Callable[[], Awaitable[Any]]) -> Any:  # Redis trouble is waited out, as elsewhere
        return await until_redis_answers_async(call, give_up_after=REDIS_PATIENCE_SECONDS)


def _describe(exc: Exception) -> dict[str, Any]:
    """A failure as the events waiting on the read get it (never a secret: our own messages only)."""
    if isinstance(exc, SmartcarRejected):
        refusal = {"status": exc.status, "type": exc.error_type, "code": exc.error_code}
        return {"kind": "rejected", "m": exc.message, **refusal}
    if isinstance(exc, SmartcarUnauthorized):
        return {"kind": "unauthorized", "m": exc.message}
    if isinstance(exc, SmartcarRateLimited):
        return {"kind": "rate_limited", "retryAfter": exc.retry_after}
    if isinstance(exc, InvalidPayload):
        return {"kind": "invalid"}
    return {"kind": "unavailable"}


def _restore(failure: dict[str, Any]) -> Exception:
    kind = failure.get("kind")
    if kind == "rejected":
        message = failure.get("m") or "Smartcar refused the read."
        return SmartcarRejected(message, int(failure.get("status") or 400), failure.get("type"), failure.get("code"))
    if kind == "unauthorized":
        return SmartcarUnauthorized(failure.get("m") or "Smartcar refused a fresh application token.")
    if kind == "rate_limited":
        return SmartcarRateLimited("The shared read was rate limited.", failure.get("retryAfter"))
    if kind == "invalid":
        return InvalidPayload("The vehicle id is not a Smartcar vehicle id; no request was sent.")
    return SmartcarUnavailable("The shared read of another event failed; the job will be retried.")


def _dumps(value: Any) -> bytes:
    """Compact JSON (pydantic-core, the parser of the answers: a NaN or infinity is kept as such)."""
    return pydantic_core.to_json(value, inf_nan_mode="constants")


#: Marks a stored answer's JSON (a read hash's ``data``, a kept read's) as compressed, by a byte no JSON text starts with.
LZ4_MARK = b"\x00"
#: The most a stored answer may inflate to: twice the largest answer the client accepts (written again
#: as JSON, a number may be spelt longer: 1e9 as 1000000000.0). An answer past it, only one near the
#: client's limit, is refused like anything else the service does not write.
MAX_KEPT_BYTES = 2 * MAX_ANSWER_BYTES


def _deflate(document: bytes) -> bytes:
    """An answer's JSON as Redis keeps it (a read hash's ``data``, a kept read): LZ4-compressed, a quarter of
    the bytes (6.7 KB to 1.6 KB for the fleet mix's signals) for 3-4 µs, against zlib's 18 (docs/performance.md,
    "Kept reads compressed")."""
    compressed: bytes = lz4.block.compress(document, store_size=True)
    return LZ4_MARK + compressed


def _inflate(stored: bytes) -> bytes:
    """A stored answer's JSON. Redis contents are input too: anything but what :func:`_deflate` writes is
    refused, a block claiming more than an answer may hold before anything is allocated for it."""
    if not stored.startswith(LZ4_MARK):
        raise ValueError("not a stored answer")
    block = stored[len(LZ4_MARK) :]
    if len(block) < 4 or int.from_bytes(block[:4], "little") > MAX_KEPT_BYTES:
        raise ValueError("not a stored answer")
    try:
        document: bytes = lz4.block.decompress(block)
    except lz4.block.LZ4BlockError as exc:
        raise ValueError("not a stored answer") from exc
    return document


def _loads(raw: str | bytes | None) -> Any:
    return None if raw is None else pydantic_core.from_json(raw)


def _answer(stored: str | bytes | None) -> Any:
    """A stored answer (the read hash's ``data``, a kept read's) as the call returned it; ValueError for
    anything :func:`_deflate` did not write, none included."""
    if not stored:
        raise ValueError("not a stored answer")
    return _loads(_inflate(stored.encode() if isinstance(stored, str) else stored))


def _whole(raw: object) -> int | None:
    """A whole number as the service writes one (ASCII digits, at most 20), else None."""
    value = text(raw)
    return int(value) if len(value) <= 20 and value.isascii() and value.isdecimal() else None


def _int(raw: object) -> int | None:
    try:
        return None if raw is None else int(float(text(raw)))
    except (ValueError, OverflowError):  # not a time the service writes (nan, text, inf)
        return None
