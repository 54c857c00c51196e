"""Where the web process spends its CPU under load: py-spy on the live server while wrk posts deliveries.

    python -m bench.profile_ingest [--bodies fleet|small|sample] [--seconds 10] [--server app|web]
                                   [--paced RPS]

One web process, one Redis with AOF, wrk (one thread, 32 connections) posting unique signed
deliveries, as in ``python -m bench --only ingest`` (as fast as answered, or ``--paced`` at a
fixed offered rate, where nothing is batched); py-spy samples the server while wrk runs. It
pauses the server for each sample (a few per cent of its time at the default rate): without that
(``--nonblocking``) a stack is read while it changes, and a leaf often sits under a caller it
was never called from. Printed: the CPU per request read from
``/proc``, the share of samples per part of the request path (:data:`PARTS`: the deepest frame of
a sample that names a part decides), then the frames with the most samples of their own and the
project's and libraries' frames with the most samples under them. ``--raw`` keeps py-spy's
output (one ``frame;frame;… count`` line per stack) for a flame graph.

py-spy samples the process whenever it is runnable, not only when it runs: on a busy machine a
process preempted right after a ``write`` that woke wrk is counted in that ``write``, so system
calls look dearer than they are. ``--perf`` also records the server with ``perf`` (on-CPU samples
only) and prints its CPU by library (interpreter, pydantic-core, libc's malloc, kernel, OpenSSL,
uvloop), the split that says what the Python frames above cost in machine time.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import redis

from bench.ingest import (
    BODIES_PER_SECOND,
    BODY_SETS,
    body_file,
    cpu_seconds,
    new_to_the_service,
    redis_with_aof,
    serving,
    wrk,
)

#: The parts of the request path, each named by the frames that belong to it (a substring of
#: py-spy's ``function (file:line)`` frame text). A sample counts for the part of its deepest
#: frame that matches; samples with no matching frame count as "other".
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("HTTP parsing (uvicorn, httptools)", ("data_received (uvicorn/", "on_body (uvicorn", "on_headers_complete")),
    ("response send (uvicorn)", ("send (uvicorn/", "send (starlette/")),
    ("Starlette routing", ("(starlette/routing.py", "(starlette/applications.py", "(starlette/middleware")),
    ("endpoint: headers, body, answer", ("(service/webhooks.py",)),
    ("signature (HMAC-SHA256)", ("verify_signature (core/signatures.py",)),
    ("validation (core/events)", ("(core/events/",)),
    ("job data (core/redis/jobs.py)", ("(core/redis/jobs.py",)),
    ("Redis write (group commit, redis-py)", ("(core/redis/inbox.py", "(redis/")),
    ("metrics and logs", ("(prometheus_client/", "(structlog/", "(core/logs.py", "(core/metrics.py")),
    ("asyncio event loop", ("(asyncio/", "_run_once", "run_forever", "(uvloop")),
)
#: The servers --server names.
FACTORIES = {"app": "service.app:create_app", "web": "web", "bare": "bench.apps:bare"}
#: Frames of these files count in the inclusive table.
OURS_OR_LIBRARIES = ("service/", "core/", "starlette/", "pydantic", "redis/", "uvicorn/", "hmac", "asyncio/")


def _frames(stack: str) -> list[str]:
    """py-spy's frames of one stack, root first, without line numbers (so one function is one frame)."""
    return [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]


def _part(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in PARTS:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def summarise(lines: Iterable[str], top: int = 20) -> str:
    """The report of py-spy ``--format raw`` lines: parts, then self and inclusive frames."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = _frames(stack)
        own[frames[-1]] += n
        parts[_part(frames)] += n
        for frame in set(frames):
            under[frame] += n
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "== by part of the request path (deepest matching frame)"]
    out += [f"{100 * n / total:5.1f}%  {name}" for name, n in parts.most_common()]
    out += ["", "== self (samples in the frame itself)"]
    out += [f"{100 * n / total:5.1f}%  {frame[:140]}" for frame, n in own.most_common(top)]
    out += ["", "== inclusive (the project's and its libraries' frames)"]
    inclusive = [(f, n) for f, n in under.most_common() if any(k in f for k in OURS_OR_LIBRARIES)]
    out += [f"{100 * n / total:5.1f}%  {frame[:140]}" for frame, n in inclusive[: top * 2]]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--bodies", choices=sorted(BODY_SETS), default="fleet", help="body set (bench.ingest)")
    parser.add_argument("--seconds", type=int, default=10, help="how long wrk loads the server while sampled")
    parser.add_argument(
        "--server",
        choices=sorted(FACTORIES),
        default="app",
        help="our app under plain uvicorn, `smartcar-ingest web`, or bare Starlette (to see what it pays too)",
    )
    parser.add_argument(
        "--paced", type=int, metavar="RPS", help="offer this many requests per second instead of saturating"
    )
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=20, help="frames listed per table")
    parser.add_argument("--native", action="store_true", help="include C and Rust frames (py-spy --native)")
    parser.add_argument("--nonblocking", action="store_true", help="never pause the server (torn stacks)")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks in this file")
    parser.add_argument("--perf", action="store_true", help="also record on-CPU samples with perf (by library)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists() or shutil.which("wrk") is None:
        raise SystemExit("needs py-spy (in the dev dependencies) and wrk (apt-get install wrk)")
    factory = FACTORIES[args.server]
    unique = BODIES_PER_SECOND[args.bodies] * args.seconds  # no repeats, as in the benchmark
    with body_file(args.bodies, unique) as (bodies, mean_size), redis_with_aof() as redis_server:
        with serving(factory, redis_server.url) as (server, port):
            wrk(port, 2, bodies)  # warm-up: imports, connection pools, caches
            flush = redis.Redis.from_url(redis_server.url)
            new_to_the_service(flush)  # the measured run posts the same bodies again: new to the dedupe
            flush.close()
            raw = args.raw or bodies.with_name("profile.txt")
            command = [py_spy, "record", "--pid", str(server.pid), "--format", "raw", "-o", str(raw)]
            command += ["--rate", str(args.rate), "--duration", str(args.seconds + 2)]
            command += ["--nonblocking"] if args.nonblocking else []
            spy = subprocess.Popen([*command, *(["--native"] if args.native else [])], stdout=subprocess.DEVNULL)
            perf_data = raw.with_name("perf.data")
            perf = _perf_record(server.pid, perf_data, args.seconds) if args.perf else None
            time.sleep(1)  # py-spy attaches
            before = cpu_seconds(server.pid)
            stats = wrk(port, args.seconds, bodies, args.paced)
            cpu = cpu_seconds(server.pid) - before
            spy.wait()
            if perf is not None:
                perf.wait()
        requests = max(1, stats["requests"])
        print(f"{BODY_SETS[args.bodies][1]} (mean {mean_size:,} B), server {args.server}")
        print(
            f"{stats['requests']} requests in {stats['duration_us'] / 1e6:.1f} s "
            f"({stats['requests'] / (stats['duration_us'] / 1e6):,.0f}/s), non-2xx {stats['non2xx']}, "
            f"p99 {stats['p99_us'] / 1000:.1f} ms, CPU {cpu * 1e6 / requests:.0f} µs per request"
        )
        print(summarise(raw.read_text().splitlines(), args.top))
        if args.perf:
            print("\n== perf: on-CPU samples by library, then by symbol")
            print(_perf_report(perf_data, "dso", 10))
            print(_perf_report(perf_data, "dso,sym", args.top))


def _perf_record(pid: int, output: Path, seconds: int) -> subprocess.Popen[bytes]:
    if shutil.which("perf") is None:
        raise SystemExit("--perf needs perf (apt-get install linux-perf)")
    command = ["perf", "record", "-F", "999", "-p", str(pid), "-o", str(output), "--", "sleep", str(seconds)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _perf_report(data: Path, sort: str, top: int) -> str:
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    lines = [line.rstrip() for line in report.splitlines() if line.strip() and not line.startswith("#")]
    return "\n".join(lines[:top])


if __name__ == "__main__":
    main()
