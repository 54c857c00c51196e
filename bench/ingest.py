"""Ingest benchmark: our web process against bare Starlette and the typical endpoint, same run.

Each server runs as one uvicorn process (the last row as `smartcar-ingest web` serves it, with
the connection guards of service.server); wrk (one thread, 32 connections) posts unique signed
~1 KB deliveries read from a file, so dedupe never flatters our figure. CPU time per request is
read from the server's own /proc/PID/stat, because on two cores wrk and Redis share the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import redis

from core.samples import encode, sample_event
from core.signatures import sign
from tests.procs import RedisServer, free_port, wait_for_port

TOKEN = "bench-management-token"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def write_bodies(path: Path, count: int) -> None:
    """One "<signature> <body>" line per unique delivery."""
    with path.open("w") as out:
        for _ in range(count):
            body = encode(sample_event())
            out.write(f"{sign(TOKEN.encode(), body)} {body.decode()}\n")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the stat line; after the ")" they sit at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _wrk(port: int, seconds: int, bodies: Path, script: Path) -> dict[str, int]:
    result = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        env=os.environ | {"BODIES_FILE": str(bodies)},
        check=True,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("JSON "))
    return dict(json.loads(line[5:]))


def _command(factory: str, port: int) -> list[str]:
    """Plain uvicorn for a ``module:factory``; ``web`` is the server ``smartcar-ingest web`` runs
    (uvicorn's httptools protocol with the head, pipelining and deadline guards of service.server)."""
    if factory == "web":
        return [sys.executable, "-m", "service.cli", "web", "--host", "127.0.0.1", "--port", str(port)]
    return [
        *(sys.executable, "-m", "uvicorn", "--factory", factory, "--port", str(port)),
        *("--log-level", "warning", "--no-access-log", "--no-server-header"),
    ]


def run_server(name: str, factory: str, redis_url: str, bodies: Path, seconds: int) -> IngestResult:
    port = free_port()
    env = os.environ | {
        "SMARTCAR_MANAGEMENT_TOKEN": TOKEN,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.getcwd(),
        "ADMIN_PORT": "0",
    }
    server = subprocess.Popen(_command(factory, port), env=env)
    script = Path(__file__).with_name("ingest_load.lua")
    client = redis.Redis.from_url(redis_url)
    try:
        wait_for_port(port, timeout=30)
        _wrk(port, 1, bodies, script)  # warm-up: imports, connection pools
        client.flushall()
        before = _cpu_seconds(server.pid)
        stats = _wrk(port, seconds, bodies, script)
        cpu = _cpu_seconds(server.pid) - before
        queued = int(client.llen("rq:queue:smartcar-events")) if name != "bare Starlette" else None
    finally:
        server.terminate()
        server.wait(timeout=20)
        client.close()
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


def run(seconds: int = 10, unique_bodies: int = 150_000) -> list[IngestResult]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    scratch = Path(tempfile.mkdtemp(prefix="smartcar-ingest-bench-"))
    bodies = scratch / "bodies.txt"
    print(f"writing {unique_bodies} signed deliveries…", file=sys.stderr)
    write_bodies(bodies, unique_bodies)
    # AOF as in production unless BENCH_AOF=0 (to see how much of the tail is Redis's disk).
    server = RedisServer(appendonly=os.environ.get("BENCH_AOF", "1") != "0")
    server.start()
    try:
        results = []
        for name, factory in (
            ("bare Starlette", "bench.apps:bare"),
            ("typical endpoint", "bench.apps:typical"),
            ("smartcar-ingest", "service.app:create_app"),
            ("smartcar-ingest web (guarded)", "web"),
        ):
            print(f"ingest: {name}…", file=sys.stderr)
            results.append(run_server(name, factory, server.url, bodies, seconds))
        return results
    finally:
        server.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)


def table(results: list[IngestResult]) -> str:
    bare = results[0]
    typical = results[1]
    lines = [
        "| server | requests/s | p50 ms | p99 ms | CPU µs/request | CPU vs bare | rps vs typical | non-2xx | queued / requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        queued = "n/a" if r.queued is None else f"{r.queued} / {r.requests}"
        lines.append(
            f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.cpu_us_per_request:.0f} | "
            f"{r.cpu_us_per_request / bare.cpu_us_per_request:.2f}x | {r.rps / typical.rps:.2f}x | "
            f"{r.non_2xx + r.socket_errors} | {queued} |"
        )
    return "\n".join(lines)
