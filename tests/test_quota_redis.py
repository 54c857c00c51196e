"""The Redis side of quota-aware enrichment, piece by piece, against the real Redis: the budget
(GCRA) and the 429 pauses (core.smartcar.limiter), the shared reads (core.smartcar.reads) and the
per-minute usage the workers add up (core.redis.deployment_counts).

"Two processes" are two clients with their own connections and their own in-process state, as two
worker processes have; Redis is all they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import lz4.block
import pydantic_core
import pytest
import redis
from redis.asyncio import Redis

from core import metrics
from core.errors import SmartcarRejected, SmartcarUnavailable
from core.redis import deployment_counts
from core.redis.deployment_counts import DeploymentCounts, read_usage
from core.redis.keys import (
    APPLICATION_PAUSE_KEY,
    BUDGET_KEY,
    latest_read_key,
    read_key,
    vehicle_pause_key,
)
from core.smartcar import reads
from core.smartcar.limiter import OverBudget, RequestLimiter
from core.smartcar.reads import LZ4_MARK, MAX_KEPT_BYTES, Read, ReadCache
from tests.conftest import command_calls
from tests.test_redis_clock import DAY_MS, redis_ms, shifted

T = TypeVar("T")
KEY = read_key("signals", "vehicle-1", "user-1")
WINDOW_MS = 300_000


def run(redis_url: str, scenario: Callable[..., Awaitable[T]], clients: int = 1) -> T:
    """Run ``scenario(*clients)`` with that many separate async Redis clients, closed afterwards."""

    async def main() -> T:
        opened = [Redis.from_url(redis_url) for _ in range(clients)]
        try:
            return await scenario(*opened)
        finally:
            for client in opened:
                await client.aclose()

    return asyncio.run(main())


def redis_client_for(client: Redis) -> redis.Redis:
    """A plain client on the same server as ``client``, for looking at keys while a scenario runs."""
    kwargs = client.connection_pool.connection_kwargs
    return redis.Redis(host=kwargs.get("host", "localhost"), port=kwargs.get("port", 6379), db=kwargs.get("db", 0))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def waits() -> float:
    """How many times the limiters of this process made a request wait (``smartcar_ingest_limiter_wait_seconds``)."""
    return sum(metrics.totals(metrics.LIMITER_WAIT_SECONDS, "_count").values())


class Upstream:
    """A stand-in for one Smartcar read: counts calls, answers after ``delay`` seconds or, when
    ``held``, once the test releases it; with ``{"call": n}`` for the nth call, or ``answer``."""

    def __init__(
        self, delay: float = 0.0, error: Exception | None = None, held: bool = False, answer: Any = None
    ) -> None:
        self.calls = 0
        self.answer = answer
        self.delay = delay
        self.error = error
        self.release: asyncio.Event | None = asyncio.Event() if held else None

    async def fetch(self) -> dict[str, Any]:
        self.calls += 1
        call = self.calls
        await asyncio.sleep(self.delay)
        if self.release is not None:
            await self.release.wait()
        if self.error is not None:
            raise self.error
        return {"call": call} if self.answer is None else self.answer


async def latest_with_peak(cache: ReadCache, key: str = KEY) -> tuple[Read, int]:
    """``cache.latest(key)``, and the most memory Python held while it ran (tracemalloc)."""
    tracemalloc.start()
    try:
        return await cache.latest(key), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def claimed(client: redis.Redis, key: str = KEY) -> None:
    """Return once a read of ``key`` is in flight (claimed in Redis), then give the events that
    will wait for it ample time to see the claim."""
    for _ in range(1000):
        if client.hget(key, "claim") is not None:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)


# The budget


def test_the_budget_lets_a_burst_through_then_one_request_per_interval_in_order(redis_url):
    """600 a minute with a burst of 3, asked for 6 at once: at least 3 go without waiting, and
    the others are given slots 100 ms apart after the first (a slower machine only spreads them more)."""

    async def scenario(client: Redis) -> tuple[list[float], int]:
        limiter = RequestLimiter(client, requests_per_minute=600, burst=3, wait_seconds=5)
        started = time.monotonic()

        async def one() -> float:
            await limiter.admit("vehicle-1")
            return time.monotonic() - started

        waited_before = waits()
        done = await asyncio.gather(*(one() for _ in range(6)))
        return sorted(done), int(6 - (waits() - waited_before))

    times, without_waiting = run(redis_url, scenario)
    assert without_waiting >= 3
    for index, slot in ((3, 0.1), (4, 0.2), (5, 0.3)):
        assert times[index] >= slot - 0.01, times


def test_a_request_that_cannot_go_within_the_wait_is_refused_at_once_and_reserves_nothing(redis_url, redis_client):
    """One a minute, a burst of 1: the second request would wait a minute, more than the 0.5 s
    allowed, so it raises OverBudget without sleeping and without moving the budget."""

    async def scenario(client: Redis) -> tuple[float, OverBudget]:
        limiter = RequestLimiter(client, requests_per_minute=1, burst=1, wait_seconds=0.5)
        await limiter.admit("vehicle-1")
        held = redis_client.get(BUDGET_KEY)
        started = time.monotonic()
        with pytest.raises(OverBudget) as refused:
            await limiter.admit("vehicle-1")
        assert redis_client.get(BUDGET_KEY) == held
        return time.monotonic() - started, refused.value

    elapsed, refused = run(redis_url, scenario)
    assert refused.cause == "budget"
    assert 50 < (refused.retry_after or 0) <= 60
    assert elapsed < 30  # refused without waiting the minute for the slot


def test_two_processes_share_one_budget(redis_url):
    """Two limiters on two connections, 300 a minute with a burst of 2, ten requests each: twenty
    requests take at least 18 intervals of 200 ms between them, as one limiter would."""

    async def scenario(first: Redis, second: Redis) -> list[float]:
        limiters = [RequestLimiter(c, requests_per_minute=300, burst=2, wait_seconds=30) for c in (first, second)]
        started = time.monotonic()

        async def one(limiter: RequestLimiter) -> float:
            await limiter.admit(None)
            return time.monotonic() - started

        return sorted(await asyncio.gather(*(one(limiters[i % 2]) for i in range(20))))

    times = run(redis_url, scenario, clients=2)
    assert times[-1] >= 18 * 0.2 - 0.05


def test_no_budget_set_means_no_limit(redis_url, redis_client):
    """Without SMARTCAR_REQUESTS_PER_MINUTE nothing is reserved and nothing waits."""

    async def scenario(client: Redis) -> None:
        limiter = RequestLimiter(client, wait_seconds=0)
        for _ in range(50):
            await limiter.admit("vehicle-1")

    run(redis_url, scenario)
    assert redis_client.exists(BUDGET_KEY) == 0


# Pauses


def test_a_vehicle_429_pauses_that_vehicle_in_every_process_until_retry_after(redis_url, redis_client):
    """A 429 for vehicle-1 seen by one process: the other process's requests for vehicle-1 wait
    until Retry-After has passed (or are refused when that is too long), other vehicles go at once."""

    async def scenario(first: Redis, second: Redis) -> tuple[float, OverBudget]:
        seen_by = RequestLimiter(first, wait_seconds=5)
        other = RequestLimiter(second, wait_seconds=5)
        await seen_by.rate_limited("signals", "vehicle-1", "VEHICLE", 0.4)
        started = time.monotonic()
        waited_before = waits()
        await other.admit("vehicle-2")
        assert waits() == waited_before
        with pytest.raises(OverBudget) as refused:
            await RequestLimiter(second, wait_seconds=0.01).admit("vehicle-1")
        await other.admit("vehicle-1")
        return time.monotonic() - started, refused.value

    waited, refused = run(redis_url, scenario, clients=2)
    assert refused.cause == "vehicle"
    assert waited >= 0.3
    assert redis_client.exists(APPLICATION_PAUSE_KEY) == 0


def test_an_application_429_pauses_every_vehicle(redis_url):
    """RATE_LIMIT:SMARTCAR_API pauses calls for every vehicle (and for calls that name none)."""

    async def scenario(client: Redis) -> list[str]:
        limiter = RequestLimiter(client, wait_seconds=0.2)
        await limiter.rate_limited("vehicle", "vehicle-1", "SMARTCAR_API", 30)
        causes = []
        for vehicle in ("vehicle-1", "vehicle-2", None):
            with pytest.raises(OverBudget) as refused:
                await limiter.admit(vehicle)
            causes.append(refused.value.cause)
        return causes

    assert run(redis_url, scenario) == ["application"] * 3


def test_a_429_without_retry_after_pauses_2_s_then_doubles(redis_url, redis_client):
    """No Retry-After: 2 s, then 4 s for the next 429 while the first is remembered; a Retry-After
    never shortens a pause already held."""

    async def scenario(client: Redis) -> None:
        limiter = RequestLimiter(client)
        await limiter.rate_limited("signals", "vehicle-1", "VEHICLE", None)
        assert 1900 <= pause_left(redis_client, vehicle_pause_key("vehicle-1")) <= 2000
        await limiter.rate_limited("signals", "vehicle-1", "VEHICLE", None)
        assert 3900 <= pause_left(redis_client, vehicle_pause_key("vehicle-1")) <= 4000
        await limiter.rate_limited("signals", "vehicle-1", "VEHICLE", 1)
        assert pause_left(redis_client, vehicle_pause_key("vehicle-1")) > 3000

    run(redis_url, scenario)


def pause_left(client: redis.Redis, key: str) -> int:
    seconds, micros = client.time()
    return int(client.hget(key, "until") or 0) - (int(seconds) * 1000 + int(micros) // 1000)


# Shared reads


def test_two_processes_reading_one_vehicle_at_once_make_one_call(redis_url):
    """Ten events in each of two processes, all received before the read: one call; the caller's
    event says fetched, the others shared (every one of them, in both processes, waited for it)."""

    async def scenario(first: Redis, second: Redis) -> tuple[int, list[str]]:
        upstream = Upstream(held=True)
        caches = [ReadCache(c, lease_seconds=10) for c in (first, second)]
        received = now_ms() - 1000
        reads = [asyncio.ensure_future(caches[i % 2].read(KEY, received, WINDOW_MS, upstream.fetch)) for i in range(20)]
        await claimed(redis_client_for(first))
        assert upstream.release is not None
        upstream.release.set()
        results = await asyncio.gather(*reads)
        assert all(r.data == {"call": 1} for r in results)
        return upstream.calls, sorted(r.source for r in results)

    calls, sources = run(redis_url, scenario, clients=2)
    assert calls == 1
    assert sources == ["fetched"] + ["shared"] * 19


def test_a_read_serves_events_received_within_the_window_after_it_started(redis_url):
    """A read started at s serves an event received at r when s > r - window: a later event within
    the window gets it from the cache; one received a window or more after s reads again."""
    upstream = Upstream()

    async def scenario(client: Redis) -> list[tuple[str, Any]]:
        cache = ReadCache(client, lease_seconds=10)
        base = now_ms()
        first = await cache.read(KEY, base, 10_000, upstream.fetch)
        within = await cache.read(KEY, base + 9_000, 10_000, upstream.fetch)
        beyond = await cache.read(KEY, base + 60_000, 10_000, upstream.fetch)
        earlier = await cache.read(KEY, base, 10_000, upstream.fetch)
        return [(r.source, r.data) for r in (first, within, beyond, earlier)]

    assert run(redis_url, scenario) == [
        ("fetched", {"call": 1}),
        ("cached", {"call": 1}),
        ("fetched", {"call": 2}),
        ("cached", {"call": 2}),  # received before the read started: its data cannot be older
    ]


@pytest.mark.parametrize("fetched_at", [b"inf", b"nan", b"1e999", b"not a time"])
def test_a_cached_read_whose_fetch_time_is_not_a_number_serves_without_one(redis_url, redis_client, fetched_at):
    """A read hash whose ``fetchedAt`` holds what the service never writes (inf, nan, text) still
    serves its data, with no fetch time: never an error that would fail every event of the vehicle
    until the hash expires."""
    upstream = Upstream()

    async def scenario(client: Redis) -> list[tuple[str, Any, int | None]]:
        cache = ReadCache(client, lease_seconds=10)
        base = now_ms()
        await cache.read(KEY, base, 60_000, upstream.fetch)
        redis_client.hset(KEY, "fetchedAt", fetched_at)
        cached = await cache.read(KEY, base, 60_000, upstream.fetch)
        latest = await cache.latest(KEY)
        return [(cached.source, cached.data, cached.fetched_at), ("latest", latest.data, latest.fetched_at)]

    assert run(redis_url, scenario) == [("cached", {"call": 1}, None), ("latest", {"call": 1}, None)]


def test_a_read_hash_keeps_its_answer_compressed_and_each_way_of_serving_it_gives_it_whole(redis_url, redis_client):
    """The hash's answer is LZ4-compressed (a quarter of the signals' bytes in Redis, on the wire to each
    event it serves, and through the complete function's Lua): the plain look, the acquire function
    (a generation written ``" 0"``, which only Lua takes for 0), a read shared from another process and
    a skipped read all give the answer exactly, numbers, unicode and all."""
    answer = {"signals": [{"code": f"signal-{n}", "body": {"value": n / 7, "unit": "km"}} for n in range(100)]}
    answer["note"] = "Zürich, 4 °C"

    async def scenario(first: Redis, second: Redis) -> list[Any]:
        caches = [ReadCache(c, lease_seconds=10) for c in (first, second)]
        held = Upstream(held=True, answer=answer)
        received = now_ms() - 1000
        made = asyncio.ensure_future(caches[0].read(KEY, received, WINDOW_MS, held.fetch))
        await claimed(redis_client)
        shared = asyncio.ensure_future(caches[1].read(KEY, received, WINDOW_MS, held.fetch))
        await claimed(redis_client)  # the claim is still there: time for the second process to see it
        assert held.release is not None
        held.release.set()
        outcomes = [await made, await shared, await caches[1].read(KEY, received, WINDOW_MS, held.fetch)]
        redis_client.hset(KEY, "dataGen", " 0")
        functions = command_calls(redis_client, "fcall")
        outcomes.append(await caches[1].read(KEY, received, WINDOW_MS, held.fetch))
        assert command_calls(redis_client, "fcall") > functions  # served through the acquire function
        outcomes.append(await caches[0].latest(KEY))
        return [(r.source, r.data == answer) for r in outcomes] + [held.calls]

    assert run(redis_url, scenario, clients=2) == [
        ("fetched", True),
        ("shared", True),
        ("cached", True),
        ("cached", True),
        ("skipped", True),
        1,
    ]
    stored = redis_client.hget(KEY, "data")
    assert stored.startswith(LZ4_MARK)
    assert len(stored) < len(pydantic_core.to_json(answer)) / 2
    assert not KEY.startswith("smartcar-ingest:read:")  # where earlier releases kept plain answers


@pytest.mark.parametrize("gen", [None, b" 0", b"abc"], ids=["gen-as-written", "gen-spaced", "gen-text"])
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda: None, id="no-data"),
        pytest.param(lambda: b'{"call":"plain"}', id="plain-json"),
        pytest.param(lambda: b"garbage", id="garbage"),
        pytest.param(lambda: LZ4_MARK + b"\x05\x00\x00\x00" + b"\xff" * 12, id="not-lz4"),
        pytest.param(lambda: LZ4_MARK + lz4.block.compress(b"not json"), id="compressed-not-json"),
        pytest.param(lambda: LZ4_MARK + _bomb(), id="bomb"),
    ],
)
def test_a_read_hash_answer_that_is_not_what_the_service_writes_is_read_again(redis_url, redis_client, data, gen):
    """Redis contents are input too: a hash whose answer is anything else (or none) serves no event and
    fails none (for a vehicle's read that would be every event for a day), whatever its generation
    holds. The event reads afresh, under a new generation, and that read replaces it; a skipped read
    meanwhile publishes none, and a block claiming more than an answer may hold is refused before
    anything is allocated for it."""
    upstream = Upstream()
    stored = data()

    async def scenario(client: Redis) -> list[Any]:
        cache = ReadCache(client, lease_seconds=10)
        received = now_ms() - 1000
        await cache.read(KEY, received, WINDOW_MS, upstream.fetch)
        if stored is None:
            redis_client.hdel(KEY, "data")
        else:
            redis_client.hset(KEY, "data", stored)
        if gen is not None:
            redis_client.hset(KEY, mapping={"gen": gen, "dataGen": gen})
        skipped, peak = await latest_with_peak(cache)
        again = await cache.read(KEY, received, WINDOW_MS, upstream.fetch)
        served = await cache.read(KEY, received, WINDOW_MS, upstream.fetch)
        return [(r.source, r.data) for r in (skipped, again, served)] + [peak < 4 * len(stored or b"") + 1_000_000]

    assert run(redis_url, scenario) == [("skipped", None), ("fetched", {"call": 2}), ("cached", {"call": 2}), True]
    assert redis_client.hget(KEY, "gen") == b"1"


def test_an_unusable_answer_starts_one_new_generation_however_many_events_found_it(redis_url, redis_client):
    """Events in several processes may find the same unusable answer at once: the first to replace its
    generation does, and the others leave the new one alone (else each would void the read another
    event claimed meanwhile, and each would cost a Smartcar call)."""
    upstream = Upstream()

    async def scenario(client: Redis) -> list[Any]:
        cache = ReadCache(client, lease_seconds=10)
        received = now_ms() - 1000
        await cache.read(KEY, received, WINDOW_MS, upstream.fetch)
        redis_client.hset(KEY, "data", b"garbage")
        seen = redis_client.hget(KEY, "startedAt").decode()
        keep = WINDOW_MS + reads.GRACE_MS
        found = [await cache._invalidate(keys=[KEY], args=[keep, seen]) for _ in range(2)]
        after_first = redis_client.hget(KEY, "gen")
        again = await cache.read(KEY, received, WINDOW_MS, upstream.fetch)
        late = await cache._invalidate(keys=[KEY], args=[keep, seen])  # one more that found the old answer
        served = await cache.read(KEY, received, WINDOW_MS, upstream.fetch)
        return [found, after_first, again.source, late, served.source, served.data]

    assert run(redis_url, scenario) == [[1, None], b"1", "fetched", None, "cached", {"call": 2}]
    assert upstream.calls == 2


def test_a_vehicle_error_starts_a_new_generation_whatever_the_hash_holds_as_one(redis_url, redis_client):
    """A generation that is not a whole number (never written so) counts as 0: the invalidation after a
    VEHICLE_ERROR writes 1, never an error that would fail the event."""

    async def scenario(client: Redis) -> None:
        cache = ReadCache(client, lease_seconds=10)
        await cache.read(KEY, now_ms() - 1000, WINDOW_MS, Upstream().fetch)
        redis_client.hset(KEY, "gen", b"not a number")
        await cache.invalidate(KEY, WINDOW_MS)

    run(redis_url, scenario)
    assert redis_client.hget(KEY, "gen") == b"1"


def test_a_skipped_read_publishes_the_other_read_when_the_last_to_answer_is_unusable(redis_url, redis_client):
    """The hash's read answered last but holds what the service never writes: a skipped read publishes
    the window-0 read kept before it, not none."""

    async def scenario(client: Redis) -> Any:
        cache = ReadCache(client, lease_seconds=10)
        await cache.read(KEY, now_ms(), 0, lambda: asyncio.sleep(0, {"kept": "older"}))
        await asyncio.sleep(0.01)
        await cache.read(KEY, now_ms(), WINDOW_MS, lambda: asyncio.sleep(0, "hash"))
        redis_client.hset(KEY, "data", b"garbage")
        return (await cache.latest(KEY)).data

    assert run(redis_url, scenario) == {"kept": "older"}


def test_a_read_that_serves_an_event_is_read_plainly_and_runs_no_script(redis_url, redis_client):
    """Most reads of a fleet that keeps reporting are served by the hash's read: one plain HMGET, no
    function (Lua would hash each byte of the answer) and nothing written."""
    upstream = Upstream()

    async def scenario(client: Redis) -> tuple[str, Any, bool]:
        cache = ReadCache(client, lease_seconds=10)
        first = await cache.read(KEY, now_ms(), WINDOW_MS, upstream.fetch)
        redis_client.config_resetstat()
        served = await cache.read(KEY, now_ms(), WINDOW_MS, upstream.fetch)
        return served.source, served.data, served.fetched_at == first.fetched_at

    assert run(redis_url, scenario) == ("cached", {"call": 1}, True)
    assert sorted(redis_client.info("commandstats")) == ["cmdstat_config|resetstat", "cmdstat_hmget"]
    assert command_calls(redis_client, "hmget") == 1


def test_a_read_that_started_exactly_a_window_before_the_event_does_not_serve_it(redis_url, redis_client):
    """The window is open at its start: a read started at s serves an event received at r only when
    s > r - window, by the plain read as by the acquire function."""
    upstream = Upstream()

    async def scenario(client: Redis) -> list[str]:
        cache = ReadCache(client, lease_seconds=10)
        await cache.read(KEY, now_ms(), WINDOW_MS, upstream.fetch)
        started = int(redis_client.hget(KEY, "startedAt") or 0)
        inside = await cache.read(KEY, started + WINDOW_MS - 1, WINDOW_MS, upstream.fetch)
        edge = await cache.read(KEY, started + WINDOW_MS, WINDOW_MS, upstream.fetch)
        return [inside.source, edge.source]

    assert run(redis_url, scenario) == ["cached", "fetched"]


@pytest.mark.parametrize(
    ("field", "value", "source"),
    [
        ("startedAt", b"9_999_999_999_999", "fetched"),  # a number to Python's int(), not to Lua
        ("startedAt", "\u0661\u0662".encode() * 7, "fetched"),  # digits to Python, not ASCII
        ("startedAt", b"9" * 5000, "cached"),  # past the digits int() converts; infinity to Lua
        ("startedAt", b"nan", "fetched"),
        ("startedAt", b"1e999", "cached"),  # infinity to Lua: served, by the acquire function
        ("dataGen", b"0.5", "fetched"),  # generation 0 to int(float()), not to Lua
    ],
)
def test_a_read_hash_holding_what_the_service_never_writes_is_left_to_the_acquire_function(
    redis_url, redis_client, field, value, source
):
    """Redis contents are input too: a read is served without the acquire function only when its hash
    holds a start and generations as the service writes them; anything else goes to the function, whose
    decision stands, so both ways of serving a read agree."""
    upstream = Upstream()

    async def scenario(client: Redis) -> str:
        cache = ReadCache(client, lease_seconds=10)
        await cache.read(KEY, now_ms(), WINDOW_MS, upstream.fetch)
        redis_client.hset(KEY, field, value)
        redis_client.config_resetstat()
        return (await cache.read(KEY, now_ms(), WINDOW_MS, upstream.fetch)).source

    assert run(redis_url, scenario) == source
    assert command_calls(redis_client, "fcall") >= 1


def test_an_event_never_joins_a_read_that_started_a_window_before_it(redis_url):
    """A read in flight that started more than a window before an event arrived is not joined."""
    upstream = Upstream(delay=0.3)

    async def scenario(client: Redis) -> list[str]:
        cache = ReadCache(client, lease_seconds=10)
        slow = asyncio.ensure_future(cache.read(KEY, now_ms(), 100, upstream.fetch))
        await asyncio.sleep(0.15)
        late = await cache.read(KEY, now_ms(), 100, upstream.fetch)
        return [(await slow).source, late.source]

    assert run(redis_url, scenario) == ["fetched", "fetched"]
    assert upstream.calls == 2


def test_invalidation_makes_the_next_event_read_again(redis_url):
    """After invalidate (a VEHICLE_ERROR), no read made before serves any event, even one
    received earlier; the read that follows serves events again."""
    upstream = Upstream()

    async def scenario(client: Redis) -> list[str]:
        cache = ReadCache(client, lease_seconds=10)
        received = now_ms()
        sources = [(await cache.read(KEY, received, WINDOW_MS, upstream.fetch)).source]
        await cache.invalidate(KEY, WINDOW_MS)
        sources.append((await cache.read(KEY, received, WINDOW_MS, upstream.fetch)).source)
        sources.append((await cache.read(KEY, now_ms(), WINDOW_MS, upstream.fetch)).source)
        return sources

    assert run(redis_url, scenario) == ["fetched", "fetched", "cached"]


def test_a_refusal_is_shared_with_the_events_waiting_on_the_read(redis_url):
    """The read is refused (404): its caller gets the error, the events waiting in the other
    process get the same refusal as a value, and nobody calls again."""

    async def scenario(first: Redis, second: Redis) -> tuple[int, list[Any]]:
        refusal = SmartcarRejected("refused", 404, "RESOURCE_NOT_FOUND", "VEHICLE_NOT_FOUND")
        upstream = Upstream(error=refusal, held=True)
        mine, theirs = ReadCache(first, lease_seconds=10), ReadCache(second, lease_seconds=10)
        received = now_ms() - 1000
        caller = asyncio.ensure_future(mine.read(KEY, received, WINDOW_MS, upstream.fetch))
        await claimed(redis_client_for(first))
        waiting = [asyncio.ensure_future(theirs.read(KEY, received, WINDOW_MS, upstream.fetch)) for _ in range(3)]
        await asyncio.sleep(0.5)
        assert upstream.release is not None
        upstream.release.set()
        with pytest.raises(SmartcarRejected):
            await caller
        outcomes = [await w for w in waiting]
        return upstream.calls, [(w.source, type(w.error).__name__, getattr(w.error, "status", None)) for w in outcomes]

    calls, outcomes = run(redis_url, scenario, clients=2)
    assert calls == 1
    assert outcomes == [("shared", "SmartcarRejected", 404)] * 3


def test_a_read_whose_worker_died_is_claimed_again_after_its_lease(redis_url, redis_client):
    """A claim left by a process that died (never completed) holds the others for its lease only;
    then one of them claims the read and calls."""
    upstream = Upstream()

    async def scenario(first: Redis, second: Redis) -> str:
        dead = ReadCache(first, lease_seconds=0.5)
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        abandoned = asyncio.ensure_future(dead.read(KEY, now_ms(), WINDOW_MS, lambda: never))
        await asyncio.sleep(0.1)
        assert redis_client.hget(KEY, "claim") is not None
        alive = ReadCache(second, lease_seconds=10)
        got = await alive.read(KEY, now_ms() - 1000, WINDOW_MS, upstream.fetch)
        abandoned.cancel()
        never.cancel()
        return got.source

    assert run(redis_url, scenario, clients=2) == "fetched"
    assert upstream.calls == 1


def test_a_cancelled_read_releases_its_claim_at_once(redis_url, redis_client):
    """A read cancelled in flight (its worker stopping) gives its claim back, without recording a
    failure: another process claims the read at once instead of polling out a 55 s lease."""
    upstream = Upstream()

    async def scenario(first: Redis, second: Redis) -> tuple[str, bool]:
        stopping = ReadCache(first, lease_seconds=55)
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        caller = asyncio.ensure_future(stopping.read(KEY, now_ms(), WINDOW_MS, lambda: never))
        await asyncio.sleep(0.1)
        assert redis_client.hget(KEY, "claim") is not None
        [in_flight] = stopping._local.values()
        in_flight.cancel()  # what the loop's shutdown does to the read's own task
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        alive = ReadCache(second, lease_seconds=10)
        got = await asyncio.wait_for(alive.read(KEY, now_ms() - 1000, WINDOW_MS, upstream.fetch), timeout=20)
        return got.source, redis_client.hget(KEY, "error") is None

    assert run(redis_url, scenario, clients=2) == ("fetched", True)
    assert upstream.calls == 1


def test_a_transient_failure_fails_the_waiters_and_is_not_kept(redis_url):
    """A 5xx after retries: the waiting events get it (their jobs retry); the next event calls again."""

    async def scenario(first: Redis, second: Redis) -> tuple[int, str]:
        upstream = Upstream(error=SmartcarUnavailable("down"), held=True)
        mine, theirs = ReadCache(first, lease_seconds=10), ReadCache(second, lease_seconds=10)
        received = now_ms() - 1000
        caller = asyncio.ensure_future(mine.read(KEY, received, WINDOW_MS, upstream.fetch))
        await claimed(redis_client_for(first))
        waiter = asyncio.ensure_future(theirs.read(KEY, received, WINDOW_MS, upstream.fetch))
        await asyncio.sleep(0.5)
        assert upstream.release is not None
        upstream.release.set()
        with pytest.raises(SmartcarUnavailable):
            await caller
        with pytest.raises(SmartcarUnavailable):
            await waiter
        upstream.error = None
        again = await theirs.read(KEY, now_ms(), WINDOW_MS, upstream.fetch)
        return upstream.calls, again.source

    assert run(redis_url, scenario, clients=2) == (2, "fetched")


def test_a_read_key_names_no_user_id_and_expires(redis_url, redis_client):
    """The key carries a digest of the user id, never the id itself, and the hash expires a while
    after its window."""
    key = read_key("vehicle", "vehicle-1", "9e8d7c6b-2222-4222-8222-222222222222")
    assert "9e8d7c6b" not in key

    async def scenario(client: Redis) -> None:
        await ReadCache(client, lease_seconds=10).read(key, now_ms(), 1000, Upstream().fetch)

    run(redis_url, scenario)
    assert 0 < redis_client.pttl(key) <= 1000 + 600_000


def test_a_read_hash_is_renewed_once_a_read_and_again_only_if_its_claim_went(redis_url, redis_client):
    """The claim renews the hash for the read's window and grace from its start, which is what its
    answer needs, so completing it renews nothing more; but a read whose claim has gone meanwhile
    (here: the hash expired and is written again by the completion) renews the hash it writes, which
    is never left without a TTL."""
    upstream = Upstream(held=True)

    async def scenario(client: Redis) -> tuple[int, int]:
        cache = ReadCache(client, lease_seconds=10)
        redis_client.config_resetstat()
        held = asyncio.ensure_future(cache.read(KEY, now_ms(), WINDOW_MS, upstream.fetch))
        await claimed(redis_client)
        assert upstream.release is not None
        upstream.release.set()
        await held
        renewals = command_calls(redis_client, "pexpire")
        upstream.release.clear()
        late = asyncio.ensure_future(cache.read(KEY, now_ms() + WINDOW_MS, WINDOW_MS, upstream.fetch))
        await claimed(redis_client)
        redis_client.delete(KEY)  # expired while the read was in flight
        upstream.release.set()
        await late
        return renewals, redis_client.pttl(KEY)

    renewals, ttl = run(redis_url, scenario)
    assert renewals == 1
    assert 0 < ttl <= WINDOW_MS + 600_000


def test_a_read_on_every_event_is_kept_plainly_for_a_skipped_read_and_serves_no_cached_one(redis_url, redis_client):
    """With a window of 0 a read serves no other event: its answer is kept in a key of its own by one
    plain SET, no script (Lua would hash every byte of it), answered at a time by Redis's clock, for
    what a later skipped read publishes; a read with a window (another worker's settings) does not
    take it for a cached one."""
    redis_client.config_resetstat()
    upstream = Upstream()

    async def scenario(client: Redis) -> list[Any]:
        cache = ReadCache(client, lease_seconds=10)
        started = time.monotonic()
        before = redis_ms(redis_client)
        got = await cache.read(KEY, now_ms(), 0, upstream.fetch)
        after, elapsed_ms = redis_ms(redis_client), (time.monotonic() - started) * 1000
        # Redis's clock as the worker carries it: within half the round trip of its reading, which
        # this read took (tests/test_redis_clock.py holds the clock to the same bound).
        assert before - elapsed_ms - 1 <= (got.fetched_at or 0) <= after + 1
        scripts = [name for name in redis_client.info("commandstats") if name.startswith("cmdstat_fcall")]
        latest = await cache.latest(KEY)
        windowed = await cache.read(KEY, now_ms() - 1000, WINDOW_MS, upstream.fetch)
        return [scripts, got.source, (latest.data, latest.fetched_at == got.fetched_at), windowed.source]

    assert run(redis_url, scenario) == [[], "fetched", ({"call": 1}, True), "fetched"]
    assert upstream.calls == 2
    assert 0 < redis_client.pttl(latest_read_key(KEY)) <= 600_000


def test_a_read_on_every_event_is_dated_by_redis_s_clock_not_the_worker_s(redis_url):
    """Against a Redis whose clock is a day ahead of this machine's, the read's ``fetchedAt`` is too."""

    async def scenario() -> int:
        client = shifted(redis_url, [1])
        try:
            got = await ReadCache(client, lease_seconds=10).read(KEY, now_ms(), 0, Upstream().fetch)
            return (got.fetched_at or 0) - now_ms()
        finally:
            await client.aclose()

    assert DAY_MS - 1000 < asyncio.run(scenario()) < DAY_MS + 1000


def test_a_skipped_read_publishes_whichever_read_answered_last(redis_url):
    """The hash's read (a window) and the one a window-0 read kept (settings changed between workers):
    a skipped read publishes the one that answered last."""

    async def scenario(client: Redis) -> list[Any]:
        cache = ReadCache(client, lease_seconds=10)
        await cache.read(KEY, now_ms(), 0, lambda: asyncio.sleep(0, "kept, window 0"))
        first = (await cache.latest(KEY)).data
        await asyncio.sleep(0.01)
        await cache.read(KEY, now_ms(), WINDOW_MS, lambda: asyncio.sleep(0, "hash, window"))
        second = (await cache.latest(KEY)).data
        await asyncio.sleep(0.01)
        await cache.read(KEY, now_ms(), 0, lambda: asyncio.sleep(0, "kept again"))
        return [first, second, (await cache.latest(KEY)).data]

    assert run(redis_url, scenario) == ["kept, window 0", "hash, window", "kept again"]


def _bomb() -> bytes:
    """Valid JSON one byte larger than a kept read may be, compressed (260 KB)."""
    return lz4.block.compress(b'"' + b"a" * (MAX_KEPT_BYTES - 1) + b'"')


def _compressed(block: Callable[[], bytes]) -> Callable[[], bytes]:
    """A kept read as the service writes one, answered after the hash's read, holding ``block``."""
    return lambda: b"%d:%s%s" % (now_ms() + 60_000, LZ4_MARK, block())


@pytest.mark.parametrize(
    "kept",
    [
        pytest.param(lambda: b"garbage", id="garbage"),
        pytest.param(lambda: b"%d:%s" % (now_ms() + 60_000, b'{"kept":"plain"}'), id="plain-json"),
        pytest.param(lambda: b"9999999999999:{not json", id="not-json"),
        pytest.param(lambda: b"nan:null", id="nan-time"),
        pytest.param(lambda: b":null", id="no-time"),
        pytest.param(_compressed(lambda: b""), id="mark-alone"),
        pytest.param(_compressed(lambda: b"\x10\x00"), id="short-size"),
        pytest.param(_compressed(lambda: lz4.block.compress(b'"x"')[:-1]), id="truncated"),
        pytest.param(_compressed(lambda: b"\x05\x00\x00\x00" + b"\xff" * 12), id="not-lz4"),
        pytest.param(_compressed(lambda: lz4.block.compress(b"not json")), id="compressed-not-json"),
        pytest.param(_compressed(_bomb), id="bomb"),
    ],
)
def test_a_kept_read_that_is_not_what_the_service_writes_is_ignored(redis_url, redis_client, kept):
    """Redis contents are input too: a window-0 read's key holding anything else leaves the hash's
    read (or none) to publish, never an error that fails the event. A compressed block claiming more
    than a kept read may hold (here 64 MB from 260 KB) is refused before anything is allocated for it."""
    stored = kept()

    async def scenario(client: Redis) -> tuple[Any, int]:
        cache = ReadCache(client, lease_seconds=10)
        await cache.read(KEY, now_ms(), WINDOW_MS, lambda: asyncio.sleep(0, "hash"))
        redis_client.set(latest_read_key(KEY), stored)
        latest, peak = await latest_with_peak(cache)
        return latest.data, peak

    data, peak = run(redis_url, scenario)
    assert data == "hash"
    assert peak < 4 * len(stored) + 1_000_000, f"{peak} bytes held to refuse {len(stored)} stored"


def test_a_kept_read_inflates_to_at_most_the_limit(monkeypatch):
    """The stored form round-trips; plain JSON is refused (no release writes it under these keys); a
    block of exactly the limit inflates, one byte more is refused unread."""
    document = b'{"signals":[' + b",".join(b'{"code":"c%d","value":%d}' % (n, n) for n in range(50)) + b"]}"
    assert reads._inflate(reads._deflate(document)) == document
    with pytest.raises(ValueError, match="not a stored answer"):
        reads._inflate(document)
    monkeypatch.setattr(reads, "MAX_KEPT_BYTES", 1000)
    assert reads._inflate(reads._deflate(b"a" * 1000)) == b"a" * 1000
    with pytest.raises(ValueError, match="not a stored answer"):
        reads._inflate(reads._deflate(b"a" * 1001))


def test_a_kept_read_is_stored_compressed_and_read_back_whole(redis_url, redis_client):
    """A window-0 read is kept LZ4-compressed (the signals of the fleet mix shrink to about a quarter):
    what a skipped read publishes is the answer exactly, numbers, unicode and all."""
    answer = {"signals": [{"code": f"signal-{n}", "body": {"value": n / 7, "unit": "km"}} for n in range(100)]}
    answer["note"] = "Zürich, 4 °C"

    async def scenario(client: Redis) -> Any:
        cache = ReadCache(client, lease_seconds=10)
        await cache.read(KEY, now_ms(), 0, lambda: asyncio.sleep(0, answer))
        return (await cache.latest(KEY)).data

    assert run(redis_url, scenario) == answer
    at, _, stored = redis_client.get(latest_read_key(KEY)).partition(b":")
    assert int(at) > 0
    assert stored.startswith(LZ4_MARK)
    assert len(stored) < len(pydantic_core.to_json(answer)) / 2
    assert not latest_read_key(KEY).startswith("smartcar-ingest:read:")


def test_of_reads_on_every_event_the_last_to_answer_is_what_a_skipped_read_publishes(redis_url):
    """Two reads of one vehicle overlap (window 0) and the one that started first answers last: its
    data is the vehicle's last read, with its own answer time."""

    async def scenario(client: Redis) -> tuple[Any, bool]:
        cache = ReadCache(client, lease_seconds=10)
        slow = asyncio.ensure_future(cache.read(KEY, now_ms(), 0, Upstream(delay=0.3).fetch))
        await asyncio.sleep(0.05)
        await cache.read(KEY, now_ms(), 0, lambda: asyncio.sleep(0, {"call": "started later"}))
        answered_last = await slow
        latest = await cache.latest(KEY)
        return latest.data, latest.fetched_at == answered_last.fetched_at

    assert run(redis_url, scenario) == ({"call": 1}, True)


# Usage


def count_an_event(sources: dict[str, str]) -> None:
    """Move this process's counters as one published event does whose reads came from ``sources``,
    with a vehicle and a signals request, a 429 and a 0.25 s wait for the budget."""
    metrics.JOBS.labels(outcome="published").inc()
    for endpoint in ("vehicle", "signals"):
        metrics.SMARTCAR_CALLS.labels(endpoint=endpoint, status="200").inc()
    for call, source in sources.items():
        metrics.ENRICHMENT_READS.labels(call=call, source=source).inc()
    metrics.RATE_LIMITED.labels(scope="vehicle").inc()
    metrics.LIMITER_WAIT_SECONDS.labels(cause="budget").observe(0.25)


def test_usage_adds_every_process_counts_per_minute_for_status(redis_url, redis_client):
    """Two processes' counters add up in the minute's hash, each counting from its start; read_usage
    sums the last hour."""
    count_an_event({"vehicle": "shared"})  # before either started: neither writes it

    async def scenario(first: Redis, second: Redis) -> None:
        for client, sources in ((first, {"vehicle": "fetched", "signals": "fetched"}), (second, {"vehicle": "cached"})):
            counts = DeploymentCounts(client)
            before = read_usage(redis_client)["events"]
            count_an_event(sources)
            assert read_usage(redis_client)["events"] == before  # held in the process until written
            await counts.aclose()

    run(redis_url, scenario, clients=2)
    assert read_usage(redis_client) == {
        "minutes": 60,
        "events": 2,
        "calls": {"signals": 2, "vehicle": 2},
        "callsPerEvent": 2.0,
        "reads": {"signals": {"fetched": 1}, "vehicle": {"cached": 1, "fetched": 1}},
        "rateLimited": {"vehicle": 2},
        "waitedSeconds": 0.5,
    }
    assert read_usage(redis_client, now=time.time() + 2 * 3600)["events"] == 0


def test_usage_counts_a_wait_in_whole_milliseconds_whatever_was_waited_before(redis_url, redis_client):
    """A 250 ms wait adds 250 to ``waitMs`` even when the process's running sum of waits, in
    milliseconds, lands a hair under a whole number (0.092 s + 0.25 s is 341.99999… ms)."""

    budget = metrics.LIMITER_WAIT_SECONDS.labels(cause="budget")
    budget.observe(0.0)  # the series exists, so the sums below see it

    # Earlier waits of this process (any floats) decide the sum, as usage_totals adds it over the causes:
    # find a step that brings it next to a whole millisecond from which the next 250 ms truncate wrong.
    values = metrics.totals(metrics.LIMITER_WAIT_SECONDS, "_sum")
    before = sum(values.values())

    def total(budget_sum: float) -> float:
        return sum(budget_sum if labels == ("budget",) else value for labels, value in values.items())

    def truncates_wrong(step: float) -> bool:
        after = values["budget",] + step
        return int(total(after + 0.25) * 1000) - int(total(after) * 1000) != 250

    first = int(before * 1000) + 1
    steps = (ms / 1000 - before for ms in range(first, first + 100_000))
    step = next((step for step in steps if truncates_wrong(step)), None)
    assert step is not None, "no whole millisecond near here truncates a 250 ms wait: the premise is gone"
    budget.observe(step)

    async def scenario(client: Redis) -> None:
        counts = DeploymentCounts(client)
        metrics.LIMITER_WAIT_SECONDS.labels(cause="budget").observe(0.25)
        await counts.write()

    run(redis_url, scenario)
    assert read_usage(redis_client)["waitedSeconds"] == 0.25


def test_usage_a_write_refused_is_written_by_the_next(redis_url, redis_client, monkeypatch):
    """Writes Redis refuses are logged once, and what they carried goes with the next write, once."""
    warnings: list[str] = []
    monkeypatch.setattr(deployment_counts.log, "warning", lambda event, **_: warnings.append(event))
    redis_client.execute_command("ACL", "SETUSER", "counter", "on", ">counter-pass-1", "~*", "+@all", "-hincrby")
    url = redis_url.replace("redis://", "redis://counter:counter-pass-1@")

    async def scenario(client: Redis) -> None:
        counts = DeploymentCounts(client)
        count_an_event({"vehicle": "fetched"})
        await counts.write()
        await counts.write()
        assert read_usage(redis_client)["events"] == 0
        assert len(warnings) == 1
        redis_client.execute_command("ACL", "SETUSER", "counter", "+hincrby")
        await counts.write()
        await counts.write()

    try:
        run(url, scenario)
    finally:
        redis_client.execute_command("ACL", "DELUSER", "counter")
    assert read_usage(redis_client)["events"] == 1
    assert read_usage(redis_client)["calls"] == {"signals": 1, "vehicle": 1}
    assert len(warnings) == 1
