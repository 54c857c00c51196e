"""One request budget for the whole deployment, and Smartcar's 429 pauses, kept in Redis.

The pauses and the GCRA budget: docs/architecture.md, "The request budget and 429 pauses".
"""

from __future__ import annotations

import asyncio
import math
import time
from contextvars import ContextVar

from redis.asyncio import Redis

from core import metrics
from core.errors import SmartcarRateLimited
from core.logs import get_logger
from core.redis.functions import NOW_MS, lua_function
from core.redis.group import GroupCommit
from core.redis.keys import APPLICATION_PAUSE_KEY, BUDGET_KEY, text, vehicle_pause_key
from core.redis.outage import REDIS_PATIENCE_SECONDS, until_redis_answers_async

log = get_logger("smartcar_ingest.limiter")

#: The pause after a 429 that names no ``Retry-After``: doubled on each further one, capped.
PAUSE_BASE_SECONDS = 2.0
PAUSE_CAP_SECONDS = 60.0
#: The most requests one admission call carries.
ADMIT_BATCH = 256

# KEYS: budget, application pause. ARGV: interval ms (0: no budget), tolerance ms, then per request:
# its vehicle's pause key ('' for none), 1 to reserve a budget slot (0: look at the pauses only),
# longest wait ms. Returns {admitted 0/1, wait ms, cause} per request, flat; admitted with a
# reservation means the slot is taken. The requests of one call are admitted in order, on one clock.
_ADMIT = """
local now = now_ms()
local app = tonumber(redis.call('HGET', KEYS[2], 'until')) or 0
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = 0
if interval > 0 then tat = tonumber(redis.call('GET', KEYS[1])) or 0 end
local reserved = false
local pauses, results = {}, {}
for i = 3, #ARGV, 3 do
  local earliest, cause = now, 'none'
  if app > earliest then earliest, cause = app, 'application' end
  local key = ARGV[i]
  if key ~= '' then
    local vehicle = pauses[key]
    if vehicle == nil then
      vehicle = tonumber(redis.call('HGET', key, 'until')) or 0
      pauses[key] = vehicle
    end
    if vehicle > earliest then earliest, cause = vehicle, 'vehicle' end
  end
  local longest = tonumber(ARGV[i + 2])
  local admitted, wait = 1, 0
  if interval <= 0 or ARGV[i + 1] ~= '1' then
    wait = earliest - now
    if wait > longest then admitted = 0 end
  else
    local due = tat
    if due < earliest then due = earliest end
    local at = due - tolerance
    if at < earliest then at = earliest elseif at > earliest then cause = 'budget' end
    wait = math.ceil(at - now)
    if wait > longest then
      admitted = 0
    else
      tat = due + interval
      reserved = true
    end
  end
  results[#results + 1] = admitted
  results[#results + 1] = wait
  results[#results + 1] = cause
end
if reserved then
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
end
return results
"""
_ADMIT_FN = lua_function("admit_requests", _ADMIT, prelude=NOW_MS)

# KEYS: the pause hash. ARGV: Retry-After ms (-1: none), base ms, cap ms. Returns the pause left, ms.
_PAUSE = """
local now = now_ms()
local held = redis.call('HMGET', KEYS[1], 'until', 'strikes')
local until_ms = tonumber(held[1]) or 0
local strikes = tonumber(held[2]) or 0
local duration = tonumber(ARGV[1])
if duration < 0 then
  strikes = strikes + 1
  duration = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ (strikes - 1))
end
if now + duration > until_ms then until_ms = now + math.ceil(duration) end
redis.call('HSET', KEYS[1], 'until', until_ms, 'strikes', strikes)
redis.call('PEXPIRE', KEYS[1], until_ms - now + tonumber(ARGV[3]))
return until_ms - now
"""
_PAUSE_FN = lua_function("pause_requests", _PAUSE, prelude=NOW_MS)


class OverBudget(SmartcarRateLimited):
    """Nothing was sent: the budget or a pause (``cause``) would hold the request past the read's deadline."""

    code = "smartcar_over_budget"

    def __init__(self, wait_seconds: float, cause: str) -> None:
        super().__init__(f"No Smartcar request could be made within the wait allowed ({cause}).", wait_seconds)
        self.cause = cause


_deadline: ContextVar[float | None] = ContextVar("smartcar_read_deadline", default=None)


class RequestLimiter:
    """The gate every request of the workers' client passes (``admit``), told of each 429 (``rate_limited``)."""

    def __init__(
        self,
        redis: Redis,
        requests_per_minute: float | None = None,
        burst: int | None = None,
        wait_seconds: float = 10.0,
    ) -> None:
        self._admit = _ADMIT_FN.bind(redis)
        self._admissions: GroupCommit[tuple[str, str, int], tuple[int, int, str]] = GroupCommit(
            self._admit_together, ADMIT_BATCH
        )
        self._pause = _PAUSE_FN.bind(redis)
        self._wait = wait_seconds
        if requests_per_minute is None:
            self._interval_ms, self._tolerance_ms = 0.0, 0.0
        else:
            self._interval_ms = 60_000.0 / requests_per_minute
            allowed_at_once = burst if burst is not None else max(1, math.floor(requests_per_minute))
            self._tolerance_ms = (allowed_at_once - 1) * self._interval_ms

    def start_deadline(self) -> None:
        """The requests of the calling task (and its tasks) wait ``ENRICH_WAIT_SECONDS`` from now in all."""
        _deadline.set(time.monotonic() + self._wait)

    async def admit(self, vehicle_id: str | None) -> None:
        """Return when a request for ``vehicle_id`` may be sent (its budget slot taken), or raise
        :class:`OverBudget` at once when that cannot be within the deadline."""
        pause_key = "" if vehicle_id is None else vehicle_pause_key(vehicle_id)
        while True:
            allowed, wait_ms, cause = await self._run(pause_key, reserve=True)
            if not allowed:
                metrics.LIMITER_DENIALS.labels(cause=cause).inc()
                raise OverBudget(wait_ms / 1000, cause)
            if wait_ms <= 0:
                break
            metrics.LIMITER_WAIT_SECONDS.labels(cause=cause).observe(wait_ms / 1000)
            await asyncio.sleep(wait_ms / 1000)
            # A 429 may have paused calls meanwhile: look again (the pauses only) and start over if one did.
            _, paused_ms, _ = await self._run(pause_key, reserve=False)
            if paused_ms <= 0:
                break

    async def rate_limited(
        self, endpoint: str, vehicle_id: str | None, error_code: str | None, retry_after: float | None
    ) -> None:
        """Smartcar answered 429: pause that vehicle's calls, or every call (``RATE_LIMIT:SMARTCAR_API``
        or no vehicle named), in every process."""
        scope = "application" if vehicle_id is None or error_code == "SMARTCAR_API" else "vehicle"
        key = APPLICATION_PAUSE_KEY if scope == "application" else vehicle_pause_key(str(vehicle_id))
        duration_ms = -1 if retry_after is None else math.ceil(retry_after * 1000)
        args = [duration_ms, int(PAUSE_BASE_SECONDS * 1000), int(PAUSE_CAP_SECONDS * 1000)]
        paused_ms = await until_redis_answers_async(
            lambda: self._pause(keys=[key], args=args), give_up_after=REDIS_PATIENCE_SECONDS
        )
        metrics.RATE_LIMITED.labels(scope=scope).inc()
        log.warning("Smartcar rate limited a call", endpoint=endpoint, scope=scope, pausedMs=int(paused_ms))

    async def _run(self, pause_key: str, reserve: bool) -> tuple[int, int, str]:
        deadline = _deadline.get()
        longest = self._wait if deadline is None else max(0.0, deadline - time.monotonic())
        request = (pause_key, "1" if reserve else "0", int(longest * 1000))
        return await until_redis_answers_async(
            lambda: self._admissions.submit(request), give_up_after=REDIS_PATIENCE_SECONDS
        )

    async def _admit_together(self, requests: list[tuple[str, str, int]]) -> list[tuple[int, int, str]]:
        """One function call for the requests that asked meanwhile (:mod:`core.redis.group`)."""
        args: list[str | int] = [f"{self._interval_ms:.3f}", f"{self._tolerance_ms:.3f}"]
        for request in requests:
            args.extend(request)
        reply = await self._admit(keys=[BUDGET_KEY, APPLICATION_PAUSE_KEY], args=args)
        return [(int(reply[i]), int(reply[i + 1]), text(reply[i + 2])) for i in range(0, len(reply), 3)]
