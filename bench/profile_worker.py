"""``python -m bench.profile_worker``: where a worker process spends its CPU, by part.

Runs ``smartcar-ingest worker --burst`` on the worker benchmark's queue (fleet-mix deliveries,
emulator at 100 ms, two reads per event) under py-spy, and sums the samples that hold the GIL by
the part of the code they are in: the innermost frame of the project or of a library decides.
Samples of the start-up's imports are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from bench.worker import READ_EVERY_EVENT, Setup, _enqueue_bodies, fleet_bodies

#: Parts, by a substring of a frame's file, checked from the innermost frame outwards.
PARTS: tuple[tuple[str, str], ...] = (
    ("core/events/", "parse and normalise the delivery"),
    ("workers/output.py", "build the output document"),
    ("core/redis/vehicle_state.py", "vehicle state merge"),
    ("core/smartcar/", "Smartcar client, reads and cache"),
    ("workers/batch.py", "RQ bookkeeping (batched)"),
    ("workers/jobs.py", "read the job"),
    ("httpx", "HTTP client (httpx)"),
    ("aiohttp", "HTTP transport (aiohttp)"),
    ("redis/", "Redis client (redis-py)"),
    ("structlog", "logging"),
    ("logging/", "logging"),
    ("sqlalchemy", "user lookup (SQLAlchemy)"),
    ("pydantic", "pydantic"),
    ("json", "JSON"),
    ("rq/", "RQ's own code"),
    ("asyncio/", "event loop"),
    ("threading.py", "threads"),
)


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for needle, name in PARTS:
            if needle in frame:
                return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_worker")
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--defaults", action="store_true", help="default enrichment settings, not two reads per event")
    parser.add_argument("--top", type=int, default=25, help="also print the hottest innermost frames")
    args = parser.parse_args()
    setup = Setup.start()
    try:
        asyncio.run(_enqueue_bodies(setup.server.url, "smartcar-events", fleet_bodies(args.events)))
        httpx.post(f"{setup.emulator_url}/_emulator/latency", json={"seconds": 0.1}).raise_for_status()
        out = Path(tempfile.mkdtemp(prefix="smartcar-ingest-profile-")) / "worker.txt"
        env = setup.env | ({} if args.defaults else READ_EVERY_EVENT) | {"METRICS_PORT": "0"}
        command = [sys.executable, "-m", "cli.main", "worker", "--burst", "--concurrency", str(args.concurrency)]
        subprocess.run(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--rate", "250", "-o", str(out), "--gil",
             "--", *command],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        setup.stop()
    parts: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    startup = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "_find_and_load" in stack:  # imports: start-up, not events
            startup += int(count)
            continue
        parts[part_of(stack)] += int(count)
        leaves[stack.split(";")[-1]] += int(count)
    total = sum(parts.values()) or 1
    print(f"samples holding the GIL: {total} while working, {startup} importing at start-up (left out)")
    for name, count in parts.most_common():
        print(f"{count / total:6.1%}  {name}")
    print()
    for frame, count in leaves.most_common(args.top):
        print(f"{count / total:6.1%}  {frame}")


if __name__ == "__main__":
    main()
