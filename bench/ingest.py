"""Ingest benchmark: our web process against bare Starlette and the typical endpoint, same run.

Each server runs as one uvicorn process (the last row as `smartcar-ingest web` serves it, with
the connection guards of service.server); wrk (one thread, 32 connections) posts unique signed
deliveries read from a file, so dedupe never flatters our figure. The body sets
(:data:`BODY_SETS`): the fleet mix of captured full-state deliveries (1.9 to 16 KB, each with a
fresh eventId and deliveredAt), the 1.9 KB capture alone, or the ~1 KB synthetic sample.
CPU time per request is read from the server's own /proc/PID/stat, because on two cores wrk and
Redis share the machine.

Each server is measured twice per round: saturated (every connection sends as soon as it is
answered: throughput and CPU per request), then at the same offered rate for all (``RATE`` in the
wrk script: latency at the same load, which a saturated run cannot compare, since each server
then runs at its own rate). The servers take turns for three rounds by default, and each table
row is the server's round with the median CPU per request: this machine's neighbours move one
server's figure by up to 25 % from one run to the next.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import redis

from cli.samples import encode, sample_event
from core.config import Settings
from core.redis import durability
from core.redis.dedupe import start_without_legacy_window
from core.signatures import sign
from tests.procs import RedisServer, as_role, free_port, wait_for_port

TOKEN = "bench-management-token"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOAD_SCRIPT = Path(__file__).with_name("ingest_load.lua")


@dataclass
class IngestResult:
    name: str
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    queued: int | None
    #: Redis's own CPU (INFO cpu) and commands (INFO commandstats) per request over the run.
    redis_cpu_us_per_request: float = 0.0
    #: Of it, Redis's children's (the AOF rewrite).
    redis_children_us_per_request: float = 0.0
    redis_commands_per_request: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


#: The fleet mix: every full-state capture (1.9 to 16 KB compact), in turn.
FLEET_CAPTURES = ("vw_id_4_all", "byd_seal_all", "jaguar_ipace_all", "polestar_2_all", "jaguar_ipace2_all")
CAPTURED = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "captured"

#: Body sets by name: the captures posted in turn (none: the synthetic sample), and how a table names them.
BODY_SETS: dict[str, tuple[tuple[str, ...], str]] = {
    "fleet": (FLEET_CAPTURES, "the captured fleet mix"),
    "small": (("vw_id_4_all",), "the 1.9 KB capture alone"),
    "sample": ((), "the ~1 KB synthetic sample"),
}

#: Unique deliveries written per second of measurement, by body set: more than the fastest of our
#: servers answers, so no run reaches the end of the file and repeats a delivery (a duplicate).
BODIES_PER_SECOND = {"fleet": 8_000, "small": 15_000, "sample": 15_000}

#: The servers of one run, in order: the first two are the baselines the ratios divide by.
SERVERS = (
    ("bare Starlette", "bench.apps:bare"),
    ("typical endpoint", "bench.apps:typical"),
    ("smartcar-ingest", "service.app:create_app"),
    ("smartcar-ingest web (guarded)", "web"),
)
#: The factories of this service's servers (the others are baselines).
OURS = ("service.app:create_app", "web")


def fleet_documents(names: tuple[str, ...] = FLEET_CAPTURES) -> list[dict[str, Any]]:
    return [json.loads((CAPTURED / f"{name}.json").read_text()) for name in names]


def write_bodies(path: Path, count: int, mix: str = "fleet") -> int:
    """One "<signature> <body>" line per unique delivery; returns the mean body size in bytes.

    A set of captures (``fleet``, ``small``): each in turn with a fresh ``eventId`` and
    ``deliveryId`` and a current ``deliveredAt`` (older ones are refused as replays), compact;
    ``sample``: the ~1 KB synthetic delivery of ``cli.samples``.
    """
    templates = fleet_documents(BODY_SETS[mix][0])
    total = 0
    with path.open("w") as out:
        for i in range(count):
            if templates:
                document = copy.deepcopy(templates[i % len(templates)])
                document["eventId"] = str(uuid.uuid4())
                meta = document.setdefault("meta", {})
                meta["deliveryId"] = str(uuid.uuid4())
                meta["deliveredAt"] = time.time_ns() // 1_000_000
            else:
                document = sample_event()
            body = encode(document)
            total += len(body)
            out.write(f"{sign(TOKEN.encode(), body)} {body.decode()}\n")
    return total // max(1, count)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the stat line; after the ")" they sit at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wrk(port: int, seconds: int, bodies: Path, rate: int | None = None) -> dict[str, int]:
    """One wrk run (one thread, 32 connections) posting ``bodies``, as fast as answered or at ``rate``
    requests per second; its summary."""
    env = os.environ | {"BODIES_FILE": str(bodies), "CONNECTIONS": "32"}
    if rate is not None:
        env["RATE"] = str(rate)
    result = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "--timeout", "5s", "-s", str(LOAD_SCRIPT), f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("JSON "))
    return dict(json.loads(line[5:]))


def _command(factory: str, port: int) -> list[str]:
    """Plain uvicorn for a ``module:factory``; ``web`` is the server ``smartcar-ingest web`` runs
    (uvicorn's httptools protocol with the head, pipelining and deadline guards of service.server)."""
    if factory == "web":
        return [sys.executable, "-m", "cli.main", "web", "--host", "127.0.0.1", "--port", str(port)]
    return [
        *(sys.executable, "-m", "uvicorn", "--factory", factory, "--port", str(port)),
        *("--log-level", "warning", "--no-access-log", "--no-server-header"),
    ]


@contextlib.contextmanager
def serving(factory: str, redis_url: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """One server process listening on a free port: ``(process, port)``; stopped on exit."""
    port = free_port()
    env = os.environ | {
        "SMARTCAR_MANAGEMENT_TOKEN": TOKEN,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.getcwd(),
        "ADMIN_PORT": "0",
    }
    server = subprocess.Popen(_command(factory, port), env=env)
    try:
        wait_for_port(port, timeout=30)
        yield server, port
    finally:
        server.terminate()
        server.wait(timeout=20)


def run_server(
    name: str, factory: str, redis_url: str, bodies: Path, seconds: int, rate: int | None = None
) -> list[IngestResult]:
    """One server loaded as fast as it answers, then (with ``rate``) at that offered rate."""
    client = redis.Redis.from_url(redis_url)
    results = []
    # smartcar-ingest logs in as the web's ACL user, as deployed (docs/deploy.md); the baselines as the default user
    server_url = as_role(redis_url, Settings.model_construct(), "web") if factory in OURS else redis_url
    try:
        with serving(factory, server_url) as (server, port):
            wrk(port, 1, bodies)  # warm-up: imports, connection pools
            for paced in (None, rate) if rate is not None else (None,):
                new_to_the_service(client)
                client.config_resetstat()
                before, redis_before = cpu_seconds(server.pid), redis_cpu(client)
                stats = wrk(port, seconds, bodies, paced)
                cpu = cpu_seconds(server.pid) - before
                redis_used = redis_cpu(client) - redis_before
                commands = sum(int(v["calls"]) for k, v in client.info("commandstats").items() if k != "cmdstat_info")
                queued = int(client.llen("rq:queue:smartcar-events")) if factory != "bench.apps:bare" else None
                result = _result(name, stats, cpu, queued)
                result.redis_cpu_us_per_request = redis_used.total * 1e6 / max(1, result.requests)
                result.redis_children_us_per_request = redis_used.children * 1e6 / max(1, result.requests)
                result.redis_commands_per_request = commands / max(1, result.requests)
                results.append(result)
    finally:
        client.close()
    return results


def _result(name: str, stats: dict[str, int], cpu: float, queued: int | None) -> IngestResult:
    return IngestResult(
        name=name,
        requests=stats["requests"],
        seconds=stats["duration_us"] / 1e6,
        non_2xx=stats["non2xx"],
        socket_errors=stats["errors"],
        p50_ms=stats["p50_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        cpu_us_per_request=cpu * 1e6 / max(1, stats["requests"]),
        queued=queued,
    )


class RedisCpu(NamedTuple):
    """Redis's CPU seconds (``INFO cpu``, user and system): all of it, and its children's, the forked
    AOF rewrite (or RDB save), which runs on another core, at a rate set by the bytes written."""

    total: float
    children: float

    def __sub__(self, other: tuple[Any, ...]) -> RedisCpu:  # type: ignore[override]
        return RedisCpu(self.total - other[0], self.children - other[1])


def redis_cpu(client: redis.Redis) -> RedisCpu:
    """Redis's CPU seconds so far."""
    cpu = client.info("cpu")
    children = float(cpu["used_cpu_user_children"]) + float(cpu["used_cpu_sys_children"])
    return RedisCpu(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]) + children, children)


def new_to_the_service(client: redis.Redis) -> None:
    """Empty the Redis of ``client`` into one new to the service, as ``redis-setup`` leaves it (FLUSHALL
    keeps the functions; the marks' registries start without a legacy window)."""
    client.flushall()
    start_without_legacy_window(client)


@contextlib.contextmanager
def redis_with_aof() -> Iterator[RedisServer]:
    """A private Redis with persistence as docs/deploy.md recommends, unless BENCH_AOF=0 (no AOF: to see
    how much of the tail is Redis's disk)."""
    aof = os.environ.get("BENCH_AOF", "1") != "0"
    server = RedisServer(options=durability.server_options()) if aof else RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def body_file(mix: str, unique_bodies: int) -> Iterator[tuple[Path, int]]:
    """A temporary file of ``unique_bodies`` signed deliveries of ``mix``: ``(path, mean size)``."""
    scratch = Path(tempfile.mkdtemp(prefix="smartcar-ingest-bench-"))
    try:
        bodies = scratch / "bodies.txt"
        print(f"writing {unique_bodies} signed deliveries ({mix})…", file=sys.stderr)
        yield bodies, write_bodies(bodies, unique_bodies, mix)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class IngestRun:
    """One body set through every server, in ``rounds`` rounds: saturated, then at ``rate``
    requests per second. ``saturated[i]`` and ``paced[i]`` hold server ``i``'s result in each round."""

    mix: str
    mean_size: int
    rate: int
    saturated: list[list[IngestResult]]
    paced: list[list[IngestResult]]


def run(seconds: int = 10, mix: str = "fleet", rate: int = 1000, rounds: int = 3) -> IngestRun:
    """Each server in turn on the same bodies, saturated and then at ``rate`` requests per second;
    the whole sequence ``rounds`` times, so a disturbance of the machine during one server's turn
    (other tenants of the host) moves one round, not the reported figure."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with body_file(mix, BODIES_PER_SECOND[mix] * seconds) as (bodies, mean_size), redis_with_aof() as server:
        saturated: list[list[IngestResult]] = [[] for _ in SERVERS]
        paced: list[list[IngestResult]] = [[] for _ in SERVERS]
        for round_number in range(1, rounds + 1):
            for i, (name, factory) in enumerate(SERVERS):
                print(f"ingest ({mix}, round {round_number}/{rounds}): {name}…", file=sys.stderr)
                fastest, at_rate = run_server(name, factory, server.url, bodies, seconds, rate)
                saturated[i].append(fastest)
                paced[i].append(at_rate)
        return IngestRun(mix, mean_size, rate, saturated, paced)


def median_result(results: list[IngestResult]) -> IngestResult:
    """The result of the round with the median CPU per request (the lower middle of an even count)."""
    return sorted(results, key=lambda r: r.cpu_us_per_request)[(len(results) - 1) // 2]


def report(ingest: IngestRun) -> str:
    """The two tables of a run, under a heading naming the body set."""
    what = BODY_SETS[ingest.mix][1]
    rounds = len(ingest.saturated[0])
    return (
        f"### Ingest: one web process, wrk -t1 -c32, unique signed deliveries ({what}, mean {ingest.mean_size:,} B)\n\n"
        f"Each row is the server's round with the median CPU per request, of {rounds} rounds in which "
        "the four servers took turns.\n\n"
        f"Saturated (each server as fast as it answers):\n\n{rounds_table(ingest.saturated)}\n\n"
        f"At the same load ({ingest.rate:,} requests/s offered to each):\n\n{rounds_table(ingest.paced)}"
    )


def rounds_table(by_server: list[list[IngestResult]]) -> str:
    """:func:`table` of each server's median round, then each round's CPU ratios to bare Starlette."""
    text = table([median_result(results) for results in by_server])
    if len(by_server[0]) > 1:
        bare = by_server[0]
        for results in by_server[2:]:
            ratios = ", ".join(
                f"{ours.cpu_us_per_request / base.cpu_us_per_request:.2f}x"
                for ours, base in zip(results, bare, strict=True)
            )
            text += f"\n\nCPU vs bare in each round, {results[0].name}: {ratios}."
    return text


def table(results: list[IngestResult]) -> str:
    bare = results[0]
    typical = results[1]
    lines = [
        "| server | requests/s | p50 ms | p99 ms | CPU µs/request | CPU vs bare | p99 vs bare | rps vs typical "
        "| non-2xx | queued / requests | Redis CPU µs/request (AOF rewrite) | Redis commands/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        queued = "n/a" if r.queued is None else f"{r.queued} / {r.requests}"
        lines.append(
            f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.cpu_us_per_request:.0f} | "
            f"{r.cpu_us_per_request / bare.cpu_us_per_request:.2f}x | {r.p99_ms / bare.p99_ms:.2f}x | "
            f"{r.rps / typical.rps:.2f}x | {r.non_2xx + r.socket_errors} | {queued} | "
            f"{r.redis_cpu_us_per_request:.0f} ({r.redis_children_us_per_request:.0f}) | {r.redis_commands_per_request:.1f} |"
        )
    return "\n".join(lines)
