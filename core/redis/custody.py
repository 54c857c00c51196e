"""Who holds an ingest job between dequeue and start, and which jobs nobody live holds (stranded).

Read by the gauges and ``status``; the worker and the reaper write these keys. Why every job is in
exactly one place: docs/reliability.md, "Between dequeue and finish: where every job is".
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import redis
from rq.job import Job

from core.redis.keys import WORKERS_SET, alive_key, dequeued_key, rq_intermediate_key, text

#: Stranded ids read at most to find the oldest one; the count is always exact.
STRANDED_SCAN_LIMIT = 100


@dataclass(frozen=True)
class Stranded:
    """Jobs that left the queue and that no live worker answers for."""

    count: int
    oldest_age_seconds: float
    """Since the longest-waiting of them was enqueued (0 when there are none)."""


def read_stranded(client: redis.Redis, queue_name: str) -> Stranded:
    """Count the stranded jobs of ``queue_name`` and find the oldest, reading only.

    Ages are measured from each job's ``enqueued_at``, as the queue's own oldest age is.
    """
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(rq_intermediate_key(queue_name))
        pipe.lrange(rq_intermediate_key(queue_name), 0, STRANDED_SCAN_LIMIT - 1)
        pipe.smembers(WORKERS_SET)
        shared_count, shared_ids, members = pipe.execute()
    count = int(shared_count)
    ids = [text(raw) for raw in shared_ids]
    workers = sorted(text(raw) for raw in members)
    if workers:
        with client.pipeline(transaction=False) as pipe:
            for name in workers:
                pipe.exists(alive_key(name))
                pipe.llen(dequeued_key(queue_name, name))
                pipe.lrange(dequeued_key(queue_name, name), 0, STRANDED_SCAN_LIMIT - 1)
            replies = pipe.execute()
        for alive, held, held_ids in zip(replies[::3], replies[1::3], replies[2::3], strict=True):
            if not alive:
                count += int(held)
                ids.extend(text(raw) for raw in held_ids)
    with client.pipeline(transaction=False) as pipe:
        for job_id in ids[:STRANDED_SCAN_LIMIT]:
            pipe.hget(Job.key_for(job_id), "enqueued_at")
        stamps = [stamp for stamp in map(parse_rq_time, pipe.execute()) if stamp is not None]
    return Stranded(count=count, oldest_age_seconds=age_seconds(min(stamps, default=None)))


def age_seconds(since: dt.datetime | None, now: dt.datetime | None = None) -> float:
    """Seconds from ``since`` to ``now`` (default: the current time), never negative; 0 for None."""
    if since is None:
        return 0.0
    return max(0.0, ((now or dt.datetime.now(dt.UTC)) - since).total_seconds())


def parse_rq_time(raw: object) -> dt.datetime | None:
    """An RQ timestamp (``2026-11-28T18:01:03.021294Z``) as an aware UTC datetime, or None."""
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str) or not raw:
        return None
    try:
        parsed = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
