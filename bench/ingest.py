"""Ingest benchmark: our web process against bare Starlette and the typical endpoint, same run.

Each server runs as one uvicorn process (the last row as `smartcar-ingest web` serves it, with
the connection guards of service.server); wrk (one thread, 32 connections) posts unique signed
deliveries read from a file (by default the fleet mix of captured full-state deliveries,
1.9 to 16 KB, each with a fresh eventId and deliveredAt), so dedupe never flatters our figure.
CPU time per request is read from the server's own /proc/PID/stat, because on two cores wrk and
Redis share the machine.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from cli.samples import encode, sample_event
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


#: The fleet mix: every full-state capture (1.9 to 16 KB compact), in turn.
FLEET_CAPTURES = ("vw_id_4_all", "byd_seal_all", "jaguar_ipace_all", "polestar_2_all", "jaguar_ipace2_all")
CAPTURED = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "captured"


def fleet_documents() -> list[dict[str, Any]]:
    return [json.loads((CAPTURED / f"{name}.json").read_text()) for name in FLEET_CAPTURES]


def write_bodies(path: Path, count: int, mix: str = "fleet") -> int:
    """One "<signature> <body>" line per unique delivery; returns the mean body size in bytes.

    ``fleet``: the captured full-state deliveries in turn, each with a fresh ``eventId`` and
    ``deliveryId`` and a current ``deliveredAt`` (older ones are refused as replays);
    ``sample``: the ~1 KB synthetic delivery of ``cli.samples``.
    """
    templates = fleet_documents() if mix == "fleet" else []
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
        return [sys.executable, "-m", "cli.main", "web", "--host", "127.0.0.1", "--port", str(port)]
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


def run(seconds: int = 10, unique_bodies: int = 80_000, mix: str = "fleet") -> tuple[list[IngestResult], int]:
    """Each server in turn on the same bodies; the results and the mean body size in bytes."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    scratch = Path(tempfile.mkdtemp(prefix="smartcar-ingest-bench-"))
    bodies = scratch / "bodies.txt"
    print(f"writing {unique_bodies} signed deliveries ({mix})…", file=sys.stderr)
    mean_size = write_bodies(bodies, unique_bodies, mix)
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
        return results, mean_size
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
