"""Web and worker each log in to Redis as their own ACL user, with only what their role needs."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from cli.samples import sample_event
from core.redis.acl import Role
from core.redis.functions import MissingFunction, lua_function
from core.redis.keys import (
    APPLICATION_PAUSE_KEY,
    BUDGET_KEY,
    CONNECT_STATE_PREFIX,
    EVENT_IDS_KEY,
    PARKED_IDS_KEY,
    STAGED_JOB_PREFIX,
    TOKEN_KEY,
    USAGE_PREFIX,
    WORKERS_SET,
    dequeued_key,
    latest_read_key,
    queue_key,
    read_key,
    vehicle_pause_key,
    vehicle_state_key,
)
from core.redis.memory import read_memory
from core.redis.queue_metrics import read_redis, read_stranded
from tests.pipeline import outputs, run_worker_burst, stream_entries
from tests.procs import RedisServer
from tests.test_cli import run_cli
from tests.test_pipeline import deliver

#: Every test here starts a process of its own (tests/kinds.py).
pytestmark = pytest.mark.process

PASSWORDS: dict[Role, str] = {"web": "web-acl-password", "worker": "worker-acl-password"}


def write_aclfile(directory: Path) -> Path:
    """The aclfile an operator deploys: Redis's admin user, then each role's line as
    `smartcar-ingest redis-acl ROLE --password-env VAR` prints it (no password in its output)."""
    lines = ["user default on nopass ~* &* +@all"]
    for role, password in PASSWORDS.items():
        result = run_cli(
            "redis-acl", role, "--password-env", "ACL_PASSWORD", env={"ACL_PASSWORD": password}, cwd=directory
        )
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout
        lines.append(result.stdout.strip())
    aclfile = directory / "users.acl"
    aclfile.write_text("\n".join(lines) + "\n")
    return aclfile


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, redis.Redis]]:
    """A Redis whose users are the aclfile of :func:`write_aclfile`, set up as the chart's migration
    Job and `make run` set one up: `redis-setup` with the admin user (the roles may not load functions)."""
    server = RedisServer(options=["--aclfile", str(write_aclfile(tmp_path))])
    server.start()
    admin = redis.Redis.from_url(server.url)
    setup = run_cli("redis-setup", env={"REDIS_URL": server.url})
    assert setup.returncode == 0, setup.stderr
    assert "loaded" in setup.stdout
    assert "started without a legacy window" in setup.stdout
    yield server, admin
    admin.close()
    server.cleanup()


def role_url(server: RedisServer, role: Role) -> str:
    return f"redis://smartcar-{role}:{PASSWORDS[role]}@127.0.0.1:{server.port}/0"


def test_web_and_worker_run_the_pipeline_as_their_own_users(pipeline, acl_redis):
    """Accept, park, enqueue, enrich and publish all work with the restricted users, repeats included."""
    server, admin = acl_redis
    web = pipeline.model_copy(update={"redis_url": role_url(server, "web")})
    worker = pipeline.model_copy(update={"redis_url": role_url(server, "worker")})
    event = sample_event()
    legacy = {"version": "2.0", "eventName": "x", "payload": {}, "eventId": "legacy-acl"}
    # each twice, as Smartcar retries: the repeat's staged job hash dropped, the parked mark found
    deliver(web, event, legacy, event, legacy)
    run_worker_burst(worker)
    assert [entry["event_id"] for entry in outputs(admin)] == [event["eventId"]]
    assert [entry["reason"] for entry in stream_entries(admin, pipeline.parked_stream)] == ["legacy_v2"]
    assert admin.get(TOKEN_KEY) is not None
    # the worker shared its reads and counted them under its own user (core.smartcar.reads, deployment_counts)
    vehicle, user = event["data"]["vehicle"]["id"], event["data"]["user"]["id"]
    assert admin.hget(read_key("signals", vehicle, user), "data") is not None
    assert admin.keys(f"{USAGE_PREFIX}*")
    # the worker merged the vehicle's latest state under its own user (VEHICLE_STATE_PREFIX)
    assert admin.hget(vehicle_state_key(pipeline.vehicle_state_prefix, event["data"]["vehicle"]["id"]), "_eventId") == (
        event["eventId"].encode()
    )


def test_web_metrics_read_every_gauge_as_the_web_user(pipeline, acl_redis):
    """The web's /metrics collector reads the queue, the streams and the stranded jobs under its ACL."""
    server, admin = acl_redis
    admin.sadd(WORKERS_SET, "gone-worker")
    admin.rpush(dequeued_key(pipeline.ingest_queue, "gone-worker"), "held-job")
    web = redis.Redis.from_url(role_url(server, "web"))
    now = dt.datetime.now(dt.UTC)
    assert read_redis(web, pipeline, now, optional=lambda read: None)["queue"]["depth"] == 0  # the first section
    assert read_stranded(web, pipeline.ingest_queue, now)["count"] == 1
    # Redis's memory for /metrics and the startup warning: INFO's memory section, and nothing else
    assert read_memory(web).used_bytes > 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        web.info("server")
    web.close()


def test_web_user_cannot_forge_output_read_the_token_or_administer(pipeline, acl_redis):
    """What a compromised web pod would try next is refused by Redis itself."""
    server, admin = acl_redis
    admin.set(TOKEN_KEY, "sealed-token-stand-in")
    admin.set("unrelated:secret", "x")
    web = redis.Redis.from_url(role_url(server, "web"))
    forged = {"event_id": "forged", "payload": json.dumps({"eventId": "forged"})}
    attempts = [
        lambda: web.xadd(pipeline.output_stream, forged),
        lambda: web.get(TOKEN_KEY),
        lambda: web.get("unrelated:secret"),
        lambda: web.delete(pipeline.parked_stream),
        lambda: web.config_get("requirepass"),
        lambda: web.flushall(),
        lambda: web.keys("*"),
        lambda: web.rpush("rq:queue:another-queue", "job"),
        lambda: web.hset("smartcar:vehicle-state:v1", "x", "1"),
        # poisoning the reads the workers share, or stalling them with a fake budget or pause
        lambda: web.hset(read_key("signals", "v1", "u1"), "data", "[]"),
        lambda: web.hget(read_key("vehicle", "v1", "u1"), "data"),
        lambda: web.set(latest_read_key(read_key("signals", "v1", "u1")), "0:[]"),
        lambda: web.set(BUDGET_KEY, "99999999999999"),
        lambda: web.hset(APPLICATION_PAUSE_KEY, "until", "99999999999999"),
        lambda: web.hset(vehicle_pause_key("v1"), "until", "99999999999999"),
        # emptying the queue or the parked stream by renaming it to a staged job key, which it may delete
        lambda: web.rename(queue_key(pipeline.ingest_queue), STAGED_JOB_PREFIX + "x"),
        lambda: web.rename(pipeline.parked_stream, STAGED_JOB_PREFIX + "y"),
        lambda: web.rename("rq:job:a", STAGED_JOB_PREFIX + "z"),
        # PTTL is the token lock's, granted only with Connect
        lambda: web.pttl(EVENT_IDS_KEY),
    ]
    admin.rpush(queue_key(pipeline.ingest_queue), "job")
    admin.xadd(pipeline.parked_stream, {"event_id": "kept"})
    admin.hset("rq:job:a", "status", "queued")
    for attempt in attempts:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    web.close()
    assert admin.xlen(pipeline.output_stream) == 0
    assert admin.llen(queue_key(pipeline.ingest_queue)) == 1
    assert admin.xlen(pipeline.parked_stream) == 1
    assert admin.exists("rq:job:a")


def web_attacks(pipeline) -> tuple[dict[str, tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
    """Writes a compromised web pod could aim at the keys every pod and worker relies on: the first
    give an absent key (an empty queue, a generation's hash before its first mark) another type, so
    that every later accept, park or claim fails with WRONGTYPE; the second wipe or rewrite what is
    there, acknowledged events among it."""
    queue, parked = queue_key(pipeline.ingest_queue), pipeline.parked_stream
    retype = {
        "empty queue made a hash": ("HSET", queue, "f", "v"),
        "empty queue made a stream": ("XADD", queue, "*", "f", "v"),
        "empty queue made a set": ("SADD", queue, "x"),
        "empty parked stream made a list": ("RPUSH", parked, "x"),
        "empty parked stream made a hash": ("HSET", parked, "f", "v"),
        "set of queues made a list": ("RPUSH", Queue.redis_queues_keys, "x"),
        "staged job planted as a string": ("SET", STAGED_JOB_PREFIX + "future-event", "x"),
        "mark hash planted as a string": ("SET", f"{EVENT_IDS_KEY}:next-slot:0:0", "x"),
        "marks registry made a hash": ("HSET", EVENT_IDS_KEY, "f", "v"),
        "parked marks registry made a list": ("RPUSH", PARKED_IDS_KEY, "x"),
        "connect state made a list": ("RPUSH", CONNECT_STATE_PREFIX + "nonce", "x"),
    }
    wipe = {
        "queue overwritten": ("SET", queue, "x"),
        "queue expired": ("EXPIREAT", queue, 1),
        "parked stream overwritten": ("SET", parked, "x"),
        "parked stream expired": ("EXPIREAT", parked, 1),
        "queued job overwritten": ("SET", "rq:job:a", "x"),
        "queued job expired": ("EXPIREAT", "rq:job:a", 1),
        "queued job rewritten": ("HSET", "rq:job:a", "status", "finished"),
        "set of queues overwritten": ("SET", Queue.redis_queues_keys, "x"),
        "set of queues expired": ("EXPIREAT", Queue.redis_queues_keys, 1),
    }
    return retype, wipe


def attempts_allowed(client: redis.Redis, attacks: dict[str, tuple[Any, ...]], undo: Any = None) -> list[str]:
    """The attacks Redis let through; ``undo`` runs after each, so the next meets the keys as before."""
    allowed = []
    for name, command in attacks.items():
        try:
            client.execute_command(*command)
        except redis.exceptions.NoPermissionError:
            continue
        allowed.append(name)
        if undo is not None:
            undo()
    return allowed


def test_web_user_cannot_wipe_or_retype_the_keys_other_pods_rely_on(pipeline, acl_redis):
    """Each write command of the web user reaches only the keys it exists for (ACL selectors): no web
    pod can empty the queue, expire a queued job, or give a shared key a type that fails every pod."""
    server, admin = acl_redis
    queue, parked = queue_key(pipeline.ingest_queue), pipeline.parked_stream
    retype, wipe = web_attacks(pipeline)
    web = redis.Redis.from_url(role_url(server, "web"))
    assert attempts_allowed(web, retype, undo=admin.flushdb) == []
    # nothing but what redis-setup wrote: the marks' registries, empty
    assert {key: admin.get(key) for key in admin.keys("*")} == {
        EVENT_IDS_KEY.encode(): b"",
        PARKED_IDS_KEY.encode(): b"",
    }
    admin.rpush(queue, "a")
    admin.hset("rq:job:a", mapping={"status": "queued", "origin": pipeline.ingest_queue})
    admin.xadd(parked, {"event_id": "kept"})
    admin.sadd(Queue.redis_queues_keys, queue)
    assert attempts_allowed(web, wipe) == []
    web.close()
    assert admin.lrange(queue, 0, -1) == [b"a"]
    assert admin.hgetall("rq:job:a") == {b"status": b"queued", b"origin": pipeline.ingest_queue.encode()}
    assert (admin.xlen(parked), admin.ttl(queue), admin.ttl(parked)) == (1, -1, -1)
    assert admin.smembers(Queue.redis_queues_keys) == {queue.encode()}


def test_worker_user_cannot_administer_redis(pipeline, acl_redis):
    """The worker user gets no dangerous command but INFO."""
    server, _ = acl_redis
    worker = redis.Redis.from_url(role_url(server, "worker"))
    assert worker.info("server")["redis_version"]
    for attempt in (lambda: worker.config_set("appendonly", "no"), worker.flushall, lambda: worker.keys("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    assert Queue(pipeline.ingest_queue, connection=worker, serializer=JSONSerializer).count == 0
    worker.close()


def test_redis_acl_command_writes_an_aclfile_redis_loads(pipeline, acl_redis):
    """`smartcar-ingest redis-acl ROLE --password-env VAR` prints aclfile lines a real redis-server
    loads (every other test of this file runs on them too)."""
    server, admin = acl_redis
    assert {str(user) for user in admin.acl_users()} == {"default", "smartcar-web", "smartcar-worker"}
    web = redis.Redis.from_url(role_url(server, "web"))
    assert web.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        web.xadd(pipeline.output_stream, {"forged": "1"})
    web.close()


def test_redis_acl_without_a_password_writes_a_disabled_user(tmp_path):
    """No --password-env: the user line is switched off (never nopass), and stderr says so."""
    result = run_cli("redis-acl", "worker", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("user smartcar-worker off ")
    assert "nopass" not in result.stdout
    assert "switched off" in result.stderr


#: Ways a role could run code of its own choosing, each of which would let it freeze Redis for every client.
ENDLESS = "while true do end"
RUN_ANY_CODE = {
    "EVAL": ("EVAL", ENDLESS, 0),
    "EVAL_RO": ("EVAL_RO", ENDLESS, 0),
    "SCRIPT LOAD": ("SCRIPT", "LOAD", ENDLESS),
    "FUNCTION LOAD": (
        "FUNCTION",
        "LOAD",
        f"#!lua name=endless\nredis.register_function('endless', function() {ENDLESS} end)",
    ),
    "FUNCTION FLUSH": ("FUNCTION", "FLUSH"),
    "FUNCTION DELETE": ("FUNCTION", "DELETE", "anything"),
    "FUNCTION RESTORE": ("FUNCTION", "RESTORE", b"\x00"),
    "SCRIPT FLUSH": ("SCRIPT", "FLUSH"),
}


@pytest.mark.parametrize("role", ["web", "worker"])
def test_no_role_can_run_code_of_its_own_choosing(pipeline, acl_redis, role):
    """Issue 26.2: neither role may EVAL, load a script or a function, or drop the functions the
    service calls; each may only FCALL what an admin loaded."""
    server, admin = acl_redis
    client = redis.Redis.from_url(role_url(server, role), socket_timeout=5)
    try:
        refused = []
        for name, command in RUN_ANY_CODE.items():
            try:
                client.execute_command(*command)
            except redis.exceptions.NoPermissionError:
                refused.append(name)
        assert refused == list(RUN_ANY_CODE)
        assert admin.ping()  # Redis still answers everyone
        assert client.ping()
    finally:
        client.close()


def test_a_role_without_the_functions_gets_an_error_naming_the_setup_command(pipeline, acl_redis):
    """A Redis that lost the functions (or never had redis-setup run): the web answers 503 and logs
    what to run; once redis-setup has run, deliveries are accepted again."""
    server, admin = acl_redis
    admin.function_flush()
    web = pipeline.model_copy(update={"redis_url": role_url(server, "web")})
    client = redis.Redis.from_url(role_url(server, "web"))
    try:
        with pytest.raises(MissingFunction, match="smartcar-ingest redis-setup"):
            lua_function("test_acl_probe", "return 1").bind(client)()
    finally:
        client.close()
    with pytest.raises(AssertionError, match="503"):
        deliver(web, sample_event())
    setup = run_cli("redis-setup", env={"REDIS_URL": server.url})
    assert setup.returncode == 0, setup.stderr
    deliver(web, sample_event())
    assert admin.llen(f"rq:queue:{pipeline.ingest_queue}") == 1


def test_redis_setup_loads_each_function_once_and_says_so(pipeline, acl_redis):
    """A second run finds every function there; a run as a role is refused with exit 2 and a line to act on."""
    server, _ = acl_redis
    again = run_cli("redis-setup", env={"REDIS_URL": server.url})
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("Redis functions: 0 loaded, ")
    assert "legacy window" not in again.stdout  # said by the first run only, on a Redis new to the service
    refused = run_cli("redis-setup", env={"REDIS_URL": role_url(server, "worker")})
    assert refused.returncode == 2
    assert "admin REDIS_URL" in refused.stderr
    assert PASSWORDS["worker"] not in refused.stderr
