"""Gauges of what Redis holds (queue, registries, stranded jobs, streams, memory, consumer groups,
fleet), read when Prometheus scrapes; ``status`` shows the same readings. Why at scrape time, what
a web leaves to the workers, aggregating with ``max``: docs/architecture.md, "Queue and stream gauges".
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

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
from core.redis.deployment_counts import read_fleet
from core.redis.keys import WORKERS_SET, alive_key, dequeued_key, queue_key, rq_intermediate_key, text
from core.redis.memory import read_memory

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


def _or_none(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except (redis.RedisError, OSError):
        return None


def read_redis(
    client: redis.Redis,
    settings: Settings,
    now: dt.datetime,
    optional: Callable[[Callable[[], Any]], Any] = lambda read: read(),
) -> dict[str, Any]:
    """The queue, stranded jobs, registries, streams, consumer groups and memory as ``status --json``
    shows them; ``optional`` reads each section after the first (the collector's: None when refused)."""
    queue, retention = settings.ingest_queue, settings.output_stream_retention_seconds
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(queue_key(queue))
        pipe.lindex(queue_key(queue), 0)
        pipe.xlen(settings.output_stream)
        pipe.xlen(settings.parked_stream)
        for template in REGISTRIES.values():
            pipe.zcard(template.format(queue))
        depth, head, output_length, parked_length, *counts = pipe.execute()
    oldest = 0.0 if head is None else rq_age_seconds(client.hget(Job.key_for(text(head)), "enqueued_at"), now)
    memory = optional(lambda: read_memory(client))
    return {
        "queue": {"name": queue, "depth": int(depth), "oldestAgeSeconds": round(oldest, 3)},
        "stranded": optional(lambda: read_stranded(client, queue, now)),
        "registries": {name: int(count) for name, count in zip(REGISTRIES, counts, strict=True)},
        "parked": {"stream": settings.parked_stream, "length": int(parked_length)},
        "output": {
            "stream": settings.output_stream,
            "length": int(output_length),
            "retentionSeconds": retention,
            "groups": optional(lambda: read_groups(client, settings.output_stream, retention, now.timestamp() * 1000)),
        },
        "redisMemory": None
        if memory is None
        else {
            "usedBytes": memory.used_bytes,
            "maxBytes": memory.max_bytes,
            "policy": memory.policy,
            "usedFraction": round(memory.used_bytes / memory.max_bytes, 4) if memory.max_bytes else None,
        },
    }


def entry_age_seconds(entry_id: str, now_ms: float) -> float:
    return max(0.0, (now_ms - int(entry_id.split("-", 1)[0])) / 1000)


def read_groups(client: redis.Redis, stream: str, retention: int, now_ms: float) -> list[dict[str, Any]]:
    """Every consumer group of ``stream`` by name ([] without a stream; ``lag`` None before Redis 7);
    raises :class:`redis.exceptions.NoPermissionError` for a user that may not read them."""
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
            behind = entry_age_seconds(text(summary["min"]), now_ms)
        if lag != 0 and (following := client.xrange(stream, min="(" + last, max="+", count=1)):
            behind = max(behind, entry_age_seconds(text(following[0][0]), now_ms))
        rows.append(
            {
                "name": name,
                "consumers": int(info.get("consumers") or 0),
                "pending": pending,
                "lag": lag,
                "lastDeliveredId": last,
                "behindSeconds": round(behind, 3),
                "nearRetention": behind >= GROUP_BEHIND_WARNING * retention,
            }
        )
    return sorted(rows, key=lambda row: row["name"])


def read_stranded(client: redis.Redis, queue_name: str, now: dt.datetime) -> dict[str, Any]:
    """How many jobs of ``queue_name`` are stranded (in RQ's intermediate list, or dequeued by a worker not
    alive) and the oldest's age since enqueued, reading only; where every job is: docs/reliability.md."""
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
        oldest = max((rq_age_seconds(stamp, now) for stamp in pipe.execute()), default=0.0)
    return {"count": count, "oldestAgeSeconds": round(oldest, 3)}


def rq_age_seconds(stamp: object, now: dt.datetime) -> float:
    """Seconds since an RQ timestamp (``2026-11-28T18:01:03.021294Z``), never negative; 0 for none."""
    try:
        return max(0.0, (now - utcparse(text(stamp))).total_seconds()) if stamp else 0.0
    except ValueError:
        return 0.0


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
        # What this Redis user may not read is left to the workers, which can (aggregate with max):
        # the web's may not read consumer groups or run PFCOUNT, and on an ACL older than
        # `redis-acl` prints, may not read the liveness keys or INFO memory.
        try:
            readings = read_redis(client, settings, dt.datetime.now(dt.UTC), _or_none)
        except (redis.RedisError, OSError):
            return _families(settings)[:1]  # redis_up 0, and no gauge that would read zero
        return _families(settings, readings, _or_none(lambda: read_fleet(client)))

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


def _families(settings: Settings, r: dict[str, Any] | None = None, f: tuple[int, int] | None = None) -> list[Metric]:
    """Every gauge of :data:`GAUGES` (redis_up first); those whose reading is None without samples."""
    q, r = [settings.ingest_queue], r or {}
    s, st, m = r.get("queue"), r.get("stranded"), r.get("redisMemory")
    output = r.get("output") or {}
    groups = output.get("groups") or []
    samples: dict[str, list[tuple[list[str], float]]] = {
        "smartcar_ingest_redis_up": [([], 1 if r else 0)],
        "smartcar_ingest_queue_depth": [(q, s["depth"])] if s else [],
        "smartcar_ingest_queue_oldest_age_seconds": [(q, s["oldestAgeSeconds"])] if s else [],
        "smartcar_ingest_queue_registry_jobs": [([*q, name], n) for name, n in r.get("registries", {}).items()],
        "smartcar_ingest_output_stream_length": [([], output["length"])] if output else [],
        "smartcar_ingest_parked_stream_length": [([], r["parked"]["length"])] if r else [],
        "smartcar_ingest_queue_stranded_jobs": [(q, st["count"])] if st else [],
        "smartcar_ingest_queue_stranded_oldest_age_seconds": [(q, st["oldestAgeSeconds"])] if st else [],
        "smartcar_ingest_redis_memory_used_bytes": [([], m["usedBytes"])] if m else [],
        "smartcar_ingest_redis_memory_max_bytes": [([], m["maxBytes"])] if m else [],
        "smartcar_ingest_output_stream_retention_seconds": [([], settings.output_stream_retention_seconds)],
        "smartcar_ingest_output_group_lag": [([g["name"]], g["lag"]) for g in groups if g["lag"] is not None],
        "smartcar_ingest_output_group_pending": [([g["name"]], g["pending"]) for g in groups],
        "smartcar_ingest_output_group_behind_seconds": [([g["name"]], g["behindSeconds"]) for g in groups],
        "smartcar_ingest_vehicles_active": [([], f[0])] if f else [],
        "smartcar_ingest_vehicles_in_error": [([], f[1])] if f else [],
    }
    families: list[Metric] = []
    for name, (documentation, labels) in GAUGES.items():
        families.append(family := GaugeMetricFamily(name, documentation, labels=labels))
        for values, value in samples[name]:
            family.add_metric(values, value)
    return families
