"""Redis's clock as one process sees it (core.redis.clock), against the real Redis."""

from __future__ import annotations

import asyncio
import time

import redis
from redis.asyncio import Redis

from core.redis.clock import RedisClock


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def time_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_time", {}).get("calls", 0))


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


def test_one_read_of_redis_s_clock_serves_every_caller_until_it_is_a_second_old(redis_url, redis_client):
    """A hundred callers at once share one TIME; later calls carry it forward by the process's own
    clock; past the refresh a call reads Redis's clock again."""
    redis_client.config_resetstat()

    async def scenario() -> tuple[int, int, int, int]:
        client = Redis.from_url(redis_url)
        try:
            clock = RedisClock(client, refresh_seconds=0.5)
            first = await asyncio.gather(*(clock.now_ms() for _ in range(100)))
            shared = time_calls(redis_client)
            await asyncio.sleep(0.2)
            later = await clock.now_ms()
            carried = time_calls(redis_client)
            await asyncio.sleep(0.4)
            await clock.now_ms()
            return shared, later - max(first), carried, time_calls(redis_client)
        finally:
            await client.aclose()

    shared, gap_ms, carried, refreshed = asyncio.run(scenario())
    assert (shared, carried, refreshed) == (1, 1, 2)
    assert gap_ms >= 199  # the sleep's 200 ms, by the process's monotonic clock


def test_a_failed_read_of_the_clock_is_raised_and_the_next_call_reads_again(redis_url):
    """Redis unreachable: the caller gets the error (its own retry policy waits it out), and the clock
    is not left holding a broken read."""

    async def scenario() -> tuple[str, bool]:
        broken = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
        clock = RedisClock(broken)
        try:
            await clock.now_ms()
        except redis.ConnectionError as exc:
            failure = type(exc).__name__
        else:
            failure = "none"
        working = Redis.from_url(redis_url)
        clock._redis = working
        try:
            return failure, await clock.now_ms() > 0
        finally:
            await working.aclose()
            await broken.aclose()

    assert asyncio.run(scenario()) == ("ConnectionError", True)
