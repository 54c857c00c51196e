"""What enrichment costs, per minute, for the whole deployment: events, Smartcar calls, reads, 429s.

Prometheus counters are per process; ``smartcar-ingest status`` wants the deployment's figures,
so each process adds its counts to one Redis hash per minute (:func:`core.redis.keys.usage_key`),
kept :data:`RETENTION_SECONDS`. A process sums its events' counts in memory and writes them once
every :data:`FLUSH_SECONDS` in one round trip, not once per event; counts of the last second are
lost if the process dies. Fields:

==========================  =================================================================
``events``                  events enriched (published, or about to be)
``calls:<endpoint>``        requests sent to Smartcar for them (``vehicle``, ``signals``), retries included
``reads:<call>:<source>``   where each event's vehicle and signals came from (fetched, cached, shared, skipped)
``429:<scope>``             429 answers, by scope (``vehicle``, ``application``)
``waitMs``                  milliseconds requests waited for the budget or a pause
==========================  =================================================================
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.asyncio import Redis

from core.redis.gathered import Gathered
from core.redis.keys import text, usage_key

#: How long a minute's counts are kept; ``status`` sums the last hour.
RETENTION_SECONDS = 2 * 3600
#: How often a process writes the counts it gathered.
FLUSH_SECONDS = 1.0


class Usage(Gathered):
    """Adds each event's counts to the current minute, in memory; :meth:`flush` writes them."""

    failure_message = "could not record enrichment usage"

    def __init__(self, redis_client: Redis, flush_seconds: float = FLUSH_SECONDS) -> None:
        super().__init__(flush_seconds)
        self._redis = redis_client
        self._pending: dict[int, collections.Counter[str]] = {}

    async def record(
        self,
        calls: Mapping[str, int],
        sources: Mapping[str, str],
        rate_limited: Mapping[str, int],
        waited_seconds: float,
        events: int = 1,
    ) -> None:
        """Count one event (``events=0`` for an attempt that failed and will be retried: its calls only)."""
        counts = self._pending.setdefault(int(time.time()) // 60, collections.Counter())
        if events:
            counts["events"] += events
        for endpoint, count in calls.items():
            counts[f"calls:{endpoint}"] += count
        for call, source in sources.items():
            counts[f"reads:{call}:{source}"] += 1
        for scope, count in rate_limited.items():
            counts[f"429:{scope}"] += count
        if waited_seconds > 0:
            counts["waitMs"] += int(waited_seconds * 1000)
        self._write_soon()

    async def flush(self) -> None:
        """Write what was counted since the last flush (one pipeline)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        pipe = self._redis.pipeline(transaction=False)
        for minute, counts in pending.items():
            key = usage_key(minute)
            for name, count in counts.items():
                pipe.hincrby(key, name, count)
            pipe.expire(key, RETENTION_SECONDS)
        await pipe.execute()


@dataclass
class UsageReport:
    """The counts of the last ``minutes`` minutes, summed."""

    minutes: int
    events: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    reads: dict[str, dict[str, int]] = field(default_factory=dict)
    rate_limited: dict[str, int] = field(default_factory=dict)
    waited_seconds: float = 0.0

    @property
    def calls_per_event(self) -> float | None:
        """Vehicle and signals requests per event enriched (2.0 before reads were shared); None without events."""
        if not self.events:
            return None
        return sum(self.calls.values()) / self.events

    def as_dict(self) -> dict[str, Any]:
        per_event = self.calls_per_event
        return {
            "minutes": self.minutes,
            "events": self.events,
            "calls": dict(sorted(self.calls.items())),
            "callsPerEvent": None if per_event is None else round(per_event, 3),
            "reads": {call: dict(sorted(sources.items())) for call, sources in sorted(self.reads.items())},
            "rateLimited": dict(sorted(self.rate_limited.items())),
            "waitedSeconds": round(self.waited_seconds, 3),
        }


def read_usage(client: redis.Redis, minutes: int = 60, now: float | None = None) -> UsageReport:
    """Sum the last ``minutes`` minutes (the current one included) in one round trip."""
    current = int(time.time() if now is None else now) // 60
    pipe = client.pipeline(transaction=False)
    for minute in range(current - minutes + 1, current + 1):
        pipe.hgetall(usage_key(minute))
    report = UsageReport(minutes)
    for counts in pipe.execute():
        for raw_name, raw_value in counts.items():
            name, value = text(raw_name), int(raw_value)
            kind, _, rest = name.partition(":")
            if name == "events":
                report.events += value
            elif name == "waitMs":
                report.waited_seconds += value / 1000
            elif kind == "calls":
                report.calls[rest] = report.calls.get(rest, 0) + value
            elif kind == "reads":
                call, _, source = rest.partition(":")
                sources = report.reads.setdefault(call, {})
                sources[source] = sources.get(source, 0) + value
            elif kind == "429":
                report.rate_limited[rest] = report.rate_limited.get(rest, 0) + value
    return report
