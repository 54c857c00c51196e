"""Counts summed over every worker of the deployment, in Redis: what enrichment cost (for ``status``)
and distinct vehicles active or in error (for the VEHICLE_ERROR alert: no counter counts distinct ids).
docs/architecture.md, "Counts: each fact counted once"."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis

from core import metrics
from core.events.model import VehicleEvent
from core.logs import get_logger
from core.redis.keys import fleet_key, text, usage_key

log = get_logger("smartcar_ingest.deployment_counts")

#: How often a worker writes what it counted.
WRITE_SECONDS = 1.0
#: How long a minute's usage hash is kept; ``status`` sums the last hour.
USAGE_RETENTION_SECONDS = 2 * 3600
#: The fleet's HyperLogLogs: one per kind ("active", "errors") and 10-minute bucket; the gauges
#: cover the current bucket and the six before it (60 to 70 minutes).
BUCKET_SECONDS = 600
WINDOW_SECONDS = 3600


def usage_totals() -> collections.Counter[str]:
    """This process's counters as the fields of the usage hash: ``events`` published,
    ``calls:<endpoint>`` (vehicle and signals requests, retries included), ``reads:<call>:<source>``,
    ``429:<scope>`` and ``waitMs`` (waits for the budget or a pause)."""
    totals = collections.Counter({"events": int(metrics.totals(metrics.JOBS).get(("published",), 0))})
    for (endpoint, _status), count in metrics.totals(metrics.SMARTCAR_CALLS).items():
        if endpoint in metrics.READ_CALLS:  # summed over the statuses
            totals[f"calls:{endpoint}"] += int(count)
    for (call, source), count in metrics.totals(metrics.ENRICHMENT_READS).items():
        totals[f"reads:{call}:{source}"] = int(count)
    for (scope,), count in metrics.totals(metrics.RATE_LIMITED).items():
        totals[f"429:{scope}"] = int(count)
    # Rounded, not truncated: the running float sum of whole-millisecond waits may land a hair under one.
    totals["waitMs"] = round(sum(metrics.totals(metrics.LIMITER_WAIT_SECONDS, "_sum").values()) * 1000)
    return totals


class DeploymentCounts:
    """One worker process's share (one per process: it counts the process's counters from its
    creation): what its counters gained and the vehicles it saw since its last write."""

    def __init__(self, redis_client: AsyncRedis) -> None:
        self._redis = redis_client
        self._written = usage_totals()
        self._vehicles: dict[tuple[str, int], set[str]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._failing = False

    def saw(self, event: VehicleEvent, now: float | None = None) -> None:
        """Count ``event``'s vehicle as active in the current bucket, and in error for a VEHICLE_ERROR
        that reports an open error: one not RESOLVED, or no error list at all."""
        bucket = int((time.time() if now is None else now) // BUCKET_SECONDS)
        in_error = event.event_type == "VEHICLE_ERROR" and (
            not event.errors or any(error.state != "RESOLVED" for error in event.errors)
        )
        for kind in ("active", "errors") if in_error else ("active",):
            self._vehicles.setdefault((kind, bucket), set()).add(event.vehicle.id)

    def start(self) -> None:
        """Write until :meth:`aclose` (call inside the running loop)."""
        self._writer = asyncio.create_task(self._write_every_second(), name="deployment-counts")

    async def _write_every_second(self) -> None:
        # Ended by the event, not by cancelling: a cancellation that lands inside a Redis call can
        # be taken for a timeout there, and a writer that swallowed it would be awaited for ever.
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), WRITE_SECONDS)
            await self.write()

    async def write(self) -> None:
        totals = usage_totals()
        gained = totals - self._written  # counters only grow: what grew, by how much
        vehicles, self._vehicles = self._vehicles, {}
        if not gained and not vehicles:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                if gained:
                    key = usage_key(int(time.time()) // 60)
                    for name, count in gained.items():
                        pipe.hincrby(key, name, count)
                    pipe.expire(key, USAGE_RETENTION_SECONDS)
                for (kind, bucket), ids in vehicles.items():
                    pipe.pfadd(fleet_key(kind, bucket), *ids)
                    pipe.expireat(fleet_key(kind, bucket), (bucket + 1) * BUCKET_SECONDS + WINDOW_SECONDS)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:  # nothing waits on these: try again next time
            if not self._failing:  # once per outage, not every second of it
                log.warning("deployment counts not written; trying again every second", error=type(exc).__name__)
            self._failing = True
            for kind_bucket, ids in vehicles.items():
                self._vehicles.setdefault(kind_bucket, set()).update(ids)
            return
        self._written, self._failing = totals, False

    async def aclose(self) -> None:
        self._closing.set()
        if self._writer is None:
            await self.write()
        else:
            await self._writer  # its last pass writes what is left


def read_usage(client: redis.Redis, minutes: int = 60, now: float | None = None) -> dict[str, Any]:
    """What enrichment cost over the last ``minutes`` minutes (the current one included), as
    ``status`` shows it; one round trip. ``callsPerEvent`` is 2.0 when every event reads both."""
    current = int(time.time() if now is None else now) // 60
    pipe = client.pipeline(transaction=False)
    for minute in range(current - minutes + 1, current + 1):
        pipe.hgetall(usage_key(minute))
    sums: collections.Counter[str] = collections.Counter()
    for counts in pipe.execute():
        sums.update({text(name): int(value) for name, value in counts.items()})

    def fields(kind: str) -> dict[str, int]:
        return {name.partition(":")[2]: n for name, n in sorted(sums.items()) if name.startswith(kind + ":")}

    reads: dict[str, dict[str, int]] = {}
    for name, count in fields("reads").items():
        call, _, source = name.partition(":")
        reads.setdefault(call, {})[source] = count
    calls, events = fields("calls"), sums["events"]
    return {
        "minutes": minutes,
        "events": events,
        "calls": calls,
        "callsPerEvent": round(sum(calls.values()) / events, 3) if events else None,
        "reads": reads,
        "rateLimited": fields("429"),
        "waitedSeconds": round(sums["waitMs"] / 1000, 3),
    }


def read_fleet(client: redis.Redis, now: float | None = None) -> tuple[int, int]:
    """Distinct vehicles over the last hour (within about 1 %): active, and in error; two ``PFCOUNT``,
    which the web's Redis user may not run (the workers export the gauges)."""
    current = int((time.time() if now is None else now) // BUCKET_SECONDS)
    buckets = range(current - WINDOW_SECONDS // BUCKET_SECONDS, current + 1)
    with client.pipeline(transaction=False) as pipe:
        for kind in ("active", "errors"):
            pipe.pfcount(*(fleet_key(kind, bucket) for bucket in buckets))
        active, in_error = pipe.execute()
    return int(active), int(in_error)
