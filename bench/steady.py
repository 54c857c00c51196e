"""``python -m bench.steady``: one worker process's memory through a steady load.

The queue is fed fleet-mix deliveries (the captured full-state deliveries, 1.9-16 KB, for the
2,000-vehicle fleet) at a steady rate, as the edge queues them, for ``--minutes``; one
``smartcar-ingest worker`` (default settings, emulator at 100 ms) drains it. Its resident memory is
read from /proc every second: the table gives the peak, and the peak of each minute, so that
growth shows. ``make bench`` runs it for ten minutes at 80 deliveries/s.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
from redis.asyncio import Redis as AsyncRedis

from bench.worker import Setup, fleet_bodies
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions


@dataclass
class SteadyResult:
    minutes: float
    rate: float
    accepted: int = 0
    published: int = 0
    backlog_at_end: int = 0
    #: Peak resident memory of each minute, MB.
    minute_peaks: list[float] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.minute_peaks, default=0.0)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _feed(url: str, result: SteadyResult, worker: subprocess.Popen[bytes], queue_key: str) -> None:
    client = AsyncRedis.from_url(url)
    inbox = Inbox(client, JobOptions(queue="smartcar-events", retries=0), "smartcar:parked", 3600)
    bodies = fleet_bodies(int(result.rate * 60))  # a minute's worth, reused with fresh ids below
    started = time.monotonic()
    sent, peak, minute = 0, 0.0, 0
    try:
        while (elapsed := time.monotonic() - started) < result.minutes * 60:
            due = int(elapsed * result.rate) - sent
            for _ in range(max(0, due)):
                event_id, body = bodies[sent % len(bodies)]
                fresh = f"{event_id[:24]}{sent:012d}"
                await inbox.accept(fresh, "VEHICLE_STATE", body.replace(event_id, fresh, 1).encode(), 0)
                sent += 1
            peak = max(peak, _rss_mb(worker.pid))
            if int(elapsed // 60) > minute:
                result.minute_peaks.append(peak)
                print(f"steady: minute {minute + 1}, peak RSS {peak:.0f} MB", file=sys.stderr)
                minute, peak = minute + 1, 0.0
            await asyncio.sleep(0.05)
        result.minute_peaks.append(peak)
        result.accepted = sent
        result.backlog_at_end = int(await client.llen(queue_key))
    finally:
        await client.aclose()


def run(minutes: float = 10.0, rate: float = 80.0, concurrency: int = 256) -> SteadyResult:
    setup = Setup.start()
    result = SteadyResult(minutes, rate)
    try:
        httpx.post(f"{setup.emulator_url}/_emulator/latency", json={"seconds": 0.1}).raise_for_status()
        command = [sys.executable, "-m", "cli.main", "worker", "--concurrency", str(concurrency)]
        worker = subprocess.Popen(command, env=setup.env | {"METRICS_PORT": "0"}, stdout=subprocess.DEVNULL)
        try:
            asyncio.run(_feed(setup.server.url, result, worker, "rq:queue:smartcar-events"))
            deadline = time.monotonic() + 60
            while setup.client.llen("rq:queue:smartcar-events") and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
        result.published = int(setup.client.xlen("smartcar:vehicle-events"))
    finally:
        setup.stop()
    return result


def table(result: SteadyResult) -> str:
    peaks = ", ".join(f"{p:.0f}" for p in result.minute_peaks)
    return "\n".join(
        [
            "| minutes | deliveries/s | accepted | published | queued at the end | peak RSS MB | peak RSS per minute, MB |",
            "|---:|---:|---:|---:|---:|---:|---|",
            f"| {result.minutes:g} | {result.rate:g} | {result.accepted} | {result.published} | "
            f"{result.backlog_at_end} | {result.peak:.0f} | {peaks} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.steady")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=80.0, help="deliveries queued per second")
    args = parser.parse_args()
    print(table(run(args.minutes, args.rate)))


if __name__ == "__main__":
    main()
