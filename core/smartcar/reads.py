"""Quota-aware enrichment: what an event reads from Smartcar, and where each piece came from.

Each event wants its vehicle's attributes (``GET /vehicles/{id}``) and latest signals
(``GET /vehicles/{id}/signals``), read with the application token and its ``sc-user-id``. A read
serves every event it can (:mod:`core.smartcar.cache`): attributes for ``VEHICLE_INFO_TTL_SECONDS``
and signals for ``SIGNALS_MAX_AGE_SECONDS`` after the read started, across every worker process;
a window of 0 reads on every event. A VEHICLE_ERROR makes the next event read the signals afresh.

Every request goes through the deployment's budget and Smartcar's pauses
(:mod:`core.smartcar.limiter`). A read that cannot be made within ``ENRICH_WAIT_SECONDS`` (or that
Smartcar rate limits past its retries) is *skipped*: the event is published at once with
whatever is cached, however old, and the read is named ``skipped`` with reason ``rate_limited``.
Rate limiting never fails the job, so it never parks an event or makes a job retry in a loop.

Outcomes per read (:class:`Read`); anything else is raised for the processor to decide
(a 401 that survived a refresh, a transient failure, an id that is not a Smartcar id):

=========  ===========================================================================
fetched    this event's own call answered
cached     a read already made served it
shared     it waited for another event's call in flight (any process)
skipped    rate limited: the cached data, if any, stands in (``reason: rate_limited``)
=========  ===========================================================================

A read Smartcar refused for good (a 4xx other than 401 and 429) is ``fetched`` or ``shared`` with
``reason: rejected`` and no data; refusals are not cached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from core import metrics
from core.config import Settings
from core.errors import SmartcarRateLimited, SmartcarRejected
from core.redis.keys import read_key
from core.smartcar.cache import ReadCache, Shared
from core.smartcar.client import SmartcarClient, smartcar_client
from core.smartcar.http import SmartcarHttp
from core.smartcar.limiter import RequestLimiter

Call = Literal["vehicle", "signals"]
#: The most one read's requests take, retries included (the client's own budget).
CALL_BUDGET_SECONDS = 30.0
Source = Literal["fetched", "cached", "shared", "skipped"]


@dataclass(frozen=True)
class Read:
    """One read as one event got it."""

    call: Call
    source: Source
    data: Any = None
    fetched_at: int | None = None
    """When Smartcar answered the read whose data this is (epoch ms); None without data."""
    reason: Literal["rate_limited", "rejected"] | None = None
    error: SmartcarRejected | None = None
    """The refusal, for ``reason: rejected``."""

    def describe(self) -> dict[str, Any]:
        """The read as the payload's ``enrichment.reads.<call>`` shows it."""
        return {"source": self.source, "fetchedAt": self.fetched_at, "reason": self.reason}


@dataclass(frozen=True)
class Windows:
    """How long a read serves later events, per call, in seconds (0: every event reads)."""

    vehicle: int = 86_400
    signals: int = 300

    def ms(self, call: Call) -> int:
        return (self.vehicle if call == "vehicle" else self.signals) * 1000


class VehicleReads:
    """An event's two reads, shared, budgeted and counted. One per worker process."""

    def __init__(self, client: SmartcarClient, cache: ReadCache, limiter: RequestLimiter, windows: Windows) -> None:
        self._client = client
        self._cache = cache
        self._limiter = limiter
        self._windows = windows

    async def read_event(
        self, vehicle_id: str, user_id: str, received_at_ms: int, after_error: bool
    ) -> tuple[Read | BaseException, Read | BaseException]:
        """The vehicle and signals reads for one event, concurrently; each a :class:`Read` or the
        exception the processor must handle. ``after_error``: the event is a VEHICLE_ERROR, so no
        signals read made until now serves a later event."""
        vehicle, signals = await asyncio.gather(
            self._read("vehicle", vehicle_id, user_id, received_at_ms, self._client.get_vehicle),
            self._read("signals", vehicle_id, user_id, received_at_ms, self._client.get_signals),
            return_exceptions=True,
        )
        if after_error:
            await self._cache.invalidate(read_key("signals", vehicle_id, user_id), self._windows.ms("signals"))
        return vehicle, signals

    async def _read(
        self,
        call: Call,
        vehicle_id: str,
        user_id: str,
        received_at_ms: int,
        fetch: Callable[[str, str], Awaitable[Any]],
    ) -> Read:
        key = read_key(call, vehicle_id, user_id)
        window = self._windows.ms(call)
        with self._limiter.deadline():
            try:
                if window == 0:
                    started = time.time_ns() // 1_000_000
                    data = await fetch(vehicle_id, user_id)
                    got = Shared("fetched", data, await self._cache.store(key, data, started, window))
                else:
                    got = await self._cache.read(key, received_at_ms, window, lambda: fetch(vehicle_id, user_id))
            except (SmartcarRateLimited, SmartcarRejected) as exc:
                got = Shared("fetched", None, None, exc)
        read = await self._settle(call, key, got)
        metrics.ENRICHMENT_READS.labels(call=call, source=read.source).inc()
        return read

    async def _settle(self, call: Call, key: str, got: Shared) -> Read:
        """The read an outcome amounts to; a failure other than a refusal or a rate limit is raised."""
        error = got.error
        if error is None:
            return Read(call, got.source, got.data, got.fetched_at)
        if isinstance(error, SmartcarRejected):
            return Read(call, got.source, reason="rejected", error=error)
        if isinstance(error, SmartcarRateLimited):
            data, fetched_at = await self._cache.latest(key) or (None, None)
            return Read(call, "skipped", data, fetched_at if data is not None else None, reason="rate_limited")
        raise error


def vehicle_reads(settings: Settings, redis: Redis, http: SmartcarHttp) -> VehicleReads:
    """The reads of a worker process, as the settings say: the v3 client behind the deployment's
    limiter (``SMARTCAR_REQUESTS_PER_MINUTE``, ``SMARTCAR_BURST``, ``ENRICH_WAIT_SECONDS``) and the
    shared reads (``VEHICLE_INFO_TTL_SECONDS``, ``SIGNALS_MAX_AGE_SECONDS``), all through ``redis``."""
    limiter = RequestLimiter(
        redis, settings.smartcar_requests_per_minute, settings.smartcar_burst, settings.enrich_wait_seconds
    )
    client = smartcar_client(settings, redis, http, budget_seconds=CALL_BUDGET_SECONDS, gate=limiter)
    # A claimed read may wait for the budget, then retry within the client's budget; past that its
    # worker is taken for dead and another event claims the read.
    cache = ReadCache(redis, lease_seconds=settings.enrich_wait_seconds + CALL_BUDGET_SECONDS + 15)
    windows = Windows(vehicle=settings.vehicle_info_ttl_seconds, signals=settings.signals_max_age_seconds)
    return VehicleReads(client, cache, limiter, windows)
