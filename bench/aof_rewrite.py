"""``python -m bench.aof_rewrite``: the AOF rewrite's Redis CPU per event, as a long-running Redis pays it.

Redis rewrites its AOF each time the file has grown by ``auto-aof-rewrite-percentage`` (100 by
default) of the base the last rewrite wrote, and each rewrite writes the whole data set again, in a
forked child. The base is an RDB, LZF-compressed by default (``rdbcompression yes``), so a data set
that compresses well is rewritten after few bytes of AOF. The other benchmarks are too short to show
this: below ``auto-aof-rewrite-min-size`` (64 MB) Redis does not rewrite, so a run sees one rewrite at
most, and their data sets only grow.

Here a private Redis (AOF on, no automatic rewrite) is filled with a fleet's events, each through the
edge's enqueue and the worker's Redis path as ``bench.redis_ir`` drives them (300 vehicles reporting
every minute, the fleet mix's captures). It measures the AOF bytes an event writes (``a``), then
rewrites three times: the child's CPU per rewrite (``INFO cpu`` children) and the base it writes
(``B``), the median of each. A Redis whose data set stays that size (retention trims as much as
events add) starts a rewrite every ``B * percentage / a`` events, so each event costs ``rewrite CPU
* a / (B * percentage)``. Each configuration beside Redis's defaults, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import NamedTuple

import redis

from bench.ingest import redis_cpu
from bench.redis_ir import QUEUE, _drain
from bench.worker import _enqueue_bodies, fleet_bodies
from cli.redis_admin import load_functions
from tests.procs import RedisServer

#: (label, redis-server options); the first is the baseline.
CONFIGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Redis's defaults (`rdbcompression yes`)", ("--rdbcompression", "yes")),
    ("`rdbcompression no`", ("--rdbcompression", "no")),
)
VEHICLES, CHUNK, CONCURRENCY, WARM_UP = 300, 1500, 256, 64
PERCENTAGES = (100, 200)


class RewriteResult(NamedTuple):
    label: str
    memory_mb: float  # used_memory after the fill
    aof_bytes: float  # AOF bytes an event writes
    base_mb: float  # the base file a rewrite writes
    rewrite_ms: float  # the forked child's CPU per rewrite (median of three)

    def per_event_us(self, percentage: int) -> float:
        """The rewrites' CPU per event at steady state, in µs."""
        return self.rewrite_ms * 1000 * self.aof_bytes / (self.base_mb * 1e6 * percentage / 100)


def _wait_for_rewrite(client: redis.Redis) -> None:
    while True:
        persistence = client.info("persistence")
        if not (persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]):
            return
        time.sleep(0.05)


def _feed(url: str, bodies: list[tuple[str, str]]) -> None:
    for at in range(0, len(bodies), CHUNK):
        chunk = bodies[at : at + CHUNK]
        asyncio.run(_enqueue_bodies(url, QUEUE, chunk))
        asyncio.run(_drain(url, dict(chunk), CONCURRENCY))


def measure(label: str, options: tuple[str, ...], fill: int) -> RewriteResult:
    server = RedisServer(appendonly=True, options=("--auto-aof-rewrite-percentage", "0", *options))
    server.start()
    client = redis.Redis.from_url(server.url)
    try:
        load_functions(server.url)
        bodies = fleet_bodies(WARM_UP + fill, VEHICLES, every_ms=60_000)
        _feed(server.url, bodies[:WARM_UP])
        before = int(client.info("persistence")["aof_current_size"])
        _feed(server.url, bodies[WARM_UP:])
        aof_bytes = (int(client.info("persistence")["aof_current_size"]) - before) / fill
        children, bases = [], []
        for _ in range(3):
            start = redis_cpu(client).children
            client.bgrewriteaof()
            time.sleep(0.2)
            _wait_for_rewrite(client)
            children.append(redis_cpu(client).children - start)
            bases.append(int(client.info("persistence")["aof_base_size"]))
        memory = int(client.info("memory")["used_memory"]) / 1e6
        return RewriteResult(
            label, memory, aof_bytes, statistics.median(bases) / 1e6, statistics.median(children) * 1000
        )
    finally:
        client.close()
        server.cleanup()


def run(fill: int = 6000) -> list[RewriteResult]:
    results = []
    for label, options in CONFIGS:
        print(f"aof rewrite: {label}, {fill:,} events…", flush=True)
        results.append(measure(label, options, fill))
    return results


def table(results: list[RewriteResult]) -> str:
    base = results[0]
    rows = [
        "| Redis configuration | data set (`used_memory`) | AOF an event writes | base a rewrite writes "
        "| CPU a rewrite (forked child) | "
        + " | ".join(f"rewrite CPU µs/event at steady state, `auto-aof-rewrite-percentage {p}`" for p in PERCENTAGES)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(PERCENTAGES),
    ]
    for r in results:
        cells = []
        for p in PERCENTAGES:
            ratio = r.per_event_us(p) / base.per_event_us(100)
            cells.append(f"{r.per_event_us(p):,.0f} ({ratio:.2f}x)")
        rows.append(
            f"| {r.label} | {r.memory_mb:,.0f} MB | {r.aof_bytes:,.0f} B | {r.base_mb:,.1f} MB "
            f"| {r.rewrite_ms:,.0f} ms | " + " | ".join(cells) + " |"
        )
    return "\n".join(rows) + "\n\n(x: against Redis's defaults, percentage 100.)"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.aof_rewrite")
    parser.add_argument("--fill", type=int, default=6000, help="events that make the data set")
    args = parser.parse_args()
    print(table(run(args.fill)))


if __name__ == "__main__":
    main()
