"""The web edge's per-delivery work, piece by piece, each timed alone (warm, in one process).

    python -m bench.ingest_parts

For the fleet mix (the mean over the captured full-state deliveries, 1.9 to 16 KB) and the
1.9 KB capture alone, in microseconds per delivery: the signature, the NaN/Infinity scan,
pydantic-core's JSON parse with no fields to check (the floor of any validation with it), the
edge's validation, the whole one-pass check, the job's data and the share of the packed script
call; then the CPU of one script call as the edge makes it, beside redis-py's registered script,
on a private Redis. Served, each costs 10-30 % more (caches shared with the server and the kernel); the
rest of a delivery's CPU is the server's own (what bare Starlette pays), the endpoint's glue and
the round trip to Redis: ``python -m bench.profile_ingest`` shows those under load.
"""

from __future__ import annotations

import asyncio
import json
import time
import timeit
from collections.abc import Awaitable, Callable

import hiredis
from pydantic_core import SchemaValidator
from pydantic_core import core_schema as cs
from redis.asyncio import Redis as AsyncRedis

from bench.ingest import BODY_SETS, CAPTURED
from core.events.parse import _INFINITY, _NAN, quick_vehicle_event
from core.events.wire import EDGE_VALIDATOR
from core.redis.functions import lua_function
from core.redis.inbox import DirectScript
from core.redis.jobs import spliced_job_data
from core.signatures import sign, verify_signature
from tests.procs import RedisServer

TOKEN = b"bench-management-token"
#: A schema with nothing to check: what pydantic-core pays to read the JSON at all.
PARSE_ONLY = SchemaValidator(cs.typed_dict_schema({}, extra_behavior="ignore"))


def bodies(mix: str) -> list[bytes]:
    names = BODY_SETS[mix][0]
    return [json.dumps(json.loads((CAPTURED / f"{n}.json").read_text()), separators=(",", ":")).encode() for n in names]


def per_body(work: Callable[[bytes], object], items: list[bytes], number: int = 400) -> float:
    """Microseconds per body, the best of five runs over every body in turn."""
    best = min(timeit.repeat(lambda: [work(body) for body in items], number=number, repeat=5))
    return best / number / len(items) * 1e6


def parts(mix: str) -> dict[str, float]:
    items = bodies(mix)
    signatures = {body: sign(TOKEN, body) for body in items}
    return {
        "signature (verify_signature, HMAC-SHA256)": per_body(
            lambda body: verify_signature((TOKEN,), body, signatures[body]), items
        ),
        "NaN/Infinity scan": per_body(lambda body: _NAN(body) is not None or _INFINITY(body) is not None, items),
        "pydantic-core JSON parse, nothing checked": per_body(PARSE_ONLY.validate_json, items),
        "edge validation (EDGE_VALIDATOR)": per_body(EDGE_VALIDATOR.validate_json, items),
        "one-pass check (quick_vehicle_event: scan, validation, envelope)": per_body(quick_vehicle_event, items),
        "job data (spliced_job_data)": per_body(
            lambda body: spliced_job_data("0b9e1c0e-54c2-4b0e-9c55-5f1c0a1f3c11", "VEHICLE_STATE", body, 0), items
        ),
        "script arguments packed (hiredis, per event)": per_body(
            lambda body: hiredis.pack_command(("EVALSHA", "f" * 40, 2, "k", "k", "id", b"d" * 16, body, "desc")),
            items,
        ),
    }


def script_calls(calls: int = 3000) -> dict[str, float]:
    """CPU microseconds per call of a script given a batch's arguments (twelve 1.9 KB bodies), on a
    private Redis: through redis-py's ``FCALL`` (the baseline) and :class:`DirectScript`.
    The CPU includes the kernel's work for this process's socket writes and reads."""
    function = lua_function("bench_count_arguments", "return #ARGV")
    args = [body for body in bodies("small") * 12][:12]
    server = RedisServer()
    server.start()

    async def measure() -> dict[str, float]:
        client = AsyncRedis.from_url(server.url, socket_timeout=0.5)
        try:
            calls_of: dict[str, Callable[[], Awaitable[object]]] = {}
            registered = function.bind(client)
            direct = DirectScript(client, function)
            calls_of["redis-py's FCALL (baseline)"] = lambda: registered(keys=["k"], args=args)
            calls_of["DirectScript (the edge's)"] = lambda: direct(["k"], args)
            figures = {}
            for name, call in calls_of.items():
                for _ in range(100):  # warm: connections, the function loaded
                    await call()
                started = time.process_time()
                for _ in range(calls):
                    await call()
                figures[name] = (time.process_time() - started) / calls * 1e6
            return figures
        finally:
            await client.aclose()

    try:
        return asyncio.run(measure())
    finally:
        server.cleanup()


def main() -> None:
    fleet, small = parts("fleet"), parts("small")
    print("| part | fleet mix µs | 1.9 KB µs |\n|---|---:|---:|")
    for name in fleet:
        print(f"| {name} | {fleet[name]:.1f} | {small[name]:.1f} |")
    figures = script_calls()
    baseline = next(iter(figures.values()))
    print("\n| one script call with twelve 1.9 KB bodies | CPU µs per call | vs baseline |\n|---|---:|---:|")
    for name, micros in figures.items():
        print(f"| {name} | {micros:.0f} | {micros / baseline:.2f}x |")


if __name__ == "__main__":
    main()
