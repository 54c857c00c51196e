"""How many vehicles sent events in the last hour, and how many of them a VEHICLE_ERROR.

Smartcar's monitoring advice includes an alert when VEHICLE_ERROR events come from more than 10 %
of vehicles. A Prometheus counter cannot count *distinct* vehicles, and a vehicle id must never be
a label, so the count lives in Redis: as each event is processed, its vehicle id is added to a
HyperLogLog of the vehicles active in the current 10-minute bucket and, when the event is a
VEHICLE_ERROR reporting an error not RESOLVED, to a second one of the vehicles in error
(:meth:`FleetActivity.note`, keys :func:`core.redis.keys.fleet_key`; each worker gathers the ids in
memory and writes them once a second). Each ``/metrics`` scrape
counts the union of the buckets of the last hour, one ``PFCOUNT`` per kind (:func:`read_fleet`),
and exports two gauges without labels, ``smartcar_ingest_vehicles_active`` and
``smartcar_ingest_vehicles_in_error`` (:func:`fleet_families`).

A HyperLogLog takes at most 12 KB whatever the fleet's size and counts within about 1 %; adding a
vehicle again changes nothing, so a retried or replayed job cannot inflate the counts, and the
registers keep a hash of each id, never the id. A bucket expires an hour after it ends. The web's
Redis user may not run ``PFCOUNT``: the workers export the gauges (aggregate with ``max``, as for
the queue gauges).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.asyncio import Redis as AsyncRedis

from core.events.model import VehicleEvent
from core.logs import get_logger
from core.redis.gathered import Gathered
from core.redis.keys import fleet_key

log = get_logger("smartcar_ingest.fleet")

BUCKET_SECONDS = 600
#: How often a worker writes the vehicles it gathered.
FLUSH_SECONDS = 1.0
#: The window the gauges cover: the current bucket and the six before it (60 to 70 minutes).
WINDOW_SECONDS = 3600
ACTIVE = "active"
IN_ERROR = "errors"

VEHICLES_ACTIVE = "smartcar_ingest_vehicles_active"
VEHICLES_IN_ERROR = "smartcar_ingest_vehicles_in_error"


def in_error(event: VehicleEvent) -> bool:
    """True for a VEHICLE_ERROR that reports an open error: one whose state is not RESOLVED, or
    no error list at all. A VEHICLE_ERROR that only clears earlier errors is not one."""
    if event.event_type != "VEHICLE_ERROR":
        return False
    return not event.errors or any(error.state != "RESOLVED" for error in event.errors)


def _buckets(now: float) -> range:
    current = int(now // BUCKET_SECONDS)
    return range(current - WINDOW_SECONDS // BUCKET_SECONDS, current + 1)


class FleetActivity(Gathered):
    """The workers' side: gathers each processed event's vehicle in memory and adds them to the
    buckets once every :data:`FLUSH_SECONDS`, in one round trip (one ``PFADD`` per bucket and kind)."""

    def __init__(self, redis: AsyncRedis, flush_seconds: float = FLUSH_SECONDS) -> None:
        super().__init__(flush_seconds)
        self._redis = redis
        self._pending: dict[tuple[str, int], set[str]] = {}

    async def note(self, event: VehicleEvent, now: float | None = None) -> None:
        """Count ``event``'s vehicle as active in the current bucket, and as in error when
        :func:`in_error` (written within :data:`FLUSH_SECONDS`, or at :meth:`aclose`)."""
        bucket = int((time.time() if now is None else now) // BUCKET_SECONDS)
        for kind in (ACTIVE, IN_ERROR) if in_error(event) else (ACTIVE,):
            self._pending.setdefault((kind, bucket), set()).add(event.vehicle.id)
        self._write_soon()

    async def flush(self) -> None:
        """Write what was gathered. A statistic, not data: a Redis failure is logged and the
        vehicles dropped, never raised into a job."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for (kind, bucket), vehicles in pending.items():
                    pipe.pfadd(fleet_key(kind, bucket), *vehicles)
                    pipe.expireat(fleet_key(kind, bucket), (bucket + 1) * BUCKET_SECONDS + WINDOW_SECONDS)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning(
                "fleet activity not counted", error=type(exc).__name__, vehicles=sum(map(len, pending.values()))
            )


@dataclass(frozen=True)
class FleetCounts:
    """Distinct vehicles over the last hour."""

    active: int
    """Vehicles that sent a VEHICLE_STATE or VEHICLE_ERROR."""
    in_error: int
    """Those of them that sent a VEHICLE_ERROR reporting an open error."""


def read_fleet(client: redis.Redis, now: float | None = None) -> FleetCounts:
    """Count the vehicles of the last hour's buckets: one round trip of two ``PFCOUNT``."""
    buckets = _buckets(time.time() if now is None else now)
    with client.pipeline(transaction=False) as pipe:
        pipe.pfcount(*(fleet_key(ACTIVE, bucket) for bucket in buckets))
        pipe.pfcount(*(fleet_key(IN_ERROR, bucket) for bucket in buckets))
        active, errors = pipe.execute()
    return FleetCounts(active=int(active), in_error=int(errors))


def fleet_families(counts: FleetCounts | None) -> list[Metric]:
    """The two gauges; empty when ``counts`` is None (the process could not read them)."""
    active = GaugeMetricFamily(
        VEHICLES_ACTIVE,
        "Distinct vehicles whose events were processed in the last hour (60 to 70 minutes; within about 1 %).",
    )
    errors = GaugeMetricFamily(
        VEHICLES_IN_ERROR,
        "Distinct vehicles among them that sent a VEHICLE_ERROR reporting an error not RESOLVED.",
    )
    if counts is not None:
        active.add_metric([], counts.active)
        errors.add_metric([], counts.in_error)
    return [active, errors]
