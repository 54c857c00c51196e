"""Bounded Redis (issue 16): compact eventId marks, streams with a retention, jobs that do not linger,
Redis memory as a signal. Every test runs against a real Redis.

Slot boundaries are crossed on the scripts' own clock (the ``clock`` the benchmark uses too), so
these tests never wait for a day to pass; what Redis itself expires is checked with a 2-second TTL,
waiting for it with a generous deadline and asserting only what a slow machine cannot make false.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job
from rq.worker_registration import REDIS_WORKER_KEYS

from cli.samples import sample_event
from cli.status import collect_status, render_text
from core.config import Settings
from core.redis.dedupe import (
    GROW_AT,
    SLOTS_PER_TTL,
    Marks,
    event_marks,
    job_digest,
    parked_marks,
    slot_width,
    start_without_legacy_window,
)
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions
from core.redis.keys import (
    DEDUPE_PREFIX,
    EVENT_IDS_KEY,
    PARKED_IDS_KEY,
    PARKED_MARK_PREFIX,
    PUBLISHED_PREFIX,
    job_id_for,
    queue_key,
)
from core.redis.memory import read_memory
from core.redis.parked import ParkedStream, replay_parked
from core.redis.published import OutputStream
from core.redis.queue_metrics import QueueCollector, read_groups
from tests.conftest import TOKEN
from tests.marks import generations, recall
from tests.pipeline import run_worker_burst, worker_env
from tests.procs import free_port, wait_for_port

DAY = 86_400
WEEK = 7 * DAY


class Clock:
    """The scripts' clock, moved by hand: starts at the wall clock, so Redis's own expiry of the
    hashes (``EXPIREAT`` in the future) never interferes."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def run(redis_url: str, scenario: Callable[[AsyncRedis], Awaitable[Any]]) -> Any:
    async def wrapped() -> Any:
        client = AsyncRedis.from_url(redis_url)
        try:
            return await scenario(client)
        finally:
            await client.aclose()

    return asyncio.run(wrapped())


def inbox(client: AsyncRedis, ttl: int = WEEK, clock: Clock | None = None, queue: str = "q") -> Inbox:
    return Inbox(client, JobOptions(queue), "smartcar:parked", ttl, clock=clock)


def family_hashes(client: redis.Redis, registry: str = EVENT_IDS_KEY) -> list[bytes]:
    return list(client.scan_iter(match=registry + ":*", count=1000))


# --- compact dedupe ---------------------------------------------------------------------------


def test_a_duplicate_is_caught_across_slot_boundaries_until_the_ttl_then_forgotten(redis_url, redis_client):
    """An eventId stays a duplicate through every slot boundary up to the TTL (here hour-long
    slots), is forgotten once the TTL and its slot have passed, and never before."""
    ttl = SLOTS_PER_TTL * 3600
    width = slot_width(ttl)
    assert width == 3600
    offsets = sorted(
        {1, width - 1, width + 1, 2 * width + 7, 3 * width, 5 * width + 30, ttl - width, ttl - 1}
        - set(range(ttl, 6 * width))
    )
    clock = Clock()

    async def scenario(client: AsyncRedis) -> dict[str, Any]:
        box = inbox(client, ttl, clock)
        start = clock.now
        seen = {"first": await box.accept("ev-kept", "VEHICLE_STATE", "{}", 0), "repeats": []}
        # Through every slot boundary up to one second before the TTL, with other traffic in between.
        for offset in offsets:
            clock.now = start + offset
            await box.accept(f"other-{offset}", "VEHICLE_STATE", "{}", 0)
            seen["repeats"].append(await box.accept("ev-kept", "VEHICLE_STATE", "{}", 0))
        # Past the TTL and the rest of its slot, the eventId is forgotten: accepted again.
        clock.now = start + ttl + width
        seen["after"] = await box.accept("ev-kept", "VEHICLE_STATE", "{}", 0)
        return seen

    seen = run(redis_url, scenario)
    assert seen["first"] is True
    assert len(offsets) >= 6
    assert seen["repeats"] == [False] * len(offsets)
    assert seen["after"] is True
    slots = {entry.split(":")[3] for entry in redis_client.get(EVENT_IDS_KEY).decode().split(";")}
    assert "legacy" not in slots  # the legacy window (one TTL after the registry appeared) is over
    assert len(slots) >= 2  # the slots still live at the end: the last ones of the TTL, and now's


def test_marks_expire_in_redis_a_slot_at_a_time_never_before_the_ttl(redis_url, redis_client):
    """With a 2 s TTL (1 s slots) Redis drops the marks' hashes by itself: the eventId is forgotten
    no sooner than the TTL after it was accepted, and then accepted again."""
    ttl = 2
    started = time.monotonic()

    async def accept(client: AsyncRedis) -> bool:
        return await inbox(client, ttl).accept("ev-short", "VEHICLE_STATE", "{}", 0)

    assert run(redis_url, accept) is True
    marks = event_marks(ttl)
    assert recall(redis_client, marks, "ev-short") == b"1"
    keys = family_hashes(redis_client)
    assert keys
    assert all(0 < redis_client.ttl(key) <= ttl + slot_width(ttl) for key in keys)
    deadline = time.monotonic() + 30
    while recall(redis_client, marks, "ev-short") is not None:
        assert time.monotonic() < deadline, "the mark was never forgotten"
        time.sleep(0.05)
    assert time.monotonic() - started >= ttl  # forgotten, but not before the TTL
    # Redis expires the whole hashes itself: a lookup skips a generation from the second it ends
    # (its end <= now), Redis drops its hash a millisecond later (EXPIREAT: now > end, in ms).
    while redis_client.exists(*keys):
        assert time.monotonic() < deadline, "Redis never expired the marks' hashes"
        time.sleep(0.01)
    assert run(redis_url, accept) is True


def test_concurrent_redeliveries_through_several_web_processes_give_one_job(redis_url, redis_client):
    """Four web processes (clients) racing 25 redeliveries each of 20 events, across a slot boundary
    on their clock: exactly one accept per eventId, one job each."""
    clock = Clock()
    ids = [f"race-{i}" for i in range(20)]

    async def scenario(_: AsyncRedis) -> list[tuple[str, bool]]:
        clients = [AsyncRedis.from_url(redis_url) for _ in range(4)]
        boxes = [inbox(c, 60, clock) for c in clients]
        try:
            calls = [(event_id, boxes[n % 4]) for n in range(25) for event_id in ids]
            first_half = calls[: len(calls) // 2]
            results = await asyncio.gather(*(box.accept(e, "VEHICLE_STATE", "{}", 0) for e, box in first_half))
            clock.now += slot_width(60)  # the next slot, opened by a new event: the first's marks are still found
            assert await boxes[0].accept("fresh", "VEHICLE_STATE", "{}", 0)
            rest = calls[len(calls) // 2 :]
            results += await asyncio.gather(*(box.accept(e, "VEHICLE_STATE", "{}", 0) for e, box in rest))
            return [(e, ok) for (e, _), ok in zip(calls, results, strict=True)]
        finally:
            for c in clients:
                await c.aclose()

    outcomes = run(redis_url, scenario)
    accepted = sorted(e for e, ok in outcomes if ok)
    assert accepted == sorted(ids)
    assert sorted(i.decode() for i in redis_client.lrange(queue_key("q"), 0, -1)) == sorted([*ids, "fresh"])


def test_marks_stay_exact_when_a_slot_grows_new_generations(redis_url, redis_client):
    """A first burst overfills the one hash a fresh slot starts with: bigger generations open, every
    hash stays a listpack, and every eventId is still found, in whichever generation it went."""
    clock = Clock()
    ids = [str(uuid.uuid4()) for _ in range(3000)]

    async def scenario(client: AsyncRedis) -> tuple[list[bool], list[bool]]:
        box = inbox(client, WEEK, clock)
        first = []
        for start in range(0, len(ids), 250):
            first += await asyncio.gather(*(box.accept(e, "VEHICLE_STATE", "{}", 0) for e in ids[start : start + 250]))
            clock.now += 1
        again = await asyncio.gather(*(box.accept(e, "VEHICLE_STATE", "{}", 0) for e in ids))
        return first, again

    first, again = run(redis_url, scenario)
    assert all(first)
    assert not any(again)
    generations = [e for e in redis_client.get(EVENT_IDS_KEY).decode().split(";") if not e.endswith(":legacy")]
    assert len(generations) >= 2
    keys = family_hashes(redis_client)
    assert sum(redis_client.hlen(k) for k in keys) == len(ids)
    assert {redis_client.object("encoding", k) for k in keys} == {b"listpack"}
    assert max(redis_client.hlen(k) for k in keys) <= 128
    assert max(redis_client.hlen(k) for k in keys) >= GROW_AT  # the hash that made it grow


def test_a_registry_rewritten_between_two_lookups_is_read_afresh(redis_client):
    """The marks' library keeps the registry it parsed from call to call, but only for the same text:
    a registry another writer changed (another release, an operator, a restore) is read again."""
    registry, event_id = "probe:event-ids", "ev-rewritten"
    marks = Marks(registry, WEEK, "", clock=lambda: 1_000.0)
    digest = job_digest(job_id_for(event_id))
    shard, field = "0", digest[4:]  # one hash a generation (0 bits): number 0
    redis_client.delete(registry, f"{registry}:w-1:0:{shard}", f"{registry}:w-2:0:{shard}")
    redis_client.set(registry, "999999:0:0:w-1")
    redis_client.hset(f"{registry}:w-1:0:{shard}", field, "1")
    assert recall(redis_client, marks, event_id) == b"1"
    assert recall(redis_client, marks, event_id) == b"1"  # the second call reads the kept parse
    redis_client.set(registry, "999999:0:0:w-2")
    redis_client.hset(f"{registry}:w-2:0:{shard}", field, "2")
    assert recall(redis_client, marks, event_id) == b"2"
    redis_client.set(registry, "999999:0:0:w-2;999999:0:0:w-1")
    redis_client.delete(f"{registry}:w-2:0:{shard}")
    assert recall(redis_client, marks, event_id) == b"1"


def test_a_remembered_event_costs_under_40_bytes_at_steady_state(redis_url, redis_client):
    """Nine days of 2,000 events a day with the 7-day TTL, on the scripts' clock: what is live at
    the end (``SLOTS_PER_TTL + 1`` slots) costs under 40 bytes per remembered event by MEMORY USAGE, all in listpacks.
    (``bench/memory.py`` measures it at the fleet's marks per hash.)"""
    clock = Clock()
    per_day = 2000
    days = 9

    async def scenario(client: AsyncRedis) -> None:
        box = inbox(client, WEEK, clock)
        output = OutputStream(client, "bench-output", WEEK, clock=clock)
        total = per_day * days
        for _ in range(0, total, 200):
            clock.now += DAY * 200 / per_day
            ids = [str(uuid.uuid4()) for _ in range(200)]
            assert all(await asyncio.gather(*(box.accept(e, "VEHICLE_STATE", "{}", 0) for e in ids)))
            for part in range(0, len(ids), 50):
                await asyncio.gather(*(output.publish(e, {"event_id": e}) for e in ids[part : part + 50]))
            await client.delete(queue_key("q"), "bench-output", *(Job.key_for(e) for e in ids))
        await box.accept("last", "VEHICLE_STATE", "{}", 0)  # the registry forgets the expired slots

    run(redis_url, scenario)
    # What expired on the scripts' clock (days ahead of Redis's) is what Redis would have dropped.
    live = {slot for slot, _, _ in generations(redis_client, EVENT_IDS_KEY)}
    assert len(live) == SLOTS_PER_TTL + 1
    keys = [k for k in family_hashes(redis_client) if k.decode().split(":")[2] in live]
    marks = sum(redis_client.hlen(k) for k in keys)
    usage = sum(redis_client.memory_usage(k, samples=0) for k in [*keys, EVENT_IDS_KEY.encode()])
    assert 7 * per_day <= marks <= (7 + 7 / SLOTS_PER_TTL + 1) * per_day
    assert {redis_client.object("encoding", k) for k in keys} == {b"listpack"}
    assert usage / marks < 40, usage / marks


def test_publish_turns_the_accept_mark_into_published_once(redis_url, redis_client):
    """The edge's mark becomes the publish mark: ``was_published`` follows it, a second publish
    adds nothing, and racing publishes of an event never accepted (a replay) add one entry."""

    async def scenario(client: AsyncRedis) -> dict[str, Any]:
        box = inbox(client)
        output = OutputStream(client, "out", WEEK)
        await box.accept("ev-p", "VEHICLE_STATE", "{}", 0)
        before = await output.was_published("ev-p")
        first = await output.publish("ev-p", {"event_id": "ev-p"})
        again = await output.publish("ev-p", {"event_id": "ev-p"})
        after = await output.was_published("ev-p")
        raced = await asyncio.gather(*(output.publish("ev-replayed", {"event_id": "ev-replayed"}) for _ in range(20)))
        redelivered = await box.accept("ev-p", "VEHICLE_STATE", "{}", 0)
        return {"before": before, "first": first, "again": again, "after": after, "raced": raced, "redo": redelivered}

    outcome = run(redis_url, scenario)
    assert outcome["before"] is False
    assert outcome["first"] is not None
    assert outcome["again"] is None
    assert outcome["after"] is True
    assert sum(entry is not None for entry in outcome["raced"]) == 1
    assert outcome["redo"] is False
    assert recall(redis_client, event_marks(WEEK), "ev-p") == b"2"
    assert [f[b"event_id"] for _, f in redis_client.xrange("out")] == [b"ev-p", b"ev-replayed"]
    # One mark per event, published or not: two events, two fields.
    assert sum(redis_client.hlen(k) for k in family_hashes(redis_client)) == 2


class HashGoneAfterTheCheck(OutputStream):
    """An output stream whose first publish finds its marks' hashes gone between its check and its write,
    as when a slot's hashes expire in that moment."""

    def __init__(self, client: AsyncRedis, redis_url: str) -> None:
        super().__init__(client, "out", WEEK)
        self.redis_url = redis_url

    async def _check(self, transaction: Any, args: list[Any]) -> Any:
        verdicts = await super()._check(transaction, args)
        with redis.Redis.from_url(self.redis_url) as client:
            client.delete(*family_hashes(client))
        return verdicts


def test_a_mark_whose_hash_expired_after_the_check_is_written_anew_with_its_ttl(redis_url, redis_client):
    """The publish writes the mark into the hash its check found it in. If that hash is gone by then,
    the mark is written as a new one, in a hash with its TTL: no hash is left without one."""

    async def scenario(client: AsyncRedis) -> str | None:
        await inbox(client).accept("ev-gone", "VEHICLE_STATE", "{}", 0)
        return await HashGoneAfterTheCheck(client, redis_url).publish("ev-gone", {"event_id": "ev-gone"})

    assert run(redis_url, scenario) is not None
    assert recall(redis_client, event_marks(WEEK), "ev-gone") == b"2"
    hashes = family_hashes(redis_client)
    assert len(hashes) == 1
    assert redis_client.ttl(hashes[0]) > 0


def test_a_parked_mark_parks_once_across_slots_and_replay_clears_it(redis_url, redis_client):
    """The parked mark (a digest of reason and body) in the compact marks: a repeat three slots
    later parks nothing, a different body parks again, and replay clears the mark with the entry."""
    clock = Clock()
    body = '{"eventId":"ev-k","eventType":"VEHICLE_STATE"}'

    async def scenario(client: AsyncRedis) -> list[Any]:
        parked = ParkedStream(client, "smartcar:parked", WEEK, clock=clock)
        first = await parked.park("ev-k", "unknown_user", "No user.", body)
        clock.now += 3 * DAY
        repeat = await parked.park("ev-k", "unknown_user", "No user.", body)
        other = await parked.park("ev-k", "unknown_user", "No user.", body.replace("}", ',"v":2}'))
        back = await parked.park("ev-k", "unknown_user", "No user.", body)  # the first body again: a new fact
        report = await replay_parked(client, JobOptions("q"), "smartcar:parked", reason="unknown_user", limit=1)
        return [first, repeat, other, back, report.requeued]

    first, repeat, other, back, requeued = run(redis_url, scenario)
    assert first is not None
    assert repeat is None
    assert other is not None
    assert back is not None
    assert requeued == 1
    assert recall(redis_client, parked_marks(WEEK), "ev-k") is None
    assert redis_client.xlen("smartcar:parked") == 2


def test_marks_of_the_previous_version_are_read_during_the_legacy_window(redis_url, redis_client):
    """An upgrade from per-key marks: for one TTL after the compact marks appear, a ``seen`` key of
    the previous version still makes a delivery a duplicate and a ``published`` key still stops a
    second publish; after that window they are no longer read."""
    clock = Clock()
    redis_client.set(DEDUPE_PREFIX + job_id_for("old-seen"), "old-seen", ex=3600)
    redis_client.set(PUBLISHED_PREFIX + job_id_for("old-published"), "1", ex=3600)

    async def scenario(client: AsyncRedis) -> list[Any]:
        box = inbox(client, 3600, clock)
        output = OutputStream(client, "out", 3600, clock=clock)
        outcomes = [
            await box.accept("new", "VEHICLE_STATE", "{}", 0),  # the first mark: the window opens
            await box.accept("old-seen", "VEHICLE_STATE", "{}", 0),
            await output.was_published("old-published"),
            await output.publish("old-published", {"event_id": "old-published"}),
        ]
        clock.now += 3600 + 1
        outcomes.append(await box.accept("old-seen", "VEHICLE_STATE", "{}", 0))
        return outcomes

    assert run(redis_url, scenario) == [True, False, True, None, True]
    assert redis_client.xlen("out") == 0


def test_a_redis_new_to_the_service_starts_its_marks_without_a_legacy_window(redis_url, redis_client):
    """`redis-setup` on a Redis with no trace of an earlier release writes both registries empty: no
    legacy window opens, so a per-key mark written afterwards (by nothing of this release) is never
    read, and each new delivery costs no lookup of one. A second run changes nothing."""
    assert start_without_legacy_window(redis_client) == [EVENT_IDS_KEY, PARKED_IDS_KEY]
    assert start_without_legacy_window(redis_client) == []
    clock = Clock()

    async def scenario(client: AsyncRedis) -> list[bool]:
        box = inbox(client, 3600, clock)
        first = await box.accept("new", "VEHICLE_STATE", "{}", 0)
        redis_client.set(DEDUPE_PREFIX + job_id_for("late"), "late", ex=3600)
        return [first, await box.accept("late", "VEHICLE_STATE", "{}", 0)]

    assert run(redis_url, scenario) == [True, True]
    assert b"legacy" not in redis_client.get(EVENT_IDS_KEY)
    assert generations(redis_client, EVENT_IDS_KEY)


@pytest.mark.parametrize(
    "trace",
    [
        lambda client: client.set(DEDUPE_PREFIX + "old", "old"),
        lambda client: client.set(PUBLISHED_PREFIX + "old", "1"),
        lambda client: client.set(PARKED_MARK_PREFIX + "old", "1"),
        lambda client: client.sadd(REDIS_WORKER_KEYS, "rq:worker:an-earlier-release"),
        lambda client: client.set(EVENT_IDS_KEY, "1:0:0:legacy"),
    ],
    ids=["seen-mark", "published-mark", "parked-mark", "registered-worker", "a-registry"],
)
def test_any_trace_of_an_earlier_release_leaves_the_legacy_window_to_open(redis_client, trace):
    """A per-key mark of either family, a registered RQ worker (whatever its release) or a registry
    already written: `redis-setup` writes no registry, and the first mark opens the window as before."""
    trace(redis_client)
    before = redis_client.get(EVENT_IDS_KEY)
    assert start_without_legacy_window(redis_client) == []
    assert redis_client.get(EVENT_IDS_KEY) == before
    assert not redis_client.exists(PARKED_IDS_KEY)


# --- streams with a retention -----------------------------------------------------------------


def test_the_output_and_parked_streams_stay_within_their_retention_under_continuous_adds(redis_url, redis_client):
    """Publishing and parking without pause for three retentions (1 s): each add trims by age, so
    no more than one stream node (100 entries) older than the retention is ever left, however fast
    or slow the machine."""

    async def scenario(client: AsyncRedis) -> tuple[int, int]:
        output = OutputStream(client, "out", 60, retention_seconds=1)
        parked = ParkedStream(client, "smartcar:parked", 60, retention_seconds=1)
        started, published, n = time.monotonic(), 0, 0
        while time.monotonic() - started < 3 or published < 600:
            batch = [f"e-{n + i}" for i in range(20)]
            n += 20
            await asyncio.gather(*(output.publish(e, {"event_id": e}) for e in batch))
            await asyncio.gather(*(parked.park(e, "unknown_user", "No user.", "{}") for e in batch))
            published += len(batch)
        return published, published

    published, parked_count = run(redis_url, scenario)
    for stream, added in (("out", published), ("smartcar:parked", parked_count)):
        ids = [entry_id.decode() for entry_id, _ in redis_client.xrange(stream)]
        newest = int(ids[-1].split("-")[0])
        older = [i for i in ids if int(i.split("-")[0]) < newest - 1000]
        assert len(older) <= 100, (stream, len(older))
        assert len(ids) < added, stream  # trimmed while adding, by nothing else


def test_a_consumer_group_behind_is_measured_and_shown_near_the_retention(settings, redis_client):
    """The oldest pending entry and the oldest unread one give how far a group is behind; the
    collector exports it beside the retention, and ``status`` flags a group near the retention."""
    stream = settings.output_stream
    now_ms = int(time.time() * 1000)
    for age in (55, 50, 40, 30, 20):
        redis_client.xadd(stream, {"event_id": f"e{age}"}, id=f"{now_ms - age * 1000}-0")
    redis_client.xgroup_create(stream, "slow", id="0")
    redis_client.xgroup_create(stream, "done", id="$")
    redis_client.xreadgroup("slow", "c1", {stream: ">"}, count=2)  # 55 s and 50 s old: pending

    [done, slow] = read_groups(redis_client, stream, settings.output_stream_retention_seconds, now_ms)
    assert (done["name"], done["behindSeconds"], done["pending"], done["lag"]) == ("done", 0.0, 0, 0)
    assert (slow["pending"], slow["lag"]) == (2, 3)
    assert slow["behindSeconds"] == pytest.approx(55, abs=0.01)
    redis_client.xack(stream, "slow", *[i for i, _ in redis_client.xrange(stream, count=2)])
    [_, acked] = read_groups(redis_client, stream, settings.output_stream_retention_seconds, now_ms)
    assert acked["behindSeconds"] == pytest.approx(40, abs=0.01)  # now the oldest unread one

    short = settings.model_copy(update={"output_stream_retention_seconds": 45})
    report = collect_status(redis_client, short)
    rows = {g["name"]: g for g in report["output"]["groups"]}
    assert rows["slow"]["nearRetention"] is True
    assert rows["done"]["nearRetention"] is False
    assert "near the retention" in render_text(report)

    registry = CollectorRegistry()
    collector = QueueCollector(short)
    registry.register(collector)
    try:
        assert registry.get_sample_value("smartcar_ingest_output_group_behind_seconds", {"group": "slow"}) >= 40
        assert registry.get_sample_value("smartcar_ingest_output_group_behind_seconds", {"group": "done"}) == 0
        assert registry.get_sample_value("smartcar_ingest_output_stream_retention_seconds") == 45
    finally:
        registry.unregister(collector)
        collector.close()


# --- jobs that do not linger ------------------------------------------------------------------


def test_a_finished_job_and_its_result_expire_after_job_result_ttl(pipeline, redis_client):
    """A published event's job hash (with the body) and RQ's result are kept JOB_RESULT_TTL_SECONDS:
    60 s by default, and gone by themselves with a 1 s setting."""
    from tests.test_pipeline import deliver

    event = sample_event()
    deliver(pipeline, event)
    run_worker_burst(pipeline)
    job_key, result_key = Job.key_for(event["eventId"]), f"rq:results:{event['eventId']}"
    assert 0 < redis_client.ttl(job_key) <= 60
    assert 0 < redis_client.ttl(result_key) <= 60

    brief = pipeline.model_copy(update={"job_result_ttl_seconds": 1})
    event = sample_event()
    deliver(brief, event)
    run_worker_burst(brief)
    job_key, result_key = Job.key_for(event["eventId"]), f"rq:results:{event['eventId']}"
    deadline = time.monotonic() + 30
    while redis_client.exists(job_key, result_key):
        assert time.monotonic() < deadline, "the finished job was kept"
        time.sleep(0.1)


def test_replay_enqueues_with_the_configured_result_ttl(redis_url, redis_client):
    """Jobs that replay re-creates carry JOB_RESULT_TTL_SECONDS too (cli/operations.py)."""
    from cli.operations import replay

    settings = Settings(_env_file=None, redis_url=redis_url, job_result_ttl_seconds=7)  # type: ignore[call-arg]

    async def park(client: AsyncRedis) -> None:
        await ParkedStream(client, settings.parked_stream, WEEK).park(
            "ev-r", "unknown_user", "No user.", json.dumps({"eventId": "ev-r", "eventType": "VEHICLE_STATE"})
        )

    run(redis_url, park)
    replay(settings, reason=None, limit=None)
    assert Job.fetch("ev-r", connection=redis_client).result_ttl == 7


# --- memory as a health signal ----------------------------------------------------------------


def test_redis_memory_is_exported_and_read_against_maxmemory(settings, redis_client):
    """/metrics carries Redis's used and max memory; 0 max while Redis has no limit."""
    registry = CollectorRegistry()
    collector = QueueCollector(settings)
    registry.register(collector)
    old = redis_client.config_get("maxmemory")["maxmemory"]
    try:
        assert registry.get_sample_value("smartcar_ingest_redis_memory_used_bytes") > 0
        assert registry.get_sample_value("smartcar_ingest_redis_memory_max_bytes") == 0
        redis_client.config_set("maxmemory", str(1 << 30))
        assert registry.get_sample_value("smartcar_ingest_redis_memory_max_bytes") == 1 << 30
        memory = read_memory(redis_client)
        assert memory.max_bytes == 1 << 30
        assert 0 < memory.used_bytes < memory.max_bytes
    finally:
        redis_client.config_set("maxmemory", old)
        registry.unregister(collector)
        collector.close()


@pytest.mark.process
def test_web_and_worker_warn_at_start_when_redis_has_no_maxmemory(pipeline, redis_client):
    """Both log one warning at start while Redis has no maxmemory, and none once it has one."""
    old = redis_client.config_get("maxmemory")["maxmemory"]

    def started_output(command: list[str]) -> str:
        process = subprocess.run(
            [sys.executable, "-m", "cli.main", *command],
            env=worker_env(pipeline, LOG_LEVEL="WARNING", METRICS_PORT="0"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return process.stdout + process.stderr

    def web_output() -> str:
        port = free_port()
        env = worker_env(pipeline, LOG_LEVEL="WARNING", ADMIN_PORT="0", SMARTCAR_MANAGEMENT_TOKEN=TOKEN)
        command = [sys.executable, "-m", "cli.main", "web", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_port(port, timeout=30)  # serving: the startup checks have run
        finally:
            process.terminate()
            output, _ = process.communicate(timeout=30)
        return output

    try:
        assert "Redis has no maxmemory" in started_output(["worker", "--burst"])
        assert "Redis has no maxmemory" in web_output()
        redis_client.config_set("maxmemory", str(1 << 30))
        assert "Redis has no maxmemory" not in started_output(["worker", "--burst"])
        assert "Redis has no maxmemory" not in web_output()
    finally:
        redis_client.config_set("maxmemory", old)
