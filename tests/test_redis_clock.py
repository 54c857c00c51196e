"""Redis's clock as one process sees it (core.redis.clock), against the real Redis.

``Shifted`` is the real client with its ``TIME`` answers moved a day on (as a Redis whose clock is
not this machine's), optionally held until the test lets them through."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from core.redis.clock import RedisClock
from tests.conftest import command_calls

DAY_MS = 86_400_000


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class Shifted(Redis):
    """Each ``TIME`` answer is Redis's own plus ``shifts[n]`` days (the last one repeating), and is
    held until ``release`` is set when ``held`` says so for that reading."""

    shifts: list[int]
    held: list[bool]
    release: asyncio.Event

    async def time(self) -> Any:  # type: ignore[override]
        n = getattr(self, "readings", 0)
        self.readings = n + 1
        seconds, micros = await super().time()
        if self.held[min(n, len(self.held) - 1)]:
            await self.release.wait()
        return seconds + self.shifts[min(n, len(self.shifts) - 1)] * 86_400, micros


def shifted(redis_url: str, shifts: list[int], held: list[bool] | None = None) -> Shifted:
    client = Shifted.from_url(redis_url)
    client.shifts, client.held, client.release = shifts, held or [False], asyncio.Event()
    return client


async def until(condition: Any) -> None:
    for _ in range(1000):  # up to 10 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition was not met in time")


def test_the_time_is_redis_s_within_the_round_trip_of_its_read(redis_url, redis_client):
    """Between two reads of Redis's clock, less at most the time it took to take them."""

    async def scenario() -> tuple[int, int, int, float]:
        client = Redis.from_url(redis_url)
        try:
            started = time.monotonic()
            before = redis_ms(redis_client)
            got = await RedisClock(client).now_ms()
            after = redis_ms(redis_client)
            return before, got, after, (time.monotonic() - started) * 1000
        finally:
            await client.aclose()

    before, got, after, elapsed_ms = asyncio.run(scenario())
    assert before - elapsed_ms - 1 <= got <= after + 1


def test_the_time_follows_redis_s_clock_not_this_machine_s(redis_url):
    """A Redis a day ahead of this machine: the clock says so, and keeps saying so as it runs on."""

    async def scenario() -> list[int]:
        client = shifted(redis_url, [1])
        try:
            clock = RedisClock(client)
            first = await clock.now_ms() - time.time_ns() // 1_000_000
            await asyncio.sleep(0.1)
            return [first, await clock.now_ms() - time.time_ns() // 1_000_000]
        finally:
            await client.aclose()

    for ahead in asyncio.run(scenario()):
        assert DAY_MS - 1000 < ahead < DAY_MS + 1000


def test_one_read_of_redis_s_clock_serves_every_caller_and_later_ones_are_taken_in_the_background(
    redis_url, redis_client
):
    """A hundred callers at once share one TIME; later calls carry it forward by the process's own
    clock; past the refresh a call starts the next reading without waiting for it."""
    redis_client.config_resetstat()

    async def scenario() -> tuple[int, int, int]:
        client = shifted(redis_url, [0, 0], held=[False, True])
        try:
            clock = RedisClock(client, refresh_seconds=0.3)
            first = await asyncio.gather(*(clock.now_ms() for _ in range(100)))
            shared = command_calls(redis_client, "time")
            await asyncio.sleep(0.4)
            # The second reading is held: the call answers from the first all the same.
            later = await asyncio.wait_for(clock.now_ms(), timeout=10)
            await until(lambda: command_calls(redis_client, "time") == 2)
            client.release.set()
            return shared, later - max(first), command_calls(redis_client, "time")
        finally:
            await client.aclose()

    shared, gap_ms, refreshed = asyncio.run(scenario())
    assert (shared, refreshed) == (1, 2)
    assert gap_ms >= 399  # the sleep's 400 ms, by the process's monotonic clock


def test_a_reading_slower_than_the_one_in_use_replaces_it_only_once_that_is_old(redis_url):
    """A TIME that waited (here: held 0.2 s, and a day off, to be seen) says less than a quicker
    one: it is not taken while the quicker one is recent, and one is once that is older than
    ``keep_best``."""

    def ahead(value: int) -> int:
        return value - time.time_ns() // 1_000_000

    async def scenario() -> list[int]:
        client = shifted(redis_url, [0, 1], held=[False, True])
        try:
            clock = RedisClock(client, refresh_seconds=0.1, keep_best_seconds=1.0)
            seen = [ahead(await clock.now_ms())]
            await asyncio.sleep(0.15)
            await clock.now_ms()  # starts the second reading, held
            await asyncio.sleep(0.2)
            client.release.set()
            await asyncio.sleep(0.05)  # the held reading comes back (nothing else is pending)
            seen.append(ahead(await clock.now_ms()))
            await asyncio.sleep(1.0)
            for _ in range(100):  # past keep_best, the next reading is taken whatever its round trip
                later = ahead(await clock.now_ms())
                if later > DAY_MS / 2:
                    break
                await asyncio.sleep(0.05)
            return [*seen, later]
        finally:
            await client.aclose()

    quick, slow_refused, later = asyncio.run(scenario())
    assert abs(quick) < 1000
    assert abs(slow_refused) < 1000
    assert DAY_MS - 1000 < later < DAY_MS + 1000


def test_a_failed_first_reading_is_raised_and_a_failed_later_one_keeps_the_time(redis_url):
    """Redis unreachable at the first call: the caller gets the error (its own retry policy waits
    it out) and the next call reads again. Unreachable later: the time carries on from the last
    reading, and the failure is nobody's to raise."""

    async def scenario() -> tuple[str, bool, bool]:
        unreachable = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
        clock = RedisClock(unreachable)
        with pytest.raises(redis.ConnectionError):
            await clock.now_ms()
        with pytest.raises(redis.ConnectionError):
            await clock.now_ms()
        working = Redis.from_url(redis_url)
        other = RedisClock(working, refresh_seconds=0.05)
        try:
            first = await other.now_ms()
            await working.connection_pool.disconnect()
            working.connection_pool.connection_kwargs["port"] = 1  # Redis gone from here on
            await asyncio.sleep(0.1)
            later = await other.now_ms()
            await asyncio.sleep(0.7)
            last = await other.now_ms()
            return "raised twice", later >= first, last >= later
        finally:
            await working.aclose()
            await unreachable.aclose()

    assert asyncio.run(scenario()) == ("raised twice", True, True)
