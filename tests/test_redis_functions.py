"""The service's Lua runs as Redis Functions loaded by an admin (core.redis.functions, issue 26.2)."""

from __future__ import annotations

import ast
import contextlib
import hashlib
from pathlib import Path

import pytest
import redis

from cli.redis_admin import FUNCTION_MODULES, all_functions, load_functions
from core.redis.dedupe import LIBRARY
from core.redis.functions import FUNCTIONS, PREFIX, FunctionsRedis, LuaFunction, lua_function
from tests.conftest import command_calls
from tests.procs import RedisServer

PRODUCT = ("core", "service", "workers", "cli")
FACTORIES = ("lua_function", "grouped_function")


def modules_defining_functions() -> set[str]:
    """Every product module that calls ``lua_function`` or ``grouped_function`` at its top level."""
    found = set()
    for package in PRODUCT:
        for path in Path(package).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                call = node.value if isinstance(node, ast.Assign | ast.Expr) else None
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) in FACTORIES:
                    found.add(".".join(path.with_suffix("").parts))
    return found


def test_redis_setup_knows_every_module_with_functions():
    """A module whose functions redis-setup would not load would fail only under an ACL user."""
    assert modules_defining_functions() - {"core.redis.functions"} == set(FUNCTION_MODULES)
    names = all_functions()
    # the reaper's two list give-backs are one function; Connect's give-back and the token lock's
    # release are RQ's release script
    assert len(names) >= 19
    assert {"enqueue", "publish_marks", "claim_jobs", "rq_acquire_or_refresh_lock"} <= set(names)


def test_a_changed_function_gets_a_new_name_and_both_versions_coexist(redis_client):
    """During a rolling upgrade old pods call the old version while new pods call the new one."""
    old = LuaFunction("coexist_probe", "return 'old'")
    new = LuaFunction("coexist_probe", "return 'new'")
    assert old.redis_name != new.redis_name
    assert old.redis_name.startswith(PREFIX)
    assert old.bind(redis_client)() == b"old"
    assert new.bind(redis_client)() == b"new"
    assert old.bind(redis_client)() == b"old"
    assert LuaFunction("coexist_probe", "return 'old'").redis_name == old.redis_name
    assert LuaFunction("coexist_probe", "return 'old'", prelude="-- helpers\n").redis_name != old.redis_name
    # Without a prelude, the name preludes found: an upgrade loads only the functions that changed.
    assert old.redis_name == PREFIX + "coexist_probe_" + hashlib.sha256(b"False\nreturn 'old'").hexdigest()[:12]


def test_a_prelude_runs_once_when_redis_loads_the_library(redis_client):
    """Helpers in a prelude are defined at load, not on every call: a counter kept there survives
    between calls (in the callback it would start again at each call)."""
    probe = LuaFunction(
        "prelude_probe",
        "return bump()",
        prelude="local calls = 0\nlocal function bump()\n  calls = calls + 1\n  return calls\nend\n",
    )
    call = probe.bind(redis_client)
    assert [call(), call(), call()] == [1, 2, 3]
    unterminated = LuaFunction("prelude_probe_unterminated", "return x", prelude="local x = 7")
    assert unterminated.bind(redis_client)() == 7


def test_a_marks_hash_number_is_the_text_earlier_releases_named_it_by(redis_client):
    """ids.shard formats an integer, as Lua's own number formatting did before it: marks written
    by an earlier release stay where a lookup reads them, whatever the digest and the shard bits."""
    probe = LuaFunction(
        "shard_probe",
        "local g = {div = 2 ^ (32 - tonumber(ARGV[2]))}\n"
        "return {ids.shard(tonumber(ARGV[1]), g), tostring(math.floor(tonumber(ARGV[1]) / g.div))}",
        prelude=LIBRARY,
    )
    call = probe.bind(redis_client)
    for head in (0, 1, 65_535, 2**31, 3_000_000_007, 2**32 - 1):
        for bits in (0, 1, 4, 13, 24):
            assert call(args=[head, bits]) == [str(head >> (32 - bits)).encode()] * 2


def test_the_marks_helpers_are_defined_at_load_in_every_function_that_uses_them():
    all_functions()
    users = [f for f in FUNCTIONS.values() if "ids.open(" in f.code]
    assert {"enqueue", "publish_marks", "recall", "park", "replay_parked"} <= {f.name for f in users}
    for function in users:
        callback = function.code.split("callback=function(KEYS, ARGV)", 1)[1]
        assert "function ids." not in callback, function.name


def test_one_name_cannot_be_defined_twice_with_different_code():
    lua_function("defined_once_probe", "return 1")
    assert lua_function("defined_once_probe", "return 1") is FUNCTIONS["defined_once_probe"]
    with pytest.raises(ValueError, match="two Lua functions"):
        lua_function("defined_once_probe", "return 2")
    with pytest.raises(ValueError, match="lower-case"):
        LuaFunction("Bad Name", "return 1")


def test_a_read_only_function_runs_while_redis_is_out_of_memory(redis_client):
    """``no-writes`` functions (reads for /metrics, status, polls) still answer when Redis refuses writes."""
    reader = LuaFunction("oom_probe_read", "return redis.call('GET', KEYS[1])", read_only=True)
    writer = LuaFunction("oom_probe_write", "return redis.call('SET', KEYS[1], 'x')")
    redis_client.set("oom-probe", "kept")
    reader.bind(redis_client)(keys=["oom-probe"])
    writer.bind(redis_client)(keys=["oom-probe-2"])
    limit = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)
    try:
        assert reader.bind(redis_client)(keys=["oom-probe"]) == b"kept"
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            writer.bind(redis_client)(keys=["oom-probe-2"])
    finally:
        redis_client.config_set("maxmemory", limit)


def test_rq_scripts_run_as_functions_on_the_workers_rq_connection(redis_url):
    """RQ's scheduler locks go through FCALL (the worker user may not EVAL); other scripts stay RQ's."""
    from rq.scripts import acquire_or_refresh_lock, release_lock

    client = FunctionsRedis.from_url(redis_url)
    try:
        assert acquire_or_refresh_lock(client, "functions-probe-lock", "me", 30) == "acquired"
        assert acquire_or_refresh_lock(client, "functions-probe-lock", "me", 30) == "refreshed"
        assert acquire_or_refresh_lock(client, "functions-probe-lock", "other", 30) == "taken"
        assert release_lock(client, "functions-probe-lock", "me")
        calls = client.info("commandstats")
        assert "cmdstat_fcall" in calls
        assert isinstance(client.register_script("return 1"), redis.commands.core.Script)
    finally:
        client.close()


@pytest.mark.process
@pytest.mark.drill
def test_functions_survive_a_restart_with_aof(tmp_path):
    """Loaded once by redis-setup, the functions are kept with the data: a role needs no reload."""
    server = RedisServer(appendonly=True)
    server.start()
    try:
        assert "loaded" in load_functions(server.url)
        client = redis.Redis.from_url(server.url)
        before = len(client.function_list())
        client.close()
        server.stop()
        server.start()
        client = redis.Redis.from_url(server.url)
        assert len(client.function_list()) == before == len(all_functions())
        client.close()
        assert load_functions(server.url).startswith("Redis functions: 0 loaded")
    finally:
        server.cleanup()


def test_callers_that_find_a_function_missing_together_load_it_once(redis_client):
    """Redis compiles every FUNCTION LOAD, even a refused one: 200 concurrent callers, one load."""
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    from core.redis.clients import BatchingRedis

    function = lua_function("load_once_probe", "return ARGV[1]")
    with contextlib.suppress(redis.exceptions.ResponseError):
        redis_client.function_delete(function.redis_name)

    def loads() -> int:
        return command_calls(redis_client, "function|load")

    async def scenario(client: AsyncRedis) -> list[object]:
        call = function.bind(client)
        try:
            return await asyncio.gather(*(call(args=[n]) for n in range(200)))
        finally:
            await client.aclose()

    before = loads()
    replies = asyncio.run(
        scenario(BatchingRedis.from_url(f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}"))
    )
    assert replies == [str(n).encode() for n in range(200)]
    assert loads() - before == 1


def test_a_missing_function_loads_within_the_callers_own_connections(redis_client):
    """64 callers on a pool of 64 (redis-py's non-blocking pool) find the function missing together:
    the one shared load finds a connection, and every caller gets its reply."""
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    function = lua_function("load_in_pool_probe", "return ARGV[1]")
    with contextlib.suppress(redis.exceptions.ResponseError):
        redis_client.function_delete(function.redis_name)
    port = redis_client.connection_pool.connection_kwargs["port"]

    async def scenario() -> list[object]:
        client = AsyncRedis.from_url(f"redis://127.0.0.1:{port}", max_connections=64)
        call = function.bind(client)
        try:
            return await asyncio.gather(*(call(args=[n]) for n in range(64)))
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [str(n).encode() for n in range(64)]
