"""``make bench``: run the benchmarks, print their tables and record them in docs/performance.md.

The measured tables replace the part of docs/performance.md between the ``BENCH:BEGIN`` and
``BENCH:END`` markers; the analysis around them is written by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path

from bench import aof_rewrite, ingest, memory, steady, worker
from core.redis import durability

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    memory_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return f"{os.cpu_count()} cores ({cpu}), {memory_kb / 1024 / 1024:.0f} GiB, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--seconds", type=int, default=10, help="measurement time per server (ingest)")
    parser.add_argument(
        "--only", choices=["ingest", "worker", "fleet", "memory", "steady", "aof"], help="run one benchmark"
    )
    parser.add_argument(
        "--bodies",
        nargs="+",
        choices=sorted(ingest.BODY_SETS),
        default=["fleet", "small"],
        help="ingest body sets, each run on its own: the captured fleet mix (1.9-16 KB), the 1.9 KB capture "
        "alone (both by default) or the ~1 KB synthetic sample",
    )
    parser.add_argument(
        "--rate", type=int, default=1000, help="ingest: the requests/s offered to every server for latency"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="ingest: how many times the servers take turns (the median is reported)"
    )
    parser.add_argument(
        "--steady-minutes", type=float, default=10.0, help="steady: how long one worker is fed 80 deliveries/s"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = parser.parse_args()
    redis_options = " ".join(shlex.quote(option) for option in durability.server_options())
    sections = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}. Redis as docs/deploy.md recommends it"
        f" (`{redis_options}`); smartcar-ingest's web and worker log in as their own ACL users (`redis-acl`),"
        " the baselines as Redis's default user."
    ]
    if args.only in (None, "ingest"):
        for mix in args.bodies:
            sections.append(
                ingest.report(ingest.run(seconds=args.seconds, mix=mix, rate=args.rate, rounds=args.rounds))
            )
    worker_results: list[worker.WorkerResult] = []
    if args.only in (None, "worker"):
        worker_results = worker.run()
        sections.append(
            "### Enrichment: one worker process; fleet-mix deliveries for a 2,000-vehicle fleet, emulator in "
            "its own process answering after 100 ms\n\n"
            + worker.table(worker_results)
            + "\n\n"
            + "\n\n".join(worker.commands_table(r) for r in worker_results[1:])
        )
    if args.only in (None, "fleet"):
        fleet_results = worker.run_fleet()
        first = fleet_results[0] if fleet_results else None
        ours = [r for r in worker_results if r.name.startswith("smartcar-ingest")]
        sections.append(
            f"### Quota-aware enrichment: one worker process (--concurrency 256), "
            f"{first.vehicles if first else 0} vehicles x {first.events_per_vehicle if first else 0} events "
            "each within the window, emulator at 100 ms\n\n"
            + worker.fleet_table(fleet_results, ours[0].rate if ours else None)
        )
    if args.only in (None, "memory"):
        marks, pipeline = memory.run()
        sections.append(
            "### Redis memory per event, default settings (7-day dedupe): `MEMORY USAGE` of what each event "
            "leaves, with the previous version beside it\n\n" + memory.table(marks, pipeline)
        )
    if args.only in (None, "steady"):
        sections.append(
            f"### Worker memory through a steady load: {args.steady_minutes:g} minutes at 80 fleet-mix deliveries/s, "
            "one worker at the defaults, emulator at 100 ms\n\n" + steady.table(steady.run(args.steady_minutes, 80.0))
        )
    if args.only in (None, "aof"):
        sections.append(
            "### The AOF rewrite at steady state: Redis's CPU per event in the forked rewrites, by Redis "
            "configuration (6,000 events of 300 vehicles through the edge's and the worker's Redis paths)\n\n"
            + aof_rewrite.table(aof_rewrite.run())
        )
    text = "\n\n".join(sections)
    print("\n" + text)
    if not args.no_write and DOC.exists():
        doc = DOC.read_text()
        block = f"<!-- BENCH:BEGIN -->\n{text}\n<!-- BENCH:END -->"
        DOC.write_text(re.sub(r"<!-- BENCH:BEGIN -->.*<!-- BENCH:END -->", lambda _: block, doc, flags=re.S))
        print(f"\nrecorded in {DOC.relative_to(Path.cwd()) if DOC.is_relative_to(Path.cwd()) else DOC}")


if __name__ == "__main__":
    main()
