"""Worker benchmarks, with the emulator in its own process serving a fleet of synthetic vehicles
and answering every call after a fixed latency.

- :func:`run`: our async worker against a stock RQ SimpleWorker, same queue, same emulator, on
  fleet-mix deliveries (the captured full-state deliveries, 1.9-16 KB) spread over the
  2,000-vehicle fleet. Our worker runs twice: reading on every event (both windows 0, two reads
  per event, as the stock job does, so shared reads cannot flatter the figure), and with the
  default enrichment settings. Each run reports Redis commands per event from ``INFO
  commandstats`` around the drain (the commands Lua scripts run are counted one by one).
- :func:`run_fleet` (quota-aware enrichment, issue 14): a fleet of vehicles each sending several
  events within the signals window, as webhooks do, run twice through the same worker: once
  reading on every event (both windows 0: what every event cost before, 2 calls), once with the
  default windows. It reports Smartcar calls per event, counted at the emulator, beside 2.0.

Throughput is measured from the output stream's own entry times (first to last publication), so
process start-up is not counted; resident memory is sampled from /proc/PID/status while the
worker runs.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.asyncio import Redis as AsyncRedis

from bench.ingest import RedisCpu, fleet_documents, new_to_the_service, redis_cpu
from cli.samples import encode, sample_event
from core.config import DEFAULT_JOB_RESULT_TTL_SECONDS, Settings
from core.redis import durability
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions
from core.store import db
from core.store.users import UserStore
from emulator.seed import SeedUser, seed_fleet
from tests.procs import RedisServer, as_role, free_port, wait_for_port

FLEET = 2000
OUTPUT = "smartcar:vehicle-events"
#: Both reads on every event (both windows 0): what every event cost before reads were shared.
READ_EVERY_EVENT = {"VEHICLE_INFO_TTL_SECONDS": "0", "SIGNALS_MAX_AGE_SECONDS": "0"}
#: RQ deletes a job as it finishes, and keeps no result: what the finish costs Redis without RQ's records.
NO_RESULT = {"JOB_RESULT_TTL_SECONDS": "0"}


@dataclass
class WorkerResult:
    name: str
    latency_ms: int
    events: int
    seconds: float
    peak_rss_mb: float
    token_requests: int
    cpu_seconds: float
    #: Redis commands run during the drain, by command (INFO commandstats, scripts' own calls included).
    commands: dict[str, int] = field(default_factory=dict)
    smartcar_calls: int = 0
    #: Redis's own CPU seconds (INFO cpu, user + system, main thread and children) over the drain.
    redis_cpu_seconds: float = 0.0
    #: Of it, Redis's children's (the AOF rewrite).
    redis_children_seconds: float = 0.0
    #: Microseconds Redis spent per command (INFO commandstats) over the drain.
    command_usec: dict[str, int] = field(default_factory=dict)
    #: Redis's traffic over the drain (:func:`redis_traffic`).
    traffic: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def commands_per_event(self) -> float:
        return sum(self.commands.values()) / self.events if self.events else 0.0


def _seed_users(database_url: str) -> None:
    db.upgrade(database_url)
    store = UserStore(database_url)
    try:
        for index, user in enumerate(seed_fleet(FLEET), start=1):
            store.add_user(index, None, None, smartcar_user_id=user.id)
    finally:
        store.dispose()


async def _enqueue_for(redis_url: str, queue: str, users: list[SeedUser]) -> None:
    """One VEHICLE_STATE job per entry of ``users``, for its first vehicle, in that order."""
    client = AsyncRedis.from_url(redis_url)
    inbox = Inbox(client, JobOptions(queue=queue, retries=0), "smartcar:parked", 3600)
    try:
        for start in range(0, len(users), 500):
            batch = []
            for user in users[start : start + 500]:
                event = sample_event(user_id=user.id, vehicle_id=user.vehicles[0].id)
                batch.append(inbox.accept(event["eventId"], "VEHICLE_STATE", encode(event).decode(), 0))
            await asyncio.gather(*batch)
    finally:
        await client.aclose()


def fleet_bodies(count: int, vehicles: int = FLEET, every_ms: int = 0) -> list[tuple[str, str]]:
    """``count`` fleet-mix deliveries (the captured full-state deliveries in turn, 1.9-16 KB) for the
    first ``vehicles`` of the synthetic fleet's users and vehicles, each with a fresh eventId:
    (eventId, compact body). With ``every_ms``, the fleet reports that often: each round of deliveries
    carries readings that much newer than the round before (else the captured times, as they are)."""
    fleet = seed_fleet(FLEET)[:vehicles]
    templates = fleet_documents()
    bodies = []
    for i in range(count):
        document = copy.deepcopy(templates[i % len(templates)])
        user = fleet[i % vehicles]
        for signal in document["data"]["signals"] if every_ms else ():
            meta = signal.get("meta") or {}
            for name in ("oemUpdatedAt", "retrievedAt"):
                if isinstance(meta.get(name), int):
                    meta[name] += every_ms * (i // vehicles)
        document["eventId"] = str(uuid.uuid4())
        document["data"]["user"]["id"] = user.id
        document["data"]["vehicle"]["id"] = user.vehicles[0].id
        meta = document.setdefault("meta", {})
        meta["deliveryId"] = str(uuid.uuid4())
        meta["deliveredAt"] = time.time_ns() // 1_000_000
        bodies.append((document["eventId"], json.dumps(document, separators=(",", ":"))))
    return bodies


async def _enqueue_bodies(
    redis_url: str, queue: str, bodies: list[tuple[str, str]], result_ttl_seconds: int = DEFAULT_JOB_RESULT_TTL_SECONDS
) -> None:
    """The deliveries as the web edge queues them: each body embedded verbatim in its job, which
    keeps its result ``result_ttl_seconds`` (the edge's ``JOB_RESULT_TTL_SECONDS``)."""
    client = AsyncRedis.from_url(redis_url)
    options = JobOptions(queue=queue, retries=0, result_ttl_seconds=result_ttl_seconds)
    inbox = Inbox(client, options, "smartcar:parked", 3600)
    try:
        for start in range(0, len(bodies), 500):
            batch = bodies[start : start + 500]
            await asyncio.gather(*(inbox.accept(i, "VEHICLE_STATE", b.encode(), 0) for i, b in batch))
    finally:
        await client.aclose()


def worker_env(redis_url: str, database_url: str, emulator_url: str, **extra: str) -> dict[str, str]:
    """The environment of a worker process run against the benchmark's Redis, database and emulator."""
    return os.environ | {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "SMARTCAR_CLIENT_ID": "client_emulator",
        "SMARTCAR_CLIENT_SECRET": "emulator-secret",
        "SMARTCAR_API_URL": f"{emulator_url}/v3",
        "SMARTCAR_TOKEN_URL": f"{emulator_url}/oauth2/token",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.getcwd(),
        **extra,
    }


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


#: Commands the benchmark itself sends around a drain, left out of the worker's count.
_OURS = {"config|resetstat", "info", "xlen", "xrange", "xrevrange", "ping"}


def command_counts(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (Lua scripts' inner calls counted too)."""
    return {name: calls for name, (calls, _) in command_stats(client).items()}


def command_stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """Calls and microseconds per command since the last CONFIG RESETSTAT (the calls that Lua
    functions make are counted on their own too, and their time also inside ``fcall``'s)."""
    stats = client.info("commandstats")
    found = {name.removeprefix("cmdstat_"): (int(value["calls"]), int(value["usec"])) for name, value in stats.items()}
    return {name: value for name, value in found.items() if name not in _OURS}


def lua_own_usec(stats: dict[str, tuple[int, int]]) -> int:
    """Redis's time in the functions' own Lua, at least: ``fcall``'s time less that of every other
    command (those its functions call are inside it; counting all of them leaves a lower bound).
    ``exec``'s time is left out: the commands of a transaction are counted on their own too."""
    inside = sum(usec for name, (_, usec) in stats.items() if name.startswith("fcall"))
    nested = ("fcall", "function", "blmove", "exec")
    others = sum(usec for name, (_, usec) in stats.items() if not name.startswith(nested))
    return max(0, inside - others)


def _smartcar_calls(emulator_url: str) -> int:
    import httpx

    calls = httpx.get(f"{emulator_url}/_emulator/stats").json()["calls"]
    return sum(n for route, n in calls.items() if route.startswith("/v3/vehicles/"))


def _token_requests(emulator_url: str) -> int:
    import httpx

    return int(httpx.get(f"{emulator_url}/_emulator/stats").json()["token_requests"])


def _run(
    name: str, command: list[str], env: dict[str, str], client: redis.Redis, latency_ms: int, emulator_url: str
) -> WorkerResult:
    import httpx

    httpx.post(f"{emulator_url}/_emulator/reset").raise_for_status()
    httpx.post(f"{emulator_url}/_emulator/latency", json={"seconds": latency_ms / 1000}).raise_for_status()
    client.config_resetstat()
    redis_cpu_before, traffic_before = redis_cpu(client), redis_traffic(client)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=_peak_rss, args=(process.pid, stop, peak))
    sampler.start()
    _, _, usage = os.wait4(process.pid, 0)
    process.returncode = 0
    stop.set()
    sampler.join()
    redis_cpu_used = redis_cpu(client) - redis_cpu_before
    traffic = {name: value - traffic_before[name] for name, value in redis_traffic(client).items()}
    stats = command_stats(client)
    commands = {name: calls for name, (calls, _) in stats.items()}
    events, seconds = _published_span(client)
    cpu = usage.ru_utime + usage.ru_stime
    return WorkerResult(
        name,
        latency_ms,
        events,
        seconds,
        peak[0],
        _token_requests(emulator_url),
        cpu,
        commands,
        _smartcar_calls(emulator_url),
        redis_cpu_used.total,
        redis_cpu_used.children,
        {name: usec for name, (_, usec) in stats.items()},
        traffic,
    )


def redis_traffic(client: redis.Redis) -> dict[str, int]:
    """What Redis has read and written so far: socket reads it processed (a round trip each, or
    part of one), bytes in and out on the network."""
    stats = client.info("stats")
    return {
        "reads": int(stats["total_reads_processed"]),
        "in": int(stats["total_net_input_bytes"]),
        "out": int(stats["total_net_output_bytes"]),
    }


@dataclass
class Setup:
    """A Redis, the fleet emulator and a seeded user store for one benchmark; stopped by :meth:`stop`."""

    server: RedisServer
    emulator: subprocess.Popen[bytes]
    emulator_url: str
    #: The worker's environment: logged in as the worker's ACL user, as deployed (docs/deploy.md).
    env: dict[str, str]
    client: redis.Redis
    #: The same as Redis's default user, for stock RQ (which runs Lua of its own, as no role may).
    admin_env: dict[str, str]

    @classmethod
    def start(cls) -> Setup:
        scratch = Path(tempfile.mkdtemp(prefix="smartcar-ingest-bench-worker-"))
        database_url = f"sqlite:///{scratch / 'users.db'}"
        _seed_users(database_url)
        server = RedisServer(options=durability.server_options())  # persistence as docs/deploy.md recommends
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
        worker_url = as_role(server.url, Settings.model_construct(), "worker")
        env = worker_env(worker_url, database_url, emulator_url)
        wait_for_port(port, timeout=30)
        admin_env = worker_env(server.url, database_url, emulator_url)
        return cls(server, emulator, emulator_url, env, redis.Redis.from_url(server.url), admin_env)

    def stop(self) -> None:
        self.emulator.terminate()
        self.emulator.wait(timeout=20)
        self.client.close()
        self.server.cleanup()


#: The worker runs of :func:`run`, after the stock baseline: (name, environment overrides).
OUR_RUNS: tuple[tuple[str, dict[str, str]], ...] = (
    ("two reads per event (windows 0)", READ_EVERY_EVENT),
    ("default enrichment settings", {}),
    # The edge writes a job's result TTL into its hash: this run's jobs are queued with it (see run).
    ("two reads per event, JOB_RESULT_TTL_SECONDS 0 (no finished job or result kept)", READ_EVERY_EVENT | NO_RESULT),
)


def run(ours: int = 3000, stock: int = 40, concurrency: int = 256, latency_ms: int = 100) -> list[WorkerResult]:
    """Stock RQ's SimpleWorker running the straightforward job, then ``smartcar-ingest worker`` in
    each of :data:`OUR_RUNS`, on the same queue of fleet-mix deliveries (the captured full-state
    deliveries for the 2,000-vehicle fleet, queued as the edge queues them), the emulator
    answering every call after ``latency_ms``."""
    setup = Setup.start()
    client, emulator_url = setup.client, setup.emulator_url
    startup: dict[str, float] = {}
    runs: list[tuple[str, int, list[str], dict[str, str]]] = [
        (
            "RQ SimpleWorker, sequential job",
            stock,
            [sys.executable, "-m", "bench.baseline", "--burst"],
            setup.admin_env | READ_EVERY_EVENT,
        ),
        *(
            (
                f"smartcar-ingest worker --concurrency {concurrency}, {what}",
                ours,
                [sys.executable, "-m", "cli.main", "worker", "--burst", "--concurrency", str(concurrency)],
                setup.env | overrides,
            )
            for what, overrides in OUR_RUNS
        ),
    ]
    results = []
    try:
        for name, _, command, env in runs:
            startup[name] = _startup_cpu(command, env, client)
        for name, count, command, env in runs:
            new_to_the_service(client)
            queue = "bench-baseline" if command[2] == "bench.baseline" else "smartcar-events"
            result_ttl = int(env.get("JOB_RESULT_TTL_SECONDS", DEFAULT_JOB_RESULT_TTL_SECONDS))
            asyncio.run(_enqueue_bodies(setup.server.url, queue, fleet_bodies(count), result_ttl))
            print(f"worker: {name} at {latency_ms} ms…", file=sys.stderr)
            result = _run(name, command, env, client, latency_ms, emulator_url)
            result.cpu_seconds = max(0.0, result.cpu_seconds - startup[name])
            results.append(result)
    finally:
        setup.stop()
    return results


def _startup_cpu(command: list[str], env: dict[str, str], client: redis.Redis) -> float:
    """CPU seconds the command spends on an empty queue (imports, connections, registration), so
    that CPU per event counts the events only."""
    client.flushall()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, _, usage = os.wait4(process.pid, 0)
    process.returncode = 0
    return usage.ru_utime + usage.ru_stime


def table(results: list[WorkerResult]) -> str:
    """Events/s beside the stock worker's, CPU, memory, Smartcar calls and Redis commands per event."""
    lines = [
        "| worker | events | events/s | vs stock | CPU ms/event (start-up excluded) | peak RSS MB | "
        "Smartcar calls/event | "
        "Redis commands/event | Redis CPU µs/event (AOF rewrite) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = results[0].rate if results else 0.0
    for result in results:
        events = max(1, result.events)
        lines.append(
            f"| {result.name} | {result.events} | {result.rate:,.1f} | "
            f"{result.rate / baseline if baseline else 0:.0f}x | {result.cpu_seconds * 1000 / events:.2f} | "
            f"{result.peak_rss_mb:.0f} | {result.smartcar_calls / events:.2f} | {result.commands_per_event:.1f} | "
            f"{result.redis_cpu_seconds * 1e6 / events:.0f} ({result.redis_children_seconds * 1e6 / events:.0f}) |"
        )
    return "\n".join(lines)


def commands_table(result: WorkerResult) -> str:
    """Redis commands per event of one run, by command, most first."""
    events = max(1, result.events)
    rows = sorted(result.commands.items(), key=lambda item: -item[1])
    lines = [f"Redis commands per event, {result.name}:", "", "| command | per event | µs/event |", "|---|---:|---:|"]
    lines += [
        f"| {name} | {calls / events:.2f} | {result.command_usec.get(name, 0) / events:.1f} |"
        for name, calls in rows
        if calls / events >= 0.01
    ]
    lines.append(f"| **total** | **{result.commands_per_event:.2f}** | |")
    stats = {name: (calls, result.command_usec.get(name, 0)) for name, calls in result.commands.items()}
    lines += ["", f"Lua's own time in the functions: at least {lua_own_usec(stats) / events:.0f} µs/event."]
    if result.traffic:
        traffic = {name: value / events for name, value in result.traffic.items()}
        lines.append(
            f"Redis's traffic per event: {traffic['reads']:.1f} socket reads, {traffic['in'] / 1000:.1f} KB in, "
            f"{traffic['out'] / 1000:.1f} KB out."
        )
    return "\n".join(lines)


# Quota-aware enrichment: a fleet sending several events per vehicle within the window.

#: The fleet run's two configurations: what each event cost before (both windows 0), and the defaults.
FLEET_RUNS: tuple[tuple[str, dict[str, str]], ...] = (
    ("read on every event (windows 0, as before)", READ_EVERY_EVENT),
    ("defaults (VEHICLE_INFO_TTL_SECONDS 86400, SIGNALS_MAX_AGE_SECONDS 300)", {}),
)


@dataclass
class FleetResult:
    name: str
    vehicles: int
    events_per_vehicle: int
    events: int
    seconds: float
    calls: int
    cpu_seconds: float
    redis_commands: int
    redis_cpu: RedisCpu

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def calls_per_event(self) -> float:
        return self.calls / self.events if self.events else 0.0


def run_fleet(
    vehicles: int = 200, events_per_vehicle: int = 10, latency_ms: int = 100, concurrency: int = 256
) -> list[FleetResult]:
    """Each configuration of :data:`FLEET_RUNS` on the same fleet: ``events_per_vehicle`` events
    for each of ``vehicles`` vehicles, queued round by round (every vehicle's first event, then
    every vehicle's second, ...), so events of one vehicle are in flight together and also follow
    each other, all within the signals window; the emulator answers after ``latency_ms``."""
    import httpx

    fleet = seed_fleet(FLEET)[:vehicles]
    setup = Setup.start()
    results = []
    try:
        for name, overrides in FLEET_RUNS:
            setup.client.flushall()
            asyncio.run(_enqueue_for(setup.server.url, "smartcar-events", fleet * events_per_vehicle))
            httpx.post(f"{setup.emulator_url}/_emulator/reset").raise_for_status()
            latency = {"seconds": latency_ms / 1000}
            httpx.post(f"{setup.emulator_url}/_emulator/latency", json=latency).raise_for_status()
            print(f"worker: fleet run, {name}…", file=sys.stderr)
            command = [sys.executable, "-m", "cli.main", "worker", "--burst", "--concurrency", str(concurrency)]
            setup.client.config_resetstat()
            redis_cpu_before = redis_cpu(setup.client)
            process = subprocess.Popen(
                command, env=setup.env | overrides | {"METRICS_PORT": "0"}, stdout=subprocess.DEVNULL
            )
            _, _, usage = os.wait4(process.pid, 0)
            process.returncode = 0
            redis_cpu_used = redis_cpu(setup.client) - redis_cpu_before
            redis_commands = sum(command_counts(setup.client).values())
            events, seconds = _published_span(setup.client)
            calls = _smartcar_calls(setup.emulator_url)
            cpu = usage.ru_utime + usage.ru_stime
            results.append(
                FleetResult(
                    name, vehicles, events_per_vehicle, events, seconds, calls, cpu, redis_commands, redis_cpu_used
                )
            )
    finally:
        setup.stop()
    return results


def fleet_table(results: list[FleetResult], worker_rate: float | None = None) -> str:
    """The fleet runs, calls per event beside the 2.0 of a read on every event, events/s beside
    the first run's (and the worker benchmark's at the same latency, when it ran too)."""
    lines = [
        "| enrichment | vehicles x events | events | Smartcar calls | calls per event | vs 2.0 | events/s | "
        "vs reading every event | CPU ms/event | Redis commands/event | Redis CPU µs/event (AOF rewrite) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = results[0].rate if results else 0.0
    for result in results:
        events = max(1, result.events)
        lines.append(
            f"| {result.name} | {result.vehicles} x {result.events_per_vehicle} | {result.events} | {result.calls} | "
            f"{result.calls_per_event:.3f} | {result.calls_per_event / 2.0:.1%} | {result.rate:,.1f} | "
            f"{result.rate / first if first else 0:.2f}x | {result.cpu_seconds * 1000 / events:.2f} | "
            f"{result.redis_commands / events:.1f} | {result.redis_cpu.total * 1e6 / events:.0f} "
            f"({result.redis_cpu.children * 1e6 / events:.0f}) |"
        )
    if worker_rate is not None:
        lines.append("")
        lines.append(
            f"The worker benchmark above, one event per vehicle at the same latency: {worker_rate:,.1f} events/s."
        )
    return "\n".join(lines)
