"""Shared in-flight reads never hand an event data older than the event."""

from __future__ import annotations

import asyncio
import time

from core.smartcar.sharing import SharedReads


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_events_received_before_a_call_started_share_it():
    """Ten events received before the call began get one call between them."""
    calls = 0

    async def fetch():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return calls

    async def scenario():
        shared = SharedReads()
        received = now_ms() - 1000
        first = asyncio.ensure_future(shared.read("v", received, fetch))
        await asyncio.sleep(0)
        results = await asyncio.gather(first, *(shared.read("v", received, fetch) for _ in range(9)))
        return results, shared.shared

    results, shared = asyncio.run(scenario())
    assert results == [1] * 10
    assert calls == 1
    assert shared == 9


def test_event_received_after_a_call_started_makes_its_own_call():
    """An event newer than the running call does not join it."""
    calls = 0

    async def fetch():
        nonlocal calls
        calls += 1
        mine = calls
        await asyncio.sleep(0.05)
        return mine

    async def scenario():
        shared = SharedReads()
        first = asyncio.ensure_future(shared.read("v", now_ms() - 1000, fetch))
        await asyncio.sleep(0.01)
        second = await shared.read("v", now_ms() + 1, fetch)
        return await first, second

    assert asyncio.run(scenario()) == (1, 2)
    assert calls == 2


def test_failures_reach_every_sharer_and_are_not_cached():
    """A failed shared call fails all joiners; the next read calls again."""
    calls = 0

    async def fetch():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise RuntimeError("boom")
        return "ok"

    async def scenario():
        shared = SharedReads()
        received = now_ms() - 1000
        outcomes = await asyncio.gather(*(shared.read("v", received, fetch) for _ in range(3)), return_exceptions=True)
        again = await shared.read("v", received, fetch)
        return outcomes, again

    outcomes, again = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert again == "ok"
