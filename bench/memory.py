"""Memory benchmark: the bytes Redis holds per event, structure by structure, at the default settings.

Two measurements on a private redis-server with Redis's default configuration:

* **Remembered events** (the edge's dedupe mark and the worker's publish mark, one field in
  :mod:`core.redis.dedupe`): events are accepted through the web's own enqueue script (group
  commit, :class:`core.redis.inbox.Inbox`), then the worker's ``was_published`` and publish
  scripts run for each, with ``DEDUPE_TTL_SECONDS`` at its 7-day default, over 9 days of the
  scripts' clock (run ahead of Redis's: the marks of the slots that expired on it are dropped at
  the end, as Redis would have). What is left is production's steady state: 8 live slots, each
  hash as full as at 100k vehicles sending once a minute (the rate is divided by 2^12, and so is
  the number of hashes per slot). Bytes are ``MEMORY USAGE`` of every key of the family (hashes
  and registry) over the marks they hold, and ``used_memory`` grown per mark (what the allocator
  and Redis's dictionaries add). Redis's time in each script per event comes from
  ``INFO commandstats`` over the last slot, when every slot is live.
* **Per event in the pipeline**: the captured fleet mix (1.9-16 KB deliveries) accepted, then
  enriched by a real ``smartcar-ingest worker --burst`` against the emulator: the queued job
  hash, the finished job (hash with the body, and RQ's result) while RQ keeps it
  (``JOB_RESULT_TTL_SECONDS``), the output stream entry, and a parked entry of the same body.

The previous version's figures beside them were measured the same way on commit 08041e4 (a
worktree of it, before this change). ``python -m bench --only memory`` runs it; ``make bench``
runs it with the others.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job

from bench.worker import FLEET, _seed_users, fleet_bodies, worker_env
from core.config import Settings
from core.redis.dedupe import slot_width
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions
from core.redis.keys import EVENT_IDS_KEY, queue_key
from core.redis.parked import ParkedStream
from core.redis.published import OutputStream
from tests.marks import generations
from tests.procs import RedisServer, free_port, wait_for_port

DAY = 86_400
#: 100k vehicles, one delivery a minute each.
FLEET_RATE = 100_000 / 60
#: The marks benchmark runs the fleet's rate divided by this: as many marks per hash, fewer hashes.
SCALE = 2**12
#: What the per-key marks of the previous version cost, measured on commit 08041e4 with the same
#: method (a ``seen`` and a ``published`` string key per event): MEMORY USAGE, used_memory.
BEFORE_MARK_BYTES = (272, 384)
#: The enqueue script's Redis time per event on commit 08041e4: its script run alternately with this
#: one on one Redis at steady state, batches of 256, on the same (busy) machine.
BEFORE_ENQUEUE_US = 10.5
#: The finished-job retention of the previous version (RQ's result_ttl), seconds.
BEFORE_RESULT_TTL = 600
#: The pipeline's figures on commit 08041e4, same fleet mix (its output document was schema 1).
BEFORE_OUTPUT_ENTRY = 9_697
BEFORE_QUEUED_JOB = 10_754
BEFORE_FINISHED_JOB = 8_130
BEFORE_PARKED_ENTRY = 7_851


@dataclass
class MarksResult:
    marks: int
    keys: int
    usage_bytes: int
    used_memory_bytes: int
    slots: int
    generations: int
    script_us: dict[str, float]
    """Redis's time per event in the enqueue, was_published and publish scripts."""
    encodings: dict[str, int] = field(default_factory=dict)

    @property
    def per_mark(self) -> float:
        return self.usage_bytes / max(1, self.marks)

    @property
    def per_mark_allocated(self) -> float:
        return self.used_memory_bytes / max(1, self.marks)


@dataclass
class PipelineResult:
    events: int
    body_bytes: float
    queued_job: float
    finished_job: float
    finished_ttl: int
    output_entry: float
    parked_entry: float


def _family_usage(client: redis.Redis, registry: str) -> tuple[int, int, int, dict[str, int]]:
    """(keys, MEMORY USAGE bytes, marks held, encodings) of a family of marks."""
    keys = usage = marks = 0
    encodings: dict[str, int] = {}
    for key in [registry.encode(), *client.scan_iter(match=registry + ":*", count=1000)]:
        size = client.memory_usage(key, samples=0)
        if size is None:
            continue
        keys += 1
        usage += int(size)
        if key != registry.encode():
            marks += int(client.hlen(key))
            encoding = client.object("encoding", key)
            name = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
            encodings[name] = encodings.get(name, 0) + 1
    return keys, usage, marks, encodings


def _script_usec(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_fcall", {})
    return int(stats.get("usec", 0)), int(stats.get("calls", 0))


async def _timed(sync: redis.Redis, timed: bool, totals: list[float], coroutines: list[Any]) -> list[Any]:
    """Run ``coroutines`` (at most 64 at once); when ``timed``, add Redis's script time to totals."""
    before = _script_usec(sync)[0]
    results = []
    for part in range(0, len(coroutines), 64):
        results += await asyncio.gather(*coroutines[part : part + 64])
    if timed:
        totals[0] += _script_usec(sync)[0] - before
        totals[1] += len(coroutines)
    return results


async def _fill_marks(url: str, events_per_day: int, ttl: int) -> dict[str, float]:
    """Accept and publish ``events_per_day`` a day over TTL + two slots, ending now, as the web and
    the worker do (the worker asks ``was_published`` first). Returns Redis's time per event in
    each script over the last slot, when every slot is live."""
    width = slot_width(ttl)
    # TTL and two slots: the first (a fresh start, with the generations of its growth) has expired
    # by the end, so the live slots are as at steady state.
    days = (ttl + 2 * width) / DAY
    total = int(events_per_day * days)
    # The scripts' clock runs from now to the days ahead: no hash expires in Redis meanwhile (what
    # expires on that clock is dropped by measure_marks, as Redis would have).
    start = time.time()
    end = start + days * DAY
    clock_now = [start]
    # 64 calls at once, plus the connection the inbox's enqueue keeps for itself (DirectScript)
    client = AsyncRedis.from_url(url, max_connections=64 + 8)
    sync = redis.Redis.from_url(url)
    inbox = Inbox(client, JobOptions(queue="bench-marks"), "bench-parked", ttl, clock=lambda: clock_now[0])
    output = OutputStream(client, "bench-output", ttl, clock=lambda: clock_now[0])
    chunk = 256
    costs = {"enqueue": [0.0, 0.0], "was_published": [0.0, 0.0], "publish": [0.0, 0.0]}
    try:
        for first in range(0, total, chunk):
            clock_now[0] = start + (end - start) * first / total
            timed = clock_now[0] >= end - width
            ids = [str(uuid.uuid4()) for _ in range(min(chunk, total - first))]
            before = _script_usec(sync)[0]
            accepted = await asyncio.gather(*(inbox.accept(i, "VEHICLE_STATE", "{}", 0) for i in ids))
            if timed:
                costs["enqueue"][0] += _script_usec(sync)[0] - before
                costs["enqueue"][1] += len(ids)
            if not all(accepted):
                raise AssertionError("a fresh eventId was taken for a duplicate")
            published = await _timed(sync, timed, costs["was_published"], [output.was_published(i) for i in ids])
            if any(published):
                raise AssertionError("an accepted event was taken for a published one")
            await _timed(sync, timed, costs["publish"], [output.publish(i, {"event_id": i}) for i in ids])
            with sync.pipeline(transaction=False) as pipe:
                pipe.delete(queue_key("bench-marks"), "bench-output")
                for i in ids:
                    pipe.unlink(Job.key_for(i))
                pipe.execute()
        clock_now[0] = end
        # One more accept at the end: the registry forgets the slots that expired meanwhile.
        await inbox.accept(str(uuid.uuid4()), "VEHICLE_STATE", "{}", 0)
        sync.delete(queue_key("bench-marks"))
        return {name: usec / max(1, events) for name, (usec, events) in costs.items()}
    finally:
        await client.aclose()
        sync.close()


def measure_marks(events_per_day: int = round(FLEET_RATE * DAY / SCALE), ttl: int = 604_800) -> MarksResult:
    server = RedisServer()
    server.start()
    client = redis.Redis.from_url(server.url)
    try:
        baseline = int(client.info("memory")["used_memory"])
        script_us = asyncio.run(_fill_marks(server.url, events_per_day, ttl))
        for key in client.scan_iter(match="rq:*"):
            client.unlink(key)
        live = {slot for slot, _, _ in generations(client, EVENT_IDS_KEY)}
        for key in client.scan_iter(match=EVENT_IDS_KEY + ":*", count=1000):
            if key.decode().split(":")[2] not in live:
                client.unlink(key)  # expired on the scripts' clock: what Redis would have dropped
        keys, usage, marks, encodings = _family_usage(client, EVENT_IDS_KEY)
        grown = int(client.info("memory")["used_memory"]) - baseline
        listed = generations(client, EVENT_IDS_KEY)
        slots = len({slot for slot, _, _ in listed})
        return MarksResult(marks, keys, usage, grown, slots, len(listed), script_us, encodings)
    finally:
        client.close()
        server.cleanup()


def measure_pipeline(events: int = 1000) -> PipelineResult:
    scratch = Path(tempfile.mkdtemp(prefix="smartcar-ingest-bench-memory-"))
    database_url = f"sqlite:///{scratch / 'users.db'}"
    _seed_users(database_url)
    server = RedisServer()
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
    settings = Settings(_env_file=None, redis_url=server.url)  # type: ignore[call-arg]
    client = redis.Redis.from_url(server.url)
    bodies = fleet_bodies(events)
    try:
        wait_for_port(port, timeout=30)

        async def accept() -> None:
            aclient = AsyncRedis.from_url(server.url)
            inbox = Inbox(
                aclient, JobOptions.from_settings(settings), settings.parked_stream, settings.dedupe_ttl_seconds
            )
            try:
                await asyncio.gather(*(inbox.accept(i, "VEHICLE_STATE", b, 0) for i, b in bodies))
                parked = ParkedStream(aclient, "bench-parked", settings.dedupe_ttl_seconds)
                for i, b in bodies[:200]:
                    await parked.park(i, "unknown_user", "No internal user has this Smartcar user id.", b)
            finally:
                await aclient.aclose()

        asyncio.run(accept())
        queued = sum(int(client.memory_usage(Job.key_for(i), samples=0) or 0) for i, _ in bodies) / events
        parked_entry = int(client.memory_usage("bench-parked", samples=0) or 0) / 200
        env = worker_env(server.url, database_url, emulator_url, METRICS_PORT="0")
        subprocess.run(
            [sys.executable, "-m", "cli.main", "worker", "--burst", "--concurrency", "64"],
            env=env,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        finished = 0
        ttls = []
        for i, _ in bodies:
            for key in (Job.key_for(i), f"rq:results:{i}"):
                finished += int(client.memory_usage(key, samples=0) or 0)
            ttls.append(int(client.ttl(Job.key_for(i))))
        length = int(client.xlen(settings.output_stream))
        output_entry = int(client.memory_usage(settings.output_stream, samples=0) or 0) / max(1, length)
        return PipelineResult(
            events=length,
            body_bytes=sum(len(b) for _, b in bodies) / events,
            queued_job=queued,
            finished_job=finished / events,
            finished_ttl=max(ttls),
            output_entry=output_entry,
            parked_entry=parked_entry,
        )
    finally:
        emulator.terminate()
        emulator.wait(timeout=20)
        client.close()
        server.cleanup()


def run() -> tuple[MarksResult, PipelineResult]:
    print("memory: remembered events (7-day TTL, 9 days of the fleet's marks, scaled)…", file=sys.stderr)
    marks = measure_marks()
    print("memory: the fleet mix through the pipeline…", file=sys.stderr)
    pipeline = measure_pipeline()
    return marks, pipeline


def table(marks: MarksResult, pipeline: PipelineResult, settings: Settings | None = None) -> str:
    settings = settings or Settings(_env_file=None)  # type: ignore[call-arg]
    ttl = settings.dedupe_ttl_seconds
    width = slot_width(ttl)
    encodings = ", ".join(f"{count} {name}" for name, count in sorted(marks.encodings.items()))
    lines = [
        "| per event | bytes (MEMORY USAGE) | kept | before (08041e4) |",
        "|---|---:|---|---|",
        f"| remembered eventId (dedupe + publish mark) | **{marks.per_mark:.1f}** "
        f"({marks.per_mark_allocated:.1f} by used_memory) | {ttl / DAY:g} days to {(ttl + width) / DAY:g} days | "
        f"{BEFORE_MARK_BYTES[0]} ({BEFORE_MARK_BYTES[1]} by used_memory), {259_200 / DAY:g} days |",
        f"| output stream entry | {pipeline.output_entry:,.0f} | `OUTPUT_STREAM_RETENTION_SECONDS` "
        f"({settings.output_stream_retention_seconds / 3600:g} h) | {BEFORE_OUTPUT_ENTRY:,} (schema 1), never trimmed |",
        f"| queued job (hash with the body) | {pipeline.queued_job:,.0f} | while queued | {BEFORE_QUEUED_JOB:,} |",
        f"| finished job (hash with the body + result) | {pipeline.finished_job:,.0f} | "
        f"{settings.job_result_ttl_seconds} s (`JOB_RESULT_TTL_SECONDS`) | {BEFORE_FINISHED_JOB:,}, {BEFORE_RESULT_TTL} s |",
        f"| parked entry | {pipeline.parked_entry:,.0f} | `PARKED_RETENTION_SECONDS` "
        f"({settings.parked_retention_seconds / DAY:g} days) | {BEFORE_PARKED_ENTRY:,}, 14 days |",
        "",
        f"Marks: {marks.marks:,} remembered in {marks.keys:,} keys ({encodings} hashes, plus the registry), "
        f"{marks.slots} live slots, {marks.generations} generations; delivery mix mean {pipeline.body_bytes:,.0f} B. "
        f"Redis time per event: enqueue script {marks.script_us['enqueue']:.1f} µs (before: {BEFORE_ENQUEUE_US} µs), "
        f"was_published {marks.script_us['was_published']:.1f} µs, publish {marks.script_us['publish']:.1f} µs.",
    ]
    rate = FLEET_RATE
    remembered = rate * (ttl + width / 2)
    lines += [
        "",
        "| at 100k vehicles, one delivery a minute (1,667/s) | Redis memory |",
        "|---|---:|",
        f"| remembered eventIds ({remembered / 1e9:.2f} billion, TTL + half a slot) | "
        f"{remembered * marks.per_mark_allocated / 1e9:.1f} GB |",
        f"| output stream ({rate * settings.output_stream_retention_seconds / 1e6:.0f} M entries) | "
        f"{rate * settings.output_stream_retention_seconds * pipeline.output_entry / 1e9:.0f} GB |",
        f"| finished jobs ({rate * settings.job_result_ttl_seconds / 1e3:.0f} k) | "
        f"{rate * settings.job_result_ttl_seconds * pipeline.finished_job / 1e9:.1f} GB |",
    ]
    return "\n".join(lines)


def main() -> None:
    marks, pipeline = run()
    print(table(marks, pipeline))


if __name__ == "__main__":
    main()
