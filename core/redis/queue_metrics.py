"""Gauges of what Redis holds (queue, registries, stranded jobs, streams, memory, consumer groups,
fleet), read when Prometheus scrapes.

Why at scrape time, what a web may leave to the workers, and aggregating with ``max``:
docs/architecture.md, "Queue and stream gauges".
"""

from __future__ import annotations

import datetime as dt
import threading
import time
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
from core.redis.deployment_counts import FleetCounts, fleet_families, read_fleet
from core.redis.keys import queue_key, text
from core.redis.memory import RedisMemory, read_memory

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
MEMORY_USED = "smartcar_ingest_redis_memory_used_bytes"
MEMORY_MAX = "smartcar_ingest_redis_memory_max_bytes"
OUTPUT_RETENTION = "smartcar_ingest_output_stream_retention_seconds"
GROUP_LAG = "smartcar_ingest_output_group_lag"
GROUP_PENDING = "smartcar_ingest_output_group_pending"
GROUP_BEHIND = "smartcar_ingest_output_group_behind_seconds"
#: A group this far behind (a fraction of the retention) is flagged by ``status`` and the alert.
GROUP_BEHIND_WARNING = 0.8


@dataclass(frozen=True)
class GroupLag:
    """How far one consumer group of a stream is behind."""

    name: str
    consumers: int
    pending: int
    """Entries delivered to the group's consumers and not acknowledged."""
    lag: int | None
    """Entries not yet delivered to the group (Redis 7; None when Redis cannot tell)."""
    last_delivered_id: str
    oldest_pending_age_seconds: float | None
    """Age of the oldest unacknowledged entry (None when none is pending)."""
    oldest_unread_age_seconds: float | None
    """Age of the oldest entry not yet delivered to the group (None when it has read everything)."""

    @property
    def behind_seconds(self) -> float:
        """Age of the oldest entry the group has not finished with: 0 when it is up to date. Past
        the stream's retention, the trim removes entries the group has not finished."""
        return max(self.oldest_pending_age_seconds or 0.0, self.oldest_unread_age_seconds or 0.0)


def entry_age_seconds(entry_id: str, now_ms: float) -> float:
    """Seconds since a stream entry id's time part."""
    return max(0.0, (now_ms - int(entry_id.split("-", 1)[0])) / 1000)


def read_groups(client: redis.Redis, stream: str, now_ms: float | None = None) -> list[GroupLag]:
    """Every consumer group of ``stream`` with how far behind it is, sorted by name; [] without a stream.

    Raises :class:`redis.exceptions.NoPermissionError` for a user that may not read them.
    """
    now = time.time() * 1000 if now_ms is None else now_ms
    try:
        groups = client.xinfo_groups(stream)
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError:  # no such stream yet: no groups
        return []
    rows = []
    for group in groups:
        info = {text(key): value for key, value in group.items()}
        name = text(info.get("name", ""))
        pending = int(info.get("pending") or 0)
        lag = None if info.get("lag") is None else int(info["lag"])
        last = text(info.get("last-delivered-id", "0-0"))
        oldest_pending = None
        if pending:
            summary = client.xpending(stream, name)
            if summary and summary.get("min"):
                oldest_pending = entry_age_seconds(text(summary["min"]), now)
        oldest_unread = None
        if lag != 0:
            following = client.xrange(stream, min="(" + last, max="+", count=1)
            if following:
                oldest_unread = entry_age_seconds(text(following[0][0]), now)
        rows.append(
            GroupLag(
                name=name,
                consumers=int(info.get("consumers") or 0),
                pending=pending,
                lag=lag,
                last_delivered_id=last,
                oldest_pending_age_seconds=oldest_pending,
                oldest_unread_age_seconds=oldest_unread,
            )
        )
    return sorted(rows, key=lambda row: row.name)


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
    """The queue's and streams' sizes, and when the job that has waited longest was enqueued."""
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
        return [
            *self._families(None),
            *self._stranded_families(None),
            *self._memory_families(None),
            *self._group_families(None),
            *fleet_families(None),
        ]

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
        try:
            memory: RedisMemory | None = read_memory(self._redis)
        except (redis.RedisError, OSError):
            memory = None  # a user without INFO memory (an older ACL): the other processes export it
        try:
            groups: list[GroupLag] | None = read_groups(self._redis, self._settings.output_stream)
        except (redis.RedisError, OSError):
            groups = None  # the web user may not read the output stream's groups: the workers export them
        try:
            fleet: FleetCounts | None = read_fleet(self._redis)
        except (redis.RedisError, OSError):
            fleet = None  # the web user may not run PFCOUNT: the workers export the fleet gauges
        return [
            *self._families(snapshot),
            *self._stranded_families(stranded),
            *self._memory_families(memory),
            *self._group_families(groups),
            *fleet_families(fleet),
        ]

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

    def _memory_families(self, memory: RedisMemory | None) -> list[Metric]:
        used = GaugeMetricFamily(MEMORY_USED, "Bytes Redis has allocated (INFO memory used_memory).")
        limit = GaugeMetricFamily(MEMORY_MAX, "Redis's maxmemory in bytes; 0 when it has no limit.")
        if memory is not None:
            used.add_metric([], memory.used_bytes)
            limit.add_metric([], memory.max_bytes)
        return [used, limit]

    def _group_families(self, groups: list[GroupLag] | None) -> list[Metric]:
        retention = GaugeMetricFamily(
            OUTPUT_RETENTION, "OUTPUT_STREAM_RETENTION_SECONDS: output entries older than this are trimmed."
        )
        retention.add_metric([], self._settings.output_stream_retention_seconds)
        lag = GaugeMetricFamily(GROUP_LAG, "Output entries not yet delivered to the consumer group.", labels=["group"])
        pending = GaugeMetricFamily(
            GROUP_PENDING, "Output entries delivered to the group and not acknowledged.", labels=["group"]
        )
        behind = GaugeMetricFamily(
            GROUP_BEHIND,
            "Age of the oldest output entry the group has not read or not acknowledged (0 when up to date); "
            "past the retention, the trim drops entries it has not finished.",
            labels=["group"],
        )
        for group in groups or []:
            if group.lag is not None:
                lag.add_metric([group.name], group.lag)
            pending.add_metric([group.name], group.pending)
            behind.add_metric([group.name], group.behind_seconds)
        return [retention, lag, pending, behind]


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
