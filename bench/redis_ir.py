"""``python -m bench.redis_ir``: Redis's own instructions per event on the worker's Redis path.

Redis CPU time per event (``INFO cpu``) moves with the machine's load; the instructions Redis
executes do not. This runs a private ``redis-server`` (AOF on) under ``valgrind --tool=callgrind``
and drives the worker's Redis path against it for fleet-mix events queued as the edge queues them:
claim, start, both reads of every event as window-0 reads (the data stored for what a skipped read
publishes), the vehicle-state plan and the publish with its merge, finish. No Smartcar, no user
store and no housekeeping, so nothing depends on wall time. Only the drain is instrumented. It
prints instructions (callgrind's Ir) per event, Redis commands per event (``INFO commandstats``,
scripts' inner calls counted one by one) and bytes in and out per event.

By default the events are the worker benchmark's: 2,000 vehicles, so most events are a vehicle's
first. ``--vehicles N`` spreads them over N vehicles reporting every minute, as a fleet in its steady
state: nearly every event merges newer readings into the state its vehicle already has.
``--windows`` reads with the default windows instead (a day for the vehicle, 5 minutes for the
signals): the first read of each vehicle and call is made, the rest are served by it, as in a fleet
that keeps reporting (each vehicle's read a day long, its signals four events in five).
``--role worker`` drains as the worker's ACL user (``core.redis.acl``), as a deployment with one user
per role does, so each command's ACL check counts too. ``--result-ttl 0`` queues the jobs as an edge
with ``JOB_RESULT_TTL_SECONDS=0`` does: the finish deletes each job and writes no result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis

from bench.worker import FLEET, _enqueue_bodies, command_stats, fleet_bodies, redis_traffic
from cli.redis_admin import prepare
from core.config import DEFAULT_JOB_RESULT_TTL_SECONDS, Settings
from core.events.parse import parse_stored
from core.redis.keys import read_key
from core.redis.published import OutputStream
from core.redis.vehicle_state import VehicleStates
from core.smartcar.event_reads import read_windows_ms
from core.smartcar.reads import ReadCache
from core.store.users import UserRecord
from tests.procs import RedisServer, as_role
from workers.batch import Bookkeeping, ClaimedJob
from workers.output import Enrichment, build_document, stream_fields

QUEUE, OUTPUT, WARM_UP = "smartcar-events", "smartcar:vehicle-events", 64
USER = UserRecord(id=1, email=None, name=None, smartcar_user_id=None)


async def _drain(url: str, bodies: dict[str, str], concurrency: int, windows: Mapping[str, int] | None = None) -> None:
    """Process ``bodies`` as the worker does in Redis, each read with its window in ``windows`` (default 0)."""
    client = AsyncRedis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=32, timeout=None))
    book = Bookkeeping(client, QUEUE, "bench-worker")
    reads = ReadCache(client, lease_seconds=60)
    states = VehicleStates(client, "smartcar:vehicle-state:")
    output = OutputStream(client, OUTPUT, 604_800)

    async def process(job: ClaimedJob) -> None:
        event = parse_stored(bodies[job.job_id])
        document = build_document(event, USER, Enrichment(), 0, 0)
        answers: dict[str, Any] = {"vehicle": document["vehicle"], "signals": {"signals": document["signals"]}}
        now = time.time_ns() // 1_000_000

        async def read(call: str) -> None:
            async def fetch() -> Any:
                return answers[call]

            await reads.read(read_key(call, event.vehicle.id, "bench-user"), now, (windows or {}).get(call, 0), fetch)

        await asyncio.gather(read("vehicle"), read("signals"))
        signals = [*document["signals"], *document["latestSignals"]]
        plan = await states.plan(event.vehicle.id, signals, document["vehicle"])
        document["staleSignals"] = plan.stale_signals
        entry = await output.publish(event.event_id, stream_fields(event, USER, document), plan)
        job.result = {"eventId": event.event_id, "status": "published", "entryId": entry}

    while jobs := await book.claim(concurrency):
        started = await book.start(jobs, 180)
        await asyncio.gather(*(process(job) for job in started))
        await book.finish(started)
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_ir")
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--out", default=None, help="callgrind's output file (default: a temporary one)")
    parser.add_argument(
        "--vehicles",
        type=int,
        default=None,
        help="a fleet of this many vehicles (at least --concurrency) reporting every minute, so that each "
        "event merges into its vehicle's state (default: the worker benchmark's fleet, most events a "
        "vehicle's first, captured times as they are)",
    )
    parser.add_argument(
        "--windows",
        action="store_true",
        help="reads with the default windows, through the read hashes (default: windows of 0, every event reads)",
    )
    parser.add_argument("--role", choices=["worker"], default="", help="drain as this role's ACL user")
    parser.add_argument(
        "--result-ttl",
        type=int,
        default=DEFAULT_JOB_RESULT_TTL_SECONDS,
        help="the jobs' result TTL, as the edge's JOB_RESULT_TTL_SECONDS gives it (0: RQ keeps no finished "
        "job or result; default: %(default)s)",
    )
    args = parser.parse_args()
    # The defaults' windows: Settings' own defaults, no environment read.
    windows = read_windows_ms(Settings.model_construct()) if args.windows else None
    if args.vehicles is not None and args.vehicles < args.concurrency:
        parser.error("--vehicles must be at least --concurrency: a batch holds one event a vehicle")
    if args.vehicles is not None and args.vehicles > FLEET:
        parser.error(f"--vehicles may be at most {FLEET}, the synthetic fleet's size")
    scratch = tempfile.mkdtemp(prefix="smartcar-ingest-redis-ir-")
    out = args.out or f"{scratch}/callgrind.out"
    launcher = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")
    server = RedisServer(appendonly=True, launcher=launcher, start_seconds=60)
    server.start()
    assert server.process is not None
    pid, url = str(server.process.pid), server.url
    client = redis.Redis.from_url(url)
    toggle = ["callgrind_control", "-i"]
    try:
        prepare(url)  # as redis-setup leaves a Redis new to the service
        settings = Settings.model_construct(ingest_queue=QUEUE, output_stream=OUTPUT)
        drain_url = as_role(url, settings, args.role) if args.role else url
        if args.vehicles is None:
            bodies = fleet_bodies(WARM_UP + args.events)
        else:
            bodies = fleet_bodies(WARM_UP + args.events, args.vehicles, every_ms=60_000)
        before = redis_traffic(client)
        for measured, batch in enumerate((bodies[:WARM_UP], bodies[WARM_UP:])):  # warm-up: functions, registries
            asyncio.run(_enqueue_bodies(url, QUEUE, batch, args.result_ttl))
            if measured:
                client.config_resetstat()
                before = redis_traffic(client)
                subprocess.run([*toggle, "on", pid], check=True, stdout=subprocess.DEVNULL)
            asyncio.run(_drain(drain_url, dict(batch), args.concurrency, windows))
        subprocess.run([*toggle, "off", pid], check=True, stdout=subprocess.DEVNULL)
        traffic = {name: value - before[name] for name, value in redis_traffic(client).items()}
        stats = command_stats(client)
        events = int(client.xlen(OUTPUT)) - WARM_UP
    finally:
        client.close()
        server.cleanup()
    totals = subprocess.run(["callgrind_annotate", out], capture_output=True, text=True, check=True).stdout
    ir = next(int(line.split()[0].replace(",", "")) for line in totals.splitlines() if "PROGRAM TOTALS" in line)
    commands = {name: round(calls / events, 2) for name, (calls, _) in sorted(stats.items(), key=lambda s: -s[1][0])}
    print(f"{events} events: {ir / events:,.0f} Ir/event (callgrind: {out})")
    print(f"commands/event {sum(c for c, _ in stats.values()) / events:.2f}: {json.dumps(commands)}")
    print(f"bytes in/event {traffic['in'] / events:,.0f}, out/event {traffic['out'] / events:,.0f}")


if __name__ == "__main__":
    main()
