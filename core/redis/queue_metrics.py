"""Gauges of what Redis holds (queue, registries, stranded jobs, streams, memory, consumer groups,
fleet), read when Prometheus scrapes; ``status`` shows the same readings. Why at scrape time, what
a web leaves to the workers, aggregating with ``max``: docs/architecture.md, "Queue and stream gauges".
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import redis
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from rq.job import Job
from rq.registry import DeferredJobRegistry, FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.utils import utcparse

from core.config import Settings
from core.redis.clients import probe_redis
from core.redis.deployment_counts import FleetCounts, read_fleet
from core.redis.keys import WORKERS_SET, alive_key, dequeued_key, queue_key, rq_intermediate_key, text
from core.redis.memory import RedisMemory, read_memory

#: The RQ registries counted, by the name used in the ``registry`` label and in ``status``.
REGISTRIES = {
    "started": StartedJobRegistry.key_template,
    "failed": FailedJobRegistry.key_template,
    "scheduled": ScheduledJobRegistry.key_template,
    "deferred": DeferredJobRegistry.key_template,
}
#: A group this far behind (a fraction of the retention) is flagged by ``status`` and the alert.
GROUP_BEHIND_WARNING = 0.8
#: Stranded ids read at most to find the oldest one; the count is always exact.
STRANDED_SCAN_LIMIT = 100

T = TypeVar("T")


@dataclass(frozen=True)
class GroupLag:
    """One consumer group of a stream (``lag`` is None when Redis cannot tell, before Redis 7)."""

    name: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered_id: str
    behind_seconds: float


def entry_age_seconds(entry_id: str, now_ms: float) -> float:
    return max(0.0, (now_ms - int(entry_id.split("-", 1)[0])) / 1000)


def read_groups(client: redis.Redis, stream: str, now_ms: float | None = None) -> list[GroupLag]:
    """Every consumer group of ``stream`` by name ([] without a stream); raises
    :class:`redis.exceptions.NoPermissionError` for a user that may not read them."""
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
        last = text(info.get("last-delivered-id", "0-0"))
        lag = None if info.get("lag") is None else int(info["lag"])
        behind = 0.0
        if pending and (summary := client.xpending(stream, name)) and summary.get("min"):
            behind = entry_age_seconds(text(summary["min"]), now)
        if lag != 0 and (following := client.xrange(stream, min="(" + last, max="+", count=1)):
            behind = max(behind, entry_age_seconds(text(following[0][0]), now))
        rows.append(GroupLag(name, int(info.get("consumers") or 0), pending, lag, last, behind))
    return sorted(rows, key=lambda row: row.name)


@dataclass(frozen=True)
class QueueSnapshot:
    queue: str
    depth: int
    oldest_age_seconds: float
    registries: dict[str, int]
    output_length: int
    parked_length: int


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
    oldest = None if head is None else parse_rq_time(client.hget(Job.key_for(text(head)), "enqueued_at"))
    registries = {name: int(count) for name, count in zip(REGISTRIES, counts, strict=True)}
    return QueueSnapshot(queue, int(depth), age_seconds(oldest), registries, int(output_length), int(parked_length))


@dataclass(frozen=True)
class Stranded:
    """Jobs that left the queue and that no live worker answers for; the oldest's age is since it
    was enqueued (0 when there are none)."""

    count: int
    oldest_age_seconds: float


def read_stranded(client: redis.Redis, queue_name: str) -> Stranded:
    """Count the stranded jobs of ``queue_name`` (in RQ's intermediate list, or dequeued by a worker
    not alive) and find the oldest, reading only. Where every job is between dequeue and start:
    docs/reliability.md, "Between dequeue and finish: where every job is"."""
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(rq_intermediate_key(queue_name))
        pipe.lrange(rq_intermediate_key(queue_name), 0, STRANDED_SCAN_LIMIT - 1)
        pipe.smembers(WORKERS_SET)
        shared_count, shared_ids, members = pipe.execute()
    count = int(shared_count)
    ids = [text(raw) for raw in shared_ids]
    with client.pipeline(transaction=False) as pipe:
        for name in sorted(map(text, members)):
            pipe.exists(alive_key(name))
            pipe.llen(dequeued_key(queue_name, name))
            pipe.lrange(dequeued_key(queue_name, name), 0, STRANDED_SCAN_LIMIT - 1)
        replies = pipe.execute()
    for alive, held, held_ids in zip(replies[::3], replies[1::3], replies[2::3], strict=True):
        if not alive:
            count += int(held)
            ids.extend(map(text, held_ids))
    with client.pipeline(transaction=False) as pipe:
        for job_id in ids[:STRANDED_SCAN_LIMIT]:
            pipe.hget(Job.key_for(job_id), "enqueued_at")
        stamps = [stamp for stamp in map(parse_rq_time, pipe.execute()) if stamp is not None]
    return Stranded(count, age_seconds(min(stamps, default=None)))


def age_seconds(since: dt.datetime | None, now: dt.datetime | None = None) -> float:
    """Seconds from ``since`` to ``now`` (default: the current time), never negative; 0 for None."""
    if since is None:
        return 0.0
    return max(0.0, ((now or dt.datetime.now(dt.UTC)) - since).total_seconds())


def parse_rq_time(raw: object) -> dt.datetime | None:
    """An RQ timestamp (``2026-11-28T18:01:03.021294Z``) as an aware UTC datetime, or None."""
    try:
        return utcparse(text(raw)) if raw else None
    except ValueError:
        return None


class QueueCollector(Collector):
    """The gauges, read from Redis on every scrape."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._redis = probe_redis(settings.redis_url)

    def describe(self) -> Iterable[Metric]:
        # Lets the registry check names without a Redis round trip at registration.
        return _families(self._settings)

    def collect(self) -> Iterable[Metric]:
        client, settings = self._redis, self._settings
        try:
            snapshot = read_snapshot(client, settings)
        except (redis.RedisError, OSError):
            return _families(settings)[:1]  # redis_up 0, and no gauge that would read zero
        # What this Redis user may not read is left to the workers, which can (aggregate with max):
        # the web's may not read consumer groups or run PFCOUNT, and on an ACL older than
        # `redis-acl` prints, may not read the liveness keys or INFO memory.
        return _families(
            settings,
            snapshot,
            _or_none(lambda: read_stranded(client, settings.ingest_queue)),
            _or_none(lambda: read_memory(client)),
            _or_none(lambda: read_groups(client, settings.output_stream)),
            _or_none(lambda: read_fleet(client)),
        )

    def close(self) -> None:
        self._redis.close()


def endpoint_registry(collector: QueueCollector) -> CollectorRegistry:
    """What one ``/metrics`` endpoint serves: this process's metrics (summed over every process of
    the server when ``PROMETHEUS_MULTIPROC_DIR`` is set, as ``web --workers N`` sets it) and ``collector``'s gauges."""
    registry = CollectorRegistry()
    if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(REGISTRY)
    registry.register(collector)
    return registry


def _or_none(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except (redis.RedisError, OSError):
        return None


#: Every gauge: its help and its labels.
GAUGES: dict[str, tuple[str, list[str]]] = {
    "smartcar_ingest_redis_up": ("1 when this process could read the queue and streams from Redis.", []),
    "smartcar_ingest_queue_depth": ("Jobs waiting in the RQ ingest queue (LLEN).", ["queue"]),
    "smartcar_ingest_queue_oldest_age_seconds": (
        "Seconds the oldest waiting job has been queued (0 when empty).",
        ["queue"],
    ),
    "smartcar_ingest_queue_registry_jobs": (
        "Jobs in the queue's RQ registries (started, failed, scheduled, deferred).",
        ["queue", "registry"],
    ),
    "smartcar_ingest_output_stream_length": ("Entries in the output stream (XLEN).", []),
    "smartcar_ingest_parked_stream_length": ("Entries in the parked stream (XLEN).", []),
    "smartcar_ingest_queue_stranded_jobs": (
        "Jobs taken off the queue that no live worker answers for (in RQ's intermediate list, or "
        "dequeued by a worker that died) until a worker's reaper puts them back.",
        ["queue"],
    ),
    "smartcar_ingest_queue_stranded_oldest_age_seconds": (
        "Seconds since the oldest stranded job was enqueued (0 when none).",
        ["queue"],
    ),
    "smartcar_ingest_redis_memory_used_bytes": ("Bytes Redis has allocated (INFO memory used_memory).", []),
    "smartcar_ingest_redis_memory_max_bytes": ("Redis's maxmemory in bytes; 0 when it has no limit.", []),
    "smartcar_ingest_output_stream_retention_seconds": (
        "OUTPUT_STREAM_RETENTION_SECONDS: output entries older than this are trimmed.",
        [],
    ),
    "smartcar_ingest_output_group_lag": ("Output entries not yet delivered to the consumer group.", ["group"]),
    "smartcar_ingest_output_group_pending": ("Output entries delivered to the group and not acknowledged.", ["group"]),
    "smartcar_ingest_output_group_behind_seconds": (
        "Age of the oldest output entry the group has not read or not acknowledged (0 when up to date); "
        "past the retention, the trim drops entries it has not finished.",
        ["group"],
    ),
    "smartcar_ingest_vehicles_active": (
        "Distinct vehicles whose events were processed in the last hour (60 to 70 minutes; within about 1 %).",
        [],
    ),
    "smartcar_ingest_vehicles_in_error": (
        "Distinct vehicles among them that sent a VEHICLE_ERROR reporting an error not RESOLVED.",
        [],
    ),
}


def _families(
    settings: Settings,
    s: QueueSnapshot | None = None,
    st: Stranded | None = None,
    m: RedisMemory | None = None,
    groups: list[GroupLag] | None = None,
    f: FleetCounts | None = None,
) -> list[Metric]:
    """Every gauge of :data:`GAUGES` (redis_up first); those whose reading is None without samples."""
    q, groups = [settings.ingest_queue], groups or []
    samples: dict[str, list[tuple[list[str], float]]] = {
        "smartcar_ingest_redis_up": [([], 1 if s else 0)],
        "smartcar_ingest_queue_depth": [(q, s.depth)] if s else [],
        "smartcar_ingest_queue_oldest_age_seconds": [(q, s.oldest_age_seconds)] if s else [],
        "smartcar_ingest_queue_registry_jobs": [([*q, name], n) for name, n in s.registries.items()] if s else [],
        "smartcar_ingest_output_stream_length": [([], s.output_length)] if s else [],
        "smartcar_ingest_parked_stream_length": [([], s.parked_length)] if s else [],
        "smartcar_ingest_queue_stranded_jobs": [(q, st.count)] if st else [],
        "smartcar_ingest_queue_stranded_oldest_age_seconds": [(q, st.oldest_age_seconds)] if st else [],
        "smartcar_ingest_redis_memory_used_bytes": [([], m.used_bytes)] if m else [],
        "smartcar_ingest_redis_memory_max_bytes": [([], m.max_bytes)] if m else [],
        "smartcar_ingest_output_stream_retention_seconds": [([], settings.output_stream_retention_seconds)],
        "smartcar_ingest_output_group_lag": [([g.name], g.lag) for g in groups if g.lag is not None],
        "smartcar_ingest_output_group_pending": [([g.name], g.pending) for g in groups],
        "smartcar_ingest_output_group_behind_seconds": [([g.name], g.behind_seconds) for g in groups],
        "smartcar_ingest_vehicles_active": [([], f.active)] if f else [],
        "smartcar_ingest_vehicles_in_error": [([], f.in_error)] if f else [],
    }
    families: list[Metric] = []
    for name, (documentation, labels) in GAUGES.items():
        families.append(family := GaugeMetricFamily(name, documentation, labels=labels))
        for values, value in samples[name]:
            family.add_metric(values, value)
    return families
