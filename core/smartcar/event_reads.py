"""Quota-aware enrichment: an event's two Smartcar reads, each shared (:mod:`core.smartcar.reads`) and
budgeted (:mod:`core.smartcar.limiter`); one that cannot go in time is skipped, never failed (what
consumers see: docs/consumers.md, "Schema version 2").
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from core import metrics
from core.config import Settings
from core.errors import SmartcarRateLimited, SmartcarRejected
from core.redis.keys import read_key
from core.smartcar.client import BUDGET_SECONDS, smartcar_client
from core.smartcar.http import SmartcarHttp
from core.smartcar.limiter import RequestLimiter
from core.smartcar.reads import Call, Read, ReadCache


def read_windows_ms(settings: Settings) -> dict[Call, int]:
    """How long a read of each call serves later events, in ms (0: every event reads)."""
    return {"vehicle": settings.vehicle_info_ttl_seconds * 1000, "signals": settings.signals_max_age_seconds * 1000}


class VehicleReads:
    """An event's two reads, shared, budgeted and counted, through ``redis``; one per worker process."""

    def __init__(self, settings: Settings, redis: Redis, http: SmartcarHttp) -> None:
        self._limiter = RequestLimiter(
            redis, settings.smartcar_requests_per_minute, settings.smartcar_burst, settings.enrich_wait_seconds
        )
        self._client = smartcar_client(settings, redis, http, gate=self._limiter)
        # Past the wait for the budget and the client's retries, a claim's worker is taken for dead.
        self._cache = ReadCache(redis, lease_seconds=settings.enrich_wait_seconds + BUDGET_SECONDS + 15)
        self._windows_ms = read_windows_ms(settings)

    async def read_event(
        self, vehicle_id: str, user_id: str, received_at_ms: int, after_error: bool
    ) -> tuple[Read | BaseException, Read | BaseException]:
        """The event's two reads, concurrently: each a :class:`Read` or the exception to handle. After a
        VEHICLE_ERROR (``after_error``), no signals read made until now serves a later event."""
        vehicle, signals = await asyncio.gather(
            self._read("vehicle", vehicle_id, user_id, received_at_ms),
            self._read("signals", vehicle_id, user_id, received_at_ms),
            return_exceptions=True,
        )
        if after_error:
            await self._cache.invalidate(read_key("signals", vehicle_id, user_id), self._windows_ms["signals"])
        return vehicle, signals

    async def _read(self, call: Call, vehicle_id: str, user_id: str, received_at_ms: int) -> Read:
        key = read_key(call, vehicle_id, user_id)
        fetch = self._client.get_vehicle if call == "vehicle" else self._client.get_signals
        self._limiter.start_deadline()  # this call runs in a task of its own (asyncio.gather)
        try:
            read = await self._cache.read(
                key, received_at_ms, self._windows_ms[call], lambda: fetch(vehicle_id, user_id)
            )
        except SmartcarRejected as exc:
            read = Read("fetched", error=exc)
        except SmartcarRateLimited:
            read = await self._cache.latest(key)
        read.call = call
        metrics.ENRICHMENT_READS.labels(call=call, source=read.source).inc()
        return read
