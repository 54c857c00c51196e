"""``python -m bench.commit_cost``: the worker's completion step against the same writes sent plainly.

Each event of the captured fleet mix is completed as the worker completes it: its merge planned
on the vehicle's state (:meth:`core.redis.vehicle_state.VehicleStates.plan`), then one
transaction per batch for the merges, the publishes and the marks (:class:`core.redis.published.OutputStream`).
The baseline sends the same bytes as plain pipelined commands, with no function, no check and no
atomicity (the accept mark looked up, the state's token read, the signals, ``_updatedAt`` and
``_eventId`` written, the entry added, the mark set): what those writes cost Redis at the least.
Both run on one Redis with AOF, taking turns; the figure is Redis's CPU (``INFO cpu``) per event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from bench.ingest import fleet_documents, redis_cpu
from cli.redis_admin import load_functions
from core.events.parse import parse_stored
from core.redis.dedupe import event_marks, job_digest
from core.redis.keys import job_id_for, vehicle_state_key
from core.redis.published import OutputStream
from core.redis.vehicle_state import VehicleStates
from core.store.users import UserRecord
from tests.procs import RedisServer
from workers.output import Enrichment, build_document, stream_fields

BATCH = 32
USER = UserRecord(id=1, email=None, name=None, smartcar_user_id=None)


def _events(count: int) -> list[tuple[Any, dict[str, Any]]]:
    """``count`` fleet-mix events, each with a fresh eventId and vehicle, and its output document."""
    templates = fleet_documents()
    events = []
    for n in range(count):
        document = templates[n % len(templates)]
        document = {**document, "eventId": str(uuid.uuid4())}
        document["data"] = {**document["data"], "vehicle": {**document["data"]["vehicle"], "id": str(uuid.uuid4())}}
        event = parse_stored(json.dumps(document))
        events.append((event, build_document(event, USER, Enrichment(), 0, 0)))
    return events


async def _ours(client: AsyncRedis, events: list[tuple[Any, dict[str, Any]]]) -> None:
    output = OutputStream(client, "bench-out", 604_800)
    states = VehicleStates(client, "bench:vs:")

    async def complete(event: Any, document: dict[str, Any]) -> None:
        plan = await states.plan(event.vehicle.id, document["signals"], document["vehicle"])
        document["staleSignals"] = plan.stale_signals
        await output.publish(event.event_id, stream_fields(event, USER, document), plan)

    for start in range(0, len(events), BATCH):
        await asyncio.gather(*(complete(e, d) for e, d in events[start : start + BATCH]))


async def _plain(client: AsyncRedis, events: list[tuple[Any, dict[str, Any]]]) -> None:
    marks = event_marks(604_800)
    states = VehicleStates(client, "bench:vs:")
    for start in range(0, len(events), BATCH):
        pipe = client.pipeline(transaction=False)
        for event, document in events[start : start + BATCH]:
            key = vehicle_state_key(states.prefix, event.vehicle.id)
            plan = await states.plan(event.vehicle.id, document["signals"], document["vehicle"])
            digest = job_digest(job_id_for(event.event_id))
            mark = f"{marks.registry}:plain:{digest[:2].hex()}"
            pipe.hget(mark, digest[4:])
            pipe.hmget(key, ["_updatedAt", "_eventId"])
            pipe.hset(key, mapping=dict(zip(plan.writes[::2], plan.writes[1::2], strict=True)))
            pipe.hset(key, mapping={"_updatedAt": 1, "_eventId": event.event_id})
            pipe.expire(key, 2_592_000)
            pipe.xadd("bench-out-plain", stream_fields(event, USER, document))  # type: ignore[arg-type]
            pipe.hset(mark, digest[4:], "2")
        await pipe.execute()


async def _measure(url: str, rounds: int, count: int) -> dict[str, list[float]]:
    import redis

    sync = redis.Redis.from_url(url)
    figures: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(rounds):
        for name, run in (("ours", _ours), ("plain", _plain)):
            events = _events(count)
            client = AsyncRedis.from_url(url)
            before = redis_cpu(sync)
            await run(client, events)
            figures[name].append((redis_cpu(sync) - before).total * 1e6 / count)
            await client.aclose()
    sync.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.commit_cost")
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = RedisServer(appendonly=True)
    server.start()
    try:
        load_functions(server.url)
        figures = asyncio.run(_measure(server.url, args.rounds, args.events))
    finally:
        server.cleanup()
    print(f"Redis CPU per event, {args.events} fleet-mix events a round, {BATCH} a call, AOF on:\n")
    print("| completion | µs/event, each round |\n|---|---|")
    for name, label in (
        ("ours", "publish (planned merge, checks, one transaction)"),
        ("plain", "the same writes, plain"),
    ):
        print(f"| {label} | {', '.join(f'{v:.0f}' for v in figures[name])} |")
    ratios = [o / p for o, p in zip(figures["ours"], figures["plain"], strict=True)]
    print(f"\nours ÷ plain, each round: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
