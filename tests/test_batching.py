"""Concurrent commands of a worker share round trips (core.redis.clients), each with its own reply."""

from __future__ import annotations

import asyncio

import pytest
import redis

from core.redis.clients import BatchingRedis
from core.redis.functions import lua_function
from tests.procs import RedisServer


class CountingRedis(BatchingRedis):
    """Counts its round trips, what batching is checked by."""

    round_trips = 0

    async def _round_trip(self, batch):
        self.round_trips += 1
        return await super()._round_trip(batch)


def test_concurrent_commands_share_round_trips_and_each_gets_its_own_reply(redis_url):
    async def scenario() -> tuple[list[object], int]:
        client = CountingRedis.from_url(redis_url)
        try:
            await client.delete("batch:h", "batch:s")
            await client.hset("batch:h", mapping={"a": "1", "b": "2"})
            echo = lua_function("batch_echo", "return ARGV[1]").bind(client)
            await echo(args=["loaded"])
            calls = [
                client.hgetall("batch:h"),
                client.hmget("batch:h", ["a", "b", "c"]),
                client.incr("batch:n"),
                client.sadd("batch:s", "x"),
                client.smembers("batch:s"),
                echo(args=["echo"]),
            ]
            before = client.round_trips
            replies = await asyncio.gather(*calls)
            return replies, client.round_trips - before
        finally:
            await client.delete("batch:h", "batch:s", "batch:n")
            await client.aclose()

    replies, round_trips = asyncio.run(scenario())
    assert replies == [{b"a": b"1", b"b": b"2"}, [b"1", b"2", None], 1, 1, {b"x"}, b"echo"]
    assert round_trips == 1


def test_an_error_reply_fails_its_own_caller_only(redis_url):
    async def scenario() -> list[object]:
        client = BatchingRedis.from_url(redis_url)
        try:
            await client.set("batch:string", "x")
            return await asyncio.gather(
                client.get("batch:string"),
                client.hget("batch:string", "f"),
                client.echo("after"),
                return_exceptions=True,
            )
        finally:
            await client.delete("batch:string")
            await client.aclose()

    got, wrong_type, after = asyncio.run(scenario())
    assert got == b"x"
    assert isinstance(wrong_type, redis.exceptions.ResponseError)
    assert "WRONGTYPE" in str(wrong_type)
    assert after == b"after"


def test_a_cancelled_caller_leaves_the_others_their_replies(redis_url):
    async def scenario() -> list[object]:
        client = BatchingRedis.from_url(redis_url)
        try:
            first = asyncio.ensure_future(client.echo("one"))
            second = asyncio.ensure_future(client.echo("two"))
            await asyncio.sleep(0)
            first.cancel()
            return await asyncio.gather(first, second, return_exceptions=True)
        finally:
            await client.aclose()

    first, second = asyncio.run(scenario())
    assert isinstance(first, asyncio.CancelledError)
    assert second == b"two"


def test_blocking_commands_travel_alone(redis_url):
    async def scenario() -> tuple[object, object]:
        client = BatchingRedis.from_url(redis_url)
        try:
            waiting = asyncio.ensure_future(client.blmove("batch:empty", "batch:to", 1, "LEFT", "RIGHT"))
            await asyncio.sleep(0.05)
            quick = await asyncio.wait_for(client.echo("not held up"), timeout=0.5)
            return quick, await waiting
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == (b"not held up", None)


@pytest.mark.process
@pytest.mark.drill
def test_a_dead_redis_fails_every_caller_with_a_connection_error_of_its_own():
    server = RedisServer()
    server.start()

    async def scenario() -> list[object]:
        client = BatchingRedis.from_url(server.url, socket_connect_timeout=0.5)
        try:
            await client.ping()
            server.process.kill()
            server.process.wait()
            return await asyncio.gather(*(client.echo(str(n)) for n in range(5)), return_exceptions=True)
        finally:
            await client.aclose()

    try:
        outcomes = asyncio.run(scenario())
    finally:
        server.cleanup()
    assert all(isinstance(o, redis.exceptions.ConnectionError) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 5


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "k", "v"),
        ("HSET", b"key", "f", 1, "g", 2.5, "h", b"\x00\xff"),
        ("FCALL", "name", 2, "k1", "k2", "é", 1796000000000.123, -7),
        ("FUNCTION LOAD", "#!lua name=x\n"),
        (b"CLIENT SETNAME", b"me"),
        ("XADD", "s", "MINID", "~", 0, "*", "payload", "x" * 70_000),
    ],
)
def test_hiredis_packing_sends_the_bytes_redis_py_would(args):
    """The worker's connections pack in C; what goes on the wire is what redis-py would send."""
    from redis.asyncio.connection import Connection

    from core.redis.clients import HiredisPacking

    ours = type("HiredisConnection", (HiredisPacking, Connection), {})()
    theirs = Connection()
    assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))
    assert b"".join(ours.pack_commands([args, ("PING",)])) == b"".join(theirs.pack_commands([args, ("PING",)]))


def test_what_hiredis_cannot_pack_gets_redis_pys_own_error():
    from redis.asyncio.connection import Connection

    from core.redis.clients import HiredisPacking

    with pytest.raises(redis.exceptions.DataError):
        type("HiredisConnection", (HiredisPacking, Connection), {})().pack_command("SET", "k", None)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://h:6379/0", "Connection"),
        ("rediss://h:6380/0", "SSLConnection"),
        ("unix:///r.sock", "UnixDomainSocketConnection"),
    ],
)
def test_the_worker_client_keeps_the_connection_kind_its_url_names(url, kind):
    """Packing with hiredis never trades TLS (rediss://) or a Unix socket for a plain connection."""
    import redis.asyncio.connection as connections

    from core.config import load_settings
    from core.redis.clients import worker_redis

    client = worker_redis(load_settings().model_copy(update={"redis_url": url}))
    assert issubclass(client.connection_pool.connection_class, getattr(connections, kind))
    assert client.connection_pool.connection_class.__name__ == f"Hiredis{kind}"
