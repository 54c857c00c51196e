"""Group commit (core.redis.group): concurrent callers share calls, each gets its own answer."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from core.redis.group import GroupCommit, GroupedCall, grouped_function
from tests.conftest import command_calls

# One key, two arguments: append ARGV[1] to the list at KEYS[1]; 'boom' raises, 'none' returns nothing.
_PUSH = grouped_function(
    "test_group_push",
    """
if ARGV[1] == 'boom' then return redis.call('INCR', 'test-group:not-a-number') end
if ARGV[1] == 'none' then return nil end
redis.call('RPUSH', KEYS[1], ARGV[1])
return {ARGV[1], ARGV[2]}
""",
    arity=2,
)


def test_concurrent_calls_share_one_function_call_and_each_gets_its_own_answer(redis_url, redis_client):
    """Forty callers at once: fewer calls than callers, answers in each caller's own shape, nothing
    for a script that returned nothing, and the one whose script raised gets its own error while
    the others of its call still ran, in order."""
    redis_client.set("test-group:not-a-number", "x")
    words = [f"w{i}" for i in range(40)]
    words[7], words[20] = "boom", "none"

    async def scenario() -> list[object]:
        client = AsyncRedis.from_url(redis_url)
        try:
            push = GroupedCall(_PUSH, client)
            await push(keys=["test-group:warm"], args=["warm", "up"])  # loaded before counting
            return await asyncio.gather(
                *(push(keys=["test-group:l"], args=[w, "x"]) for w in words), return_exceptions=True
            )
        finally:
            await client.aclose()

    before = command_calls(redis_client, "fcall")
    answers = asyncio.run(scenario())
    assert command_calls(redis_client, "fcall") - before - 1 < len(words) / 4
    assert isinstance(answers[7], ResponseError)
    assert answers[20] is None
    plain = [w for w in words if w not in ("boom", "none")]
    assert [a for i, a in enumerate(answers) if i not in (7, 20)] == [[w.encode(), b"x"] for w in plain]
    assert [v.decode() for v in redis_client.lrange("test-group:l", 0, -1)] == plain


def test_a_call_with_the_wrong_arguments_is_refused_before_it_is_sent(redis_url):
    async def scenario() -> None:
        client = AsyncRedis.from_url(redis_url)
        try:
            await GroupedCall(_PUSH, client)(keys=["k"], args=["only one"])
        finally:
            await client.aclose()

    with pytest.raises(ValueError, match="one key and 2 arguments"):
        asyncio.run(scenario())


def test_a_caller_cancelled_while_waiting_is_left_out_and_the_others_are_answered():
    sent: list[list[int]] = []

    async def call(items: list[int]) -> list[int]:
        sent.append(items)
        await asyncio.sleep(0.01)
        return [item * 10 for item in items]

    async def scenario() -> list[object]:
        group: GroupCommit[int, int] = GroupCommit(call, max_batch=8)
        first = asyncio.ensure_future(group.submit(1))  # makes the call itself
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(group.submit(n)) for n in (2, 3, 4)]
        await asyncio.sleep(0)
        waiting[1].cancel()
        return await asyncio.gather(first, *waiting, return_exceptions=True)

    answers = asyncio.run(scenario())
    assert answers[0] == 10
    assert answers[1] == 20
    assert isinstance(answers[2], asyncio.CancelledError)
    assert answers[3] == 40
    assert sent == [[1], [2, 4]]


def test_a_failed_call_reaches_each_of_its_callers_with_an_error_of_its_own():
    async def call(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        raise ConnectionError("down")

    async def scenario() -> list[BaseException]:
        group: GroupCommit[int, int] = GroupCommit(call, max_batch=8)
        return await asyncio.gather(*(group.submit(n) for n in range(5)), return_exceptions=True)

    errors = asyncio.run(scenario())
    assert all(isinstance(e, ConnectionError) for e in errors)
    assert len({id(e) for e in errors}) == 5
