"""``smartcar-ingest status``: one screen of what the pipeline is doing, read from Redis without
changing anything; ``--json`` prints the same report for machines."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import redis
from rq import Queue, Worker
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE
from rq.serializers import JSONSerializer

from cli.operations import open_command_redis, redis_errors
from core.config import Settings
from core.redis.clients import command_redis
from core.redis.deployment_counts import read_usage
from core.redis.keys import text
from core.redis.parked import COUNT_SCAN_LIMIT, count_by_reason
from core.redis.queue_metrics import entry_age_seconds, read_redis
from workers.output import iso_ms


def collect_status(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """The status report as plain data (what ``--json`` prints)."""
    now = dt.datetime.now(dt.UTC)
    now_ms = now.timestamp() * 1000
    readings = read_redis(client, settings, now)
    by_reason, scanned = count_by_reason(client, settings.parked_stream, COUNT_SCAN_LIMIT)
    workers = Worker.all(queue=Queue(settings.ingest_queue, connection=client, serializer=JSONSerializer))
    return {
        "generatedAt": iso_ms(int(now_ms)),
        "queue": readings["queue"],
        "stranded": readings["stranded"],
        "registries": readings["registries"],
        "workers": [
            {
                "name": worker.name,
                "state": worker.get_state(),
                # One execution per job in flight: the concurrent worker runs many at once.
                "jobsInFlight": int(client.scard(WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker.name))),
                # RQ parses its timestamps as aware UTC datetimes.
                "lastHeartbeatAgeSeconds": None
                if worker.last_heartbeat is None
                else round(max(0.0, (now - worker.last_heartbeat).total_seconds()), 1),
                "successfulJobs": worker.successful_job_count,
                "failedJobs": worker.failed_job_count,
            }
            for worker in sorted(workers, key=lambda w: w.name)
        ],
        "parked": readings["parked"]
        | {"byReason": by_reason, "scanned": scanned, "capped": scanned < readings["parked"]["length"]},
        "output": readings["output"] | {"lastPublished": _last_published(client, settings.output_stream, now_ms)},
        "redisMemory": readings["redisMemory"],
        # Summed over every worker of the deployment (core.redis.deployment_counts): 2.0 calls per event
        # means every event read both itself; shared and cached reads bring it down.
        "enrichment": read_usage(client, minutes=60, now=now.timestamp()),
    }


def _last_published(client: redis.Redis, stream: str, now_ms: float) -> dict[str, Any] | None:
    entries = client.xrevrange(stream, count=1)
    if not entries:
        return None
    raw_id, fields = entries[0]
    entry_id = text(raw_id)
    return {
        "eventId": text((fields or {}).get(b"event_id", b"")),
        "entryId": entry_id,
        "publishedAt": iso_ms(int(entry_id.split("-", 1)[0])),
        "ageSeconds": round(entry_age_seconds(entry_id, now_ms), 3),
    }


def render_text(report: dict[str, Any]) -> str:
    """The report as one screen of text."""
    queue, registries, parked, output = report["queue"], report["registries"], report["parked"], report["output"]
    lines = [f"smartcar-ingest status at {report['generatedAt']}", ""]

    def row(label: str, value: str) -> None:
        lines.append(f"{label:<15}{value}")

    oldest = f", oldest {duration(queue['oldestAgeSeconds'])}" if queue["depth"] else ""
    row("queue", f"{queue['name']}: {queue['depth']} waiting{oldest}")
    stranded = report["stranded"]
    if stranded["count"]:
        row(
            "stranded",
            f"{stranded['count']} taken off the queue with no live worker behind them, oldest enqueued "
            f"{duration(stranded['oldestAgeSeconds'])} ago (any running worker puts them back within seconds)",
        )
    row("registries", ", ".join(f"{name} {count}" for name, count in registries.items()))
    workers = report["workers"]
    row("workers", f"{len(workers)}" + ("" if workers else " (none registered on this queue)"))
    if workers:
        width = max(len(w["name"]) for w in workers)
        # Jobs running now, not jobs run: 0 on an idle worker however many it has done.
        lines.append(f"  {'NAME'.ljust(width)}  {'STATE':<9} {'IN FLIGHT':>9}  HEARTBEAT")
        for w in workers:
            beat = "never" if w["lastHeartbeatAgeSeconds"] is None else duration(w["lastHeartbeatAgeSeconds"]) + " ago"
            lines.append(f"  {w['name'].ljust(width)}  {w['state']:<9} {w['jobsInFlight']:>9}  {beat}")
    reasons = ", ".join(f"{reason} {count}" for reason, count in parked["byReason"].items())
    row("parked", f"{parked['stream']}: {_entries(parked['length'])}" + (f" ({reasons})" if reasons else ""))
    if parked["capped"]:
        row("", f"reasons counted over the oldest {parked['scanned']} entries only")
    usage = report["enrichment"]  # calls per event and where reads came from, over the last hour
    calls = ", ".join(f"{endpoint} {count}" for endpoint, count in usage["calls"].items()) or "none"
    if usage["callsPerEvent"] is not None:
        calls += f", {usage['callsPerEvent']:.2f} per event"
    row("enrichment", f"{usage['events']} events in the last {usage['minutes']} min, Smartcar calls: {calls}")
    for call, sources in usage["reads"].items():
        row("", f"{call} reads: " + ", ".join(f"{source} {count}" for source, count in sources.items()))
    if usage["rateLimited"] or usage["waitedSeconds"]:
        scopes = ", ".join(f"{scope} {count}" for scope, count in usage["rateLimited"].items()) or "none"
        row("", f"429s: {scopes}; waited for the budget or a pause: {usage['waitedSeconds']:.1f} s")
    memory = report["redisMemory"]
    used = f"{memory['usedBytes'] / 2**20:,.1f} MiB used"
    if memory["maxBytes"]:
        used += f" of {memory['maxBytes'] / 2**20:,.0f} MiB maxmemory ({memory['usedFraction']:.0%})"
    else:
        used += ", no maxmemory (set one: Redis grows until the OS kills it)"
    row("redis memory", used)
    row("output", f"{output['stream']}: {_entries(output['length'])}, kept {duration(output['retentionSeconds'])}")
    if output["groups"]:
        width = max(len("GROUP"), *(len(g["name"]) for g in output["groups"]))
        lines.append(f"  {'GROUP'.ljust(width)}  {'CONSUMERS':>9} {'PENDING':>8} {'LAG':>8}  BEHIND")
        near = f"  (near the retention of {duration(output['retentionSeconds'])}: entries will be trimmed unread)"
        for g in output["groups"]:
            lag = "?" if g["lag"] is None else str(g["lag"])
            behind = duration(g["behindSeconds"]) + (near if g["nearRetention"] else "")
            lines.append(f"  {g['name'].ljust(width)}  {g['consumers']:>9} {g['pending']:>8} {lag:>8}  {behind}")
    else:
        lines.append("  no consumer groups")
    last = output["lastPublished"]
    row("last published", "never" if last is None else f"{last['eventId']} ({duration(last['ageSeconds'])} ago)")
    return "\n".join(lines)


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


def status(settings: Settings, as_json: bool) -> None:
    with open_command_redis(command_redis, settings) as client, redis_errors("read"):
        report = collect_status(client, settings)
    print(json.dumps(report, indent=2) if as_json else render_text(report))


def duration(seconds: float) -> str:
    """A length of time for a person: seconds, minutes, hours or days, one decimal."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"
