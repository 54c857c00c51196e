"""Worker benchmark: our concurrent worker against a stock RQ SimpleWorker, same queue, same emulator.

The emulator runs in its own process with a fleet of synthetic vehicles and answers every call
after a fixed latency. Jobs are spread over the fleet, so shared in-flight fetches cannot
flatter the figure. Throughput is measured from the output stream's own entry times (first to
last publication), so process start-up is not counted; resident memory is sampled from
/proc/PID/status while the worker runs.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.asyncio import Redis as AsyncRedis

from cli.samples import encode, sample_event
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions
from core.store import db
from core.store.users import UserStore
from emulator.seed import seed_fleet
from tests.procs import RedisServer, free_port, wait_for_port

FLEET = 2000
OUTPUT = "smartcar:vehicle-events"


@dataclass
class WorkerResult:
    name: str
    latency_ms: int
    events: int
    seconds: float
    peak_rss_mb: float
    token_requests: int
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def _seed_users(database_url: str) -> None:
    db.upgrade(database_url)
    store = UserStore(database_url)
    try:
        for index, user in enumerate(seed_fleet(FLEET), start=1):
            store.add_user(index, None, None, smartcar_user_id=user.id)
    finally:
        store.dispose()


async def _enqueue(redis_url: str, queue: str, count: int, func_hint: str) -> None:
    fleet = seed_fleet(FLEET)
    client = AsyncRedis.from_url(redis_url)
    inbox = Inbox(client, JobOptions(queue=queue, retries=0), "smartcar:parked", 3600)
    try:
        for start in range(0, count, 500):
            batch = []
            for i in range(start, min(count, start + 500)):
                user = fleet[i % FLEET]
                event = sample_event(user_id=user.id, vehicle_id=user.vehicles[0].id)
                batch.append(inbox.accept(event["eventId"], "VEHICLE_STATE", encode(event).decode(), 0))
            await asyncio.gather(*batch)
    finally:
        await client.aclose()
    del func_hint


def _peak_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]) / 1024)
        except OSError:
            return
        time.sleep(0.05)


def _published_span(client: redis.Redis) -> tuple[int, float]:
    count = int(client.xlen(OUTPUT))
    if count < 2:
        return count, 0.0
    first = client.xrange(OUTPUT, count=1)[0][0].decode()
    last = client.xrevrange(OUTPUT, count=1)[0][0].decode()
    return count, (int(last.split("-")[0]) - int(first.split("-")[0])) / 1000


def _token_requests(emulator_url: str) -> int:
    import httpx

    return int(httpx.get(f"{emulator_url}/_emulator/stats").json()["token_requests"])


def _run(
    name: str, command: list[str], env: dict[str, str], client: redis.Redis, latency_ms: int, emulator_url: str
) -> WorkerResult:
    import httpx

    httpx.post(f"{emulator_url}/_emulator/reset").raise_for_status()
    httpx.post(f"{emulator_url}/_emulator/latency", json={"seconds": latency_ms / 1000}).raise_for_status()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=_peak_rss, args=(process.pid, stop, peak))
    sampler.start()
    _, _, usage = os.wait4(process.pid, 0)
    process.returncode = 0
    stop.set()
    sampler.join()
    events, seconds = _published_span(client)
    cpu = usage.ru_utime + usage.ru_stime
    return WorkerResult(name, latency_ms, events, seconds, peak[0], _token_requests(emulator_url), cpu)


def run(ours: int = 6000, stock: int = 40, concurrency: int = 256) -> list[WorkerResult]:
    scratch = Path(tempfile.mkdtemp(prefix="smartcar-ingest-bench-worker-"))
    database_url = f"sqlite:///{scratch / 'users.db'}"
    _seed_users(database_url)
    server = RedisServer(appendonly=True)
    server.start()
    port = free_port()
    emulator = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--factory", "bench.fleet:app"),
            *("--port", str(port), "--log-level", "warning", "--no-access-log"),
        ],
        env=os.environ | {"BENCH_FLEET": str(FLEET), "PYTHONPATH": os.getcwd()},
    )
    emulator_url = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "REDIS_URL": server.url,
        "DATABASE_URL": database_url,
        "SMARTCAR_CLIENT_ID": "client_emulator",
        "SMARTCAR_CLIENT_SECRET": "emulator-secret",
        "SMARTCAR_API_URL": f"{emulator_url}/v3",
        "SMARTCAR_TOKEN_URL": f"{emulator_url}/oauth2/token",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.getcwd(),
    }
    client = redis.Redis.from_url(server.url)
    results = []
    try:
        wait_for_port(port, timeout=30)
        for latency in [int(x) for x in os.environ.get("BENCH_LATENCIES", "0,100").split(",")]:
            for name, count, command in (
                (
                    "RQ SimpleWorker, sequential job",
                    stock,
                    [sys.executable, "-m", "bench.baseline", "--burst"],
                ),
                (
                    f"smartcar-ingest worker --concurrency {concurrency}",
                    ours,
                    [sys.executable, "-m", "cli.main", "worker", "--burst", "--concurrency", str(concurrency)],
                ),
            ):
                client.flushall()
                queue = "bench-baseline" if command[2] == "bench.baseline" else "smartcar-events"
                asyncio.run(_enqueue(server.url, queue, count, name))
                print(f"worker: {name} at {latency} ms…", file=sys.stderr)
                results.append(_run(name, command, env, client, latency, emulator_url))
    finally:
        emulator.terminate()
        emulator.wait(timeout=20)
        client.close()
        server.cleanup()
    return results


def table(results: list[WorkerResult]) -> str:
    lines = [
        "| worker | emulator latency | events | events/s | vs stock | CPU ms/event | peak RSS MB | token requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        baseline = next(r for r in results if r.latency_ms == result.latency_ms)
        lines.append(
            f"| {result.name} | {result.latency_ms} ms | {result.events} | {result.rate:,.1f} | "
            f"{result.rate / baseline.rate if baseline.rate else 0:.0f}x | "
            f"{result.cpu_seconds * 1000 / max(1, result.events):.2f} | {result.peak_rss_mb:.0f} | "
            f"{result.token_requests} |"
        )
    return "\n".join(lines)
