"""Redis's own instructions per accepted delivery, counted by callgrind (issue 27, the edge's enqueue).

CPU time on a shared machine is noisy; instruction counts are not. This starts a private
``redis-server --appendonly yes --hz 1`` (fewer timer-driven instructions) under
``valgrind --tool=callgrind``, warms it (marks in every live slot, as in a steady state: see
:class:`Clock`; ``--fresh``: a new registry), zeroes the counters, drives
:meth:`core.redis.inbox.Inbox.accept` with fleet-mix bodies, dumps the counters and reports the
instructions (Ir) per event, in all and by part, with Redis commands per event:

* ``busy``: many accepts in flight (group commit batches them, as at saturation);
* ``one at a time``: each accept alone (light load, one script call per event);
* ``floor``: the plain writes, ``HSET`` of the same job hash and ``RPUSH``, pipelined.

``--role web`` drives Redis as the web's ACL user (``core.redis.acl``), as a deployment with one
user per role does: the ACL check of each command counts too.

Run: ``python -m bench.ingest_callgrind [--events N] [--role web]`` (needs valgrind; minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job

from bench.ingest import fleet_documents
from core.config import Settings
from core.redis.dedupe import SLOTS_PER_TTL, slot_width
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions, build_job_hash, job_payload
from core.redis.keys import queue_key
from tests.procs import RedisServer, as_role

#: Parts of Redis's work, by the inclusive cost of the function that does it.
PARTS = {
    "reading requests (readQueryFromClient)": "readQueryFromClient",
    "the function call (fcallCommand)": "fcallCommand",
    "Lua running a command (luaRedisGenericCommand)": "luaRedisGenericCommand",
    "HSET": "hsetCommand",
    "RPUSH": "rpushCommand",
    "HGET": "hgetCommand",
    "EXISTS": "existsCommand",
    "AOF feed (feedAppendOnlyFile)": "feedAppendOnlyFile",
    "AOF write (flushAppendOnlyFile)": "flushAppendOnlyFile",
    "replies (writeToClient)": "writeToClient",
    "commands (call)": "call",
}

Drive = Callable[[AsyncRedis, list[bytes]], Awaitable[None]]


def bodies(count: int) -> list[bytes]:
    """Fleet-mix deliveries, compact, each with its own eventId."""
    templates = fleet_documents()
    out = []
    for i in range(count):
        document = copy.deepcopy(templates[i % len(templates)])
        document["eventId"] = str(uuid.uuid4())
        out.append(json.dumps(document, separators=(",", ":")).encode())
    return out


#: The marks' clock runs at this many events a slot: a short TTL (a slot is a minute) fills every
#: live slot in a few thousand events, so lookups walk as many generations, of hashes as full, as
#: at the defaults in a steady state (:data:`core.redis.dedupe.TARGET` marks a hash at most).
TTL_SECONDS = 7 * 60
EVENTS_PER_SLOT = 500


class Clock:
    """Seconds since an epoch advancing ``slot_width / EVENTS_PER_SLOT`` per accepted event."""

    def __init__(self) -> None:
        self.events = 0
        self.start = 1_800_000_000.0

    def __call__(self) -> float:
        return self.start + self.events * slot_width(TTL_SECONDS) / EVENTS_PER_SLOT


CLOCK = Clock()
#: The ACL role Redis is driven as ("" for the default user).
ROLE = {"name": ""}
#: Whether the marks start fresh (a new registry, its legacy window open: a Redis that ``redis-setup``
#: did not prepare; ``python -m bench --only ingest`` runs on one it did) rather than at a steady state.
FRESH = {"on": False}


def _inbox(client: AsyncRedis) -> Inbox:
    if FRESH["on"]:
        return Inbox(client, JobOptions("smartcar-events"), "parked", 7 * 86400)
    return Inbox(client, JobOptions("smartcar-events"), "parked", TTL_SECONDS, clock=CLOCK)


async def _accept(inbox: Inbox, body: bytes) -> None:
    event_id = json.loads(body)["eventId"]
    CLOCK.events += 1
    assert await inbox.accept(event_id, "VEHICLE_STATE", body, 1)


async def busy(client: AsyncRedis, items: list[bytes], in_flight: int = 32) -> None:
    inbox = _inbox(client)
    queue = list(reversed(items))

    async def loop() -> None:
        while queue:
            await _accept(inbox, queue.pop())

    await asyncio.gather(*(loop() for _ in range(in_flight)))


async def one_at_a_time(client: AsyncRedis, items: list[bytes]) -> None:
    inbox = _inbox(client)
    for body in items:
        await _accept(inbox, body)


async def floor(client: AsyncRedis, items: list[bytes], batch: int = 32) -> None:
    """The job hash and the push alone: no dedupe, no script."""
    options = JobOptions("smartcar-events")
    for start in range(0, len(items), batch):
        pipe = client.pipeline(transaction=False)
        for body in items[start : start + batch]:
            job_id, mapping = build_job_hash(
                job_payload(json.loads(body)["eventId"], "VEHICLE_STATE", body.decode(), 1), options
            )
            pipe.hset(Job.redis_job_namespace_prefix + job_id, mapping=mapping)
            pipe.rpush(queue_key(options.queue), job_id)
        await pipe.execute()


def _run(drive: Drive, url: str, items: list[bytes]) -> None:
    async def main() -> None:
        client = AsyncRedis.from_url(url, socket_timeout=60)
        try:
            await drive(client, items)
        finally:
            await client.aclose()

    asyncio.run(main())


def _commands(client: redis.Redis) -> dict[str, int]:
    return {name: int(stats["calls"]) for name, stats in client.info("commandstats").items()}


def measure(drive: Drive, events: int, warm: int = 0, keep: str = "") -> dict[str, Any]:
    """Ir per event of ``drive`` on a fresh callgrind-run Redis, warmed with the same drive (by
    default over every live slot: a steady state)."""
    warm = warm or (300 if FRESH["on"] else (SLOTS_PER_TTL + 1) * EVENTS_PER_SLOT)
    CLOCK.events = 0
    work = Path(tempfile.mkdtemp(prefix="ingest-callgrind-"))
    out = work / "callgrind.out"
    launcher = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p")
    server = RedisServer(appendonly=True, launcher=launcher, options=("--hz", "1"), start_seconds=120)
    server.start()
    assert server.process is not None
    pid, url = str(server.process.pid), server.url
    client = redis.Redis.from_url(url, socket_timeout=60)
    if ROLE["name"]:
        url = as_role(url, Settings.model_construct(ingest_queue="smartcar-events", parked_stream="parked"), "web")
    try:
        _run(drive, url, bodies(warm))
        subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
        before = _commands(client)
        _run(drive, url, bodies(events))
        after = _commands(client)
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    finally:
        client.close()
        server.cleanup()
    dumps = sorted(work.glob("callgrind.out.*.1"))
    report = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dumps[0])],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    if keep:
        Path(keep).write_text(report)
        shutil.copy(dumps[0], keep.removesuffix(".txt") + ".out")
    shutil.rmtree(work, ignore_errors=True)
    total = int(re.search(r"^([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", report, re.M)[1].replace(",", ""))  # type: ignore[index]
    inclusive: dict[str, int] = {}
    for line in report.splitlines():
        match = re.match(r"^\s*([\d,]+) \([^)]*\)\s+\S*:(\S+) ", line + " ")
        if match:
            inclusive.setdefault(match[2], int(match[1].replace(",", "")))
    calls = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    return {
        "Ir/event": total / events,
        "commands/event": sum(calls.values()) / events,
        "calls": {k.removeprefix("cmdstat_"): v / events for k, v in calls.items() if v},
        "parts": {name: inclusive.get(fn, 0) / events for name, fn in PARTS.items()},
    }


DRIVES: dict[str, Drive] = {"busy": busy, "one at a time": one_at_a_time, "floor": floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--only", choices=sorted(DRIVES), action="append")
    parser.add_argument("--fresh", action="store_true", help="a new registry (legacy window open), Redis's clock")
    parser.add_argument("--role", choices=["web"], default="", help="drive Redis as this role's ACL user")
    parser.add_argument("--keep", default="", help="write callgrind_annotate's report to KEEP-<drive>.txt")
    options = parser.parse_args()
    FRESH["on"] = options.fresh
    ROLE["name"] = options.role
    for name in options.only or DRIVES:
        keep = f"{options.keep}-{name.replace(' ', '-')}.txt" if options.keep else ""
        result = measure(DRIVES[name], options.events, keep=keep)
        print(f"## {name}: {result['Ir/event']:,.0f} Ir/event, {result['commands/event']:.2f} commands/event")
        print("calls/event:", ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["calls"].items())))
        for part, value in result["parts"].items():
            print(f"  {part}: {value:,.0f}")


if __name__ == "__main__":
    main()
