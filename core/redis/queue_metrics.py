"""Queue and stream gauges, read from Redis when Prometheus scrapes.

What is waiting, how old the oldest waiting job is, what is dead-lettered, what is stranded between
dequeue and start (:mod:`core.redis.custody`) and how long the output stream is are facts about Redis,
not about one process: a counter in the web or the worker could not know them.
:class:`QueueCollector` reads them at scrape time instead, in a few short round trips of a
*synchronous* client (prometheus-client calls collectors synchronously) whose every call is
bounded by a short timeout, so a slow Redis costs a scrape a fraction of a second, never a hang.
When Redis cannot be read, only ``smartcar_ingest_redis_up 0`` is exported: the scrape itself still
succeeds, and the gauges go missing rather than reading as zero.

Every process that serves ``/metrics`` reports the same values; aggregate with ``max`` (not
``sum``) across pods. Labels name the queue and the registry, never an event, user or vehicle.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from rq.job import Job
from rq.registry import DeferredJobRegistry, FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from core.config import Settings
from core.redis.clients import scrape_redis
from core.redis.custody import Stranded, age_seconds, parse_rq_time, read_stranded
from core.redis.keys import queue_key, text

#: The RQ registries counted, by the name used in the ``registry`` label and in ``status``.
REGISTRIES = {
    "started": StartedJobRegistry.key_template,
    "failed": FailedJobRegistry.key_template,
    "scheduled": ScheduledJobRegistry.key_template,
    "deferred": DeferredJobRegistry.key_template,
}

QUEUE_DEPTH = "smartcar_ingest_queue_depth"
QUEUE_OLDEST_AGE = "smartcar_ingest_queue_oldest_age_seconds"
REGISTRY_JOBS = "smartcar_ingest_queue_registry_jobs"
OUTPUT_LENGTH = "smartcar_ingest_output_stream_length"
PARKED_LENGTH = "smartcar_ingest_parked_stream_length"
REDIS_UP = "smartcar_ingest_redis_up"
STRANDED_JOBS = "smartcar_ingest_queue_stranded_jobs"
STRANDED_OLDEST_AGE = "smartcar_ingest_queue_stranded_oldest_age_seconds"


@dataclass(frozen=True)
class QueueSnapshot:
    """The queue, its RQ registries and both streams, as read in one go."""

    queue: str
    depth: int
    oldest_enqueued_at: dt.datetime | None
    """When the job at the head of the queue was enqueued (None when the queue is empty)."""
    registries: dict[str, int]
    output_length: int
    parked_length: int

    def oldest_age_seconds(self, now: dt.datetime | None = None) -> float:
        """Seconds the head job has waited; 0 for an empty queue."""
        return age_seconds(self.oldest_enqueued_at, now)


def read_snapshot(client: redis.Redis, settings: Settings) -> QueueSnapshot:
    """Read the queue and stream sizes: one pipelined round trip, plus one for the head job's age.

    RQ pushes jobs on the right and pops them from the left, so the head of the list is the job
    that has waited longest; its hash holds ``enqueued_at`` as a UTC ISO string.
    """
    queue = settings.ingest_queue
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(queue_key(queue))
        pipe.lindex(queue_key(queue), 0)
        pipe.xlen(settings.output_stream)
        pipe.xlen(settings.parked_stream)
        for template in REGISTRIES.values():
            pipe.zcard(template.format(queue))
        depth, head, output_length, parked_length, *counts = pipe.execute()
    oldest = None
    if head is not None:
        job_id = text(head)
        oldest = parse_rq_time(client.hget(Job.key_for(job_id), "enqueued_at"))
    return QueueSnapshot(
        queue=queue,
        depth=int(depth),
        oldest_enqueued_at=oldest,
        registries={name: int(count) for name, count in zip(REGISTRIES, counts, strict=True)},
        output_length=int(output_length),
        parked_length=int(parked_length),
    )


class QueueCollector(Collector):
    """Exports :class:`QueueSnapshot` as gauges on every scrape."""

    def __init__(self, redis_url: str, settings: Settings, timeout_seconds: float = 0.5) -> None:
        self._settings = settings
        self._redis = scrape_redis(redis_url, timeout_seconds)

    def describe(self) -> Iterable[Metric]:
        # Lets the registry check names without a Redis round trip at registration.
        return [*self._families(None), *self._stranded_families(None)]

    def collect(self) -> Iterable[Metric]:
        try:
            snapshot = read_snapshot(self._redis, self._settings)
        except (redis.RedisError, OSError):
            up = GaugeMetricFamily(REDIS_UP, "1 when this process could read the queue and streams from Redis.")
            up.add_metric([], 0)
            return [up]
        try:
            stranded: Stranded | None = read_stranded(self._redis, snapshot.queue)
        except (redis.RedisError, OSError):
            # A web logged in with an ACL older than `redis-acl` prints may not read the workers'
            # liveness keys: the workers, which can, export these gauges (aggregate with max).
            stranded = None
        return [*self._families(snapshot), *self._stranded_families(stranded)]

    def close(self) -> None:
        self._redis.close()

    def _families(self, snapshot: QueueSnapshot | None) -> list[Metric]:
        up = GaugeMetricFamily(REDIS_UP, "1 when this process could read the queue and streams from Redis.")
        depth = GaugeMetricFamily(QUEUE_DEPTH, "Jobs waiting in the RQ ingest queue (LLEN).", labels=["queue"])
        oldest = GaugeMetricFamily(
            QUEUE_OLDEST_AGE, "Seconds the oldest waiting job has been queued (0 when empty).", labels=["queue"]
        )
        registries = GaugeMetricFamily(
            REGISTRY_JOBS,
            "Jobs in the queue's RQ registries (started, failed, scheduled, deferred).",
            labels=["queue", "registry"],
        )
        output = GaugeMetricFamily(OUTPUT_LENGTH, "Entries in the output stream (XLEN).")
        parked = GaugeMetricFamily(PARKED_LENGTH, "Entries in the parked stream (XLEN).")
        if snapshot is not None:
            up.add_metric([], 1)
            depth.add_metric([snapshot.queue], snapshot.depth)
            oldest.add_metric([snapshot.queue], snapshot.oldest_age_seconds())
            for name, count in snapshot.registries.items():
                registries.add_metric([snapshot.queue, name], count)
            output.add_metric([], snapshot.output_length)
            parked.add_metric([], snapshot.parked_length)
        return [up, depth, oldest, registries, output, parked]

    def _stranded_families(self, stranded: Stranded | None) -> list[Metric]:
        jobs = GaugeMetricFamily(
            STRANDED_JOBS,
            "Jobs taken off the queue that no live worker answers for (in RQ's intermediate list, or "
            "dequeued by a worker that died) until a worker's reaper puts them back.",
            labels=["queue"],
        )
        oldest = GaugeMetricFamily(
            STRANDED_OLDEST_AGE, "Seconds since the oldest stranded job was enqueued (0 when none).", labels=["queue"]
        )
        if stranded is not None:
            queue = self._settings.ingest_queue
            jobs.add_metric([queue], stranded.count)
            oldest.add_metric([queue], stranded.oldest_age_seconds())
        return [jobs, oldest]


# Per registry, the collectors registered by this module, the active one last.
_registered: dict[int, list[QueueCollector]] = {}
_lock = threading.Lock()


def register_queue_collector(
    redis_url: str, settings: Settings, registry: CollectorRegistry = REGISTRY
) -> QueueCollector:
    """Register a :class:`QueueCollector` in ``registry`` (the default one unless told otherwise).

    One is active per registry, so the gauges are never exported twice: a second call (a web app
    and a worker metrics server built in one process, as tests do) stands in for the first until
    it is unregistered, and the first is then active again.
    """
    collector = QueueCollector(redis_url, settings)
    with _lock:
        stack = _registered.setdefault(id(registry), [])
        if stack:
            registry.unregister(stack[-1])
        registry.register(collector)
        stack.append(collector)
    return collector


def unregister_queue_collector(collector: QueueCollector, registry: CollectorRegistry = REGISTRY) -> None:
    """Remove ``collector`` and close its client; the one registered before it becomes active again."""
    with _lock:
        stack = _registered.get(id(registry), [])
        if stack and stack[-1] is collector:
            registry.unregister(collector)
            stack.pop()
            if stack:
                registry.register(stack[-1])
        elif collector in stack:
            stack.remove(collector)
        if not stack:
            _registered.pop(id(registry), None)
    collector.close()
