"""Operator commands that act on Redis: ``replay``."""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.config import Settings
from core.errors import ConfigurationError
from core.redis.jobs import JobOptions
from core.redis.parked import ReplayReport, replay_parked


def replay(settings: Settings, reason: str | None, limit: int | None) -> int:
    """Re-enqueue parked entries and print what happened; progress on a terminal."""
    interactive = sys.stderr.isatty()

    def progress(report: ReplayReport) -> None:
        if interactive:
            print(f"\\r  scanned {report.scanned}, re-enqueued {report.requeued}", end="", file=sys.stderr)

    async def run() -> ReplayReport:
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
        try:
            options = JobOptions(
                queue=settings.ingest_queue, timeout_seconds=settings.job_timeout_seconds, retries=settings.job_retries
            )
            return await replay_parked(redis, options, settings.parked_stream, reason, limit, progress)
        finally:
            await redis.aclose()

    try:
        report = asyncio.run(run())
    except (RedisError, OSError) as exc:
        raise ConfigurationError(f"Redis at REDIS_URL could not be used ({type(exc).__name__}).") from None
    if interactive:
        print(file=sys.stderr)
    what = f"parked for {reason}" if reason else "parked"
    print(f"re-enqueued {report.requeued} of {report.scanned} entries {what}", end="")
    left = []
    if report.busy:
        left.append(f"{report.busy} whose job is still queued or running")
    if report.without_event_id:
        left.append(f"{report.without_event_id} without an eventId")
    print(f"; left in place: {', '.join(left)}" if left else "")
    return 0
