"""The inbox's job template and group commit, checked against RQ itself and a real Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import zlib

import pytest
from redis.asyncio import Redis as AsyncRedis
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from cli.samples import encode, sample_event
from core.redis.functions import lua_function
from core.redis.inbox import DirectScript, Inbox
from core.redis.jobs import (
    PROCESS_EVENT,
    RETRY_INTERVALS,
    JobOptions,
    JobPayload,
    build_job_hash,
    job_payload,
)
from core.redis.keys import STAGED_JOB_PREFIX, job_id_for
from tests.procs import RedisServer

OPTIONS = JobOptions(queue="smartcar-events", timeout_seconds=90, retries=3)


def accept(redis_url: str, *payloads: JobPayload, options: JobOptions = OPTIONS) -> list[bool]:
    """Enqueue each payload's delivery through :meth:`Inbox.accept`, as the web edge does."""

    async def scenario() -> list[bool]:
        redis = AsyncRedis.from_url(redis_url)
        try:
            inbox = Inbox(redis, options, "smartcar:parked", 60)
            return [await inbox.accept(p["eventId"], p["eventType"], p["body"], p["receivedAt"]) for p in payloads]
        finally:
            await redis.aclose()

    return asyncio.run(scenario())


def test_inbox_writes_the_hash_rqs_job_writes(redis_url, redis_client):
    """Field for field, the inbox stores what RQ's Job stores, apart from the two times and the fields RQ
    stores empty, which it leaves out; both deflate the data, and RQ restores the two jobs alike."""
    payload = job_payload("evt-1", "VEHICLE_STATE", encode(sample_event()).decode(), 123)
    assert accept(redis_url, payload) == [True]
    job_id, reference = build_job_hash(payload, OPTIONS)
    # Stored as RQ's Job.save stores it, so both hashes pass through the same encoding.
    redis_client.hset("reference", mapping=reference)
    expected = redis_client.hgetall("reference")
    ours = redis_client.hgetall(Job.key_for(job_id))
    empty = {key for key, value in expected.items() if value == b""}
    assert {b"started_at", b"worker_name"} <= empty  # else RQ's layout moved: look again
    assert set(ours) == set(expected) - empty
    for key in set(ours) - {b"created_at", b"enqueued_at", b"data"}:
        assert ours[key] == expected[key], key
    assert json.loads(zlib.decompress(ours[b"data"])) == json.loads(zlib.decompress(expected[b"data"]))
    assert ours[b"created_at"] == ours[b"enqueued_at"]
    utcparse(ours[b"enqueued_at"].decode())  # in RQ's own time format

    def restored(fields: dict[bytes, bytes]) -> dict[str, object]:
        job = Job(job_id, connection=redis_client, serializer=JSONSerializer)
        job.restore(fields)
        return {k: v for k, v in job.to_dict().items() if k not in ("created_at", "enqueued_at", "data")}

    assert restored(ours) == restored(expected)


@pytest.mark.process
def test_rq_reads_an_inbox_job_like_one_it_enqueued_itself(redis_url, redis_client):
    """RQ fetches a job written by the inbox with the function, args, options and status of its own enqueue."""
    ours = job_payload("ev-2", "VEHICLE_ERROR", '{"a":"b \\"quoted\\" é"}', 456)
    odd = job_payload("evt:3/ü", "VEHICLE_STATE", "{}", 789)  # not a valid RQ id: a digest stands in
    assert accept(redis_url, ours, odd) == [True, True]
    queue = Queue(OPTIONS.queue, connection=redis_client, serializer=JSONSerializer)
    theirs = job_payload("ev-4", "VEHICLE_ERROR", "{}", 1)
    queue.enqueue(
        PROCESS_EVENT,
        theirs,
        job_id="ev-4",
        description="process_event(VEHICLE_ERROR ev-4)",
        job_timeout=OPTIONS.timeout_seconds,
        result_ttl=OPTIONS.result_ttl_seconds,
        failure_ttl=OPTIONS.failure_ttl_seconds,
        retry=Retry(max=OPTIONS.retries, interval=list(RETRY_INTERVALS[: OPTIONS.retries])),
    )

    def fetched(job_id: str) -> Job:
        return Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)

    def seen_by_rq(job: Job) -> tuple[object, ...]:
        return (
            job.func_name,
            job.kwargs,
            job.origin,
            job.timeout,
            job.result_ttl,
            job.failure_ttl,
            job.retries_left,
            job.retry_intervals,
            job.get_status(),
        )

    reference = fetched("ev-4")
    assert seen_by_rq(reference) == (
        PROCESS_EVENT,
        {},
        "smartcar-events",
        90,
        60,  # JOB_RESULT_TTL_SECONDS: a finished job and its body go a minute after success
        7 * 24 * 3600,
        3,
        [5, 15, 60],
        "queued",
    )
    for payload in (ours, odd):
        job = fetched(job_id_for(payload["eventId"]))
        assert seen_by_rq(job) == seen_by_rq(reference)
        assert list(job.args) == [payload]
        assert job.description == f"process_event({payload['eventType']} {payload['eventId']})"
        assert job.enqueued_at is not None
        assert job.created_at is not None
    assert queue.job_ids == ["ev-2", job_id_for("evt:3/ü"), "ev-4"]

    result = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", redis_url, "--only-queues", "--raw", OPTIONS.queue],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith(f"queue {OPTIONS.queue} 3,"), line  # three queued


def test_group_commit_gives_each_caller_its_own_answer(redis_url, redis_client):
    """Concurrent submissions, with repeats inside one batch, each learn whether they enqueued."""

    async def scenario():
        redis = AsyncRedis.from_url(redis_url)
        inbox = Inbox(redis, JobOptions("smartcar-events"), "smartcar:parked", 60)
        ids = [f"e-{i % 40}" for i in range(200)]  # each id five times
        results = await asyncio.gather(*(inbox.accept(i, "VEHICLE_STATE", "{}", 1) for i in ids))
        await redis.aclose()
        return ids, results

    ids, results = asyncio.run(scenario())
    accepted = [i for i, ok in zip(ids, results, strict=True) if ok]
    assert sorted(accepted) == sorted({*ids})
    queue = Queue("smartcar-events", connection=redis_client, serializer=JSONSerializer)
    assert sorted(queue.job_ids) == sorted({*ids})


def staged_keys(redis_client) -> list[bytes]:
    return list(redis_client.scan_iter(match=STAGED_JOB_PREFIX + "*"))


def test_an_enqueue_leaves_no_staged_job_behind(redis_url, redis_client):
    """Each job hash is written under a staged key and, in the same transaction, renamed to the job
    (new event) or dropped (a repeat): afterwards only the jobs are there, one per eventId."""

    async def scenario() -> list[bool]:
        redis = AsyncRedis.from_url(redis_url)
        try:
            inbox = Inbox(redis, OPTIONS, "smartcar:parked", 60)
            ids = [f"s-{i % 7}" for i in range(40)]
            return await asyncio.gather(*(inbox.accept(i, "VEHICLE_STATE", b'{"n":1}', 1) for i in ids))
        finally:
            await redis.aclose()

    assert sum(asyncio.run(scenario())) == 7
    assert staged_keys(redis_client) == []
    assert sorted(redis_client.lrange(f"rq:queue:{OPTIONS.queue}", 0, -1)) == sorted(
        job_id_for(f"s-{i}").encode() for i in range(7)
    )


def test_a_failed_enqueue_drops_its_staged_jobs_and_leaves_the_event_unmarked(redis_url, redis_client):
    """A script that fails after the job hashes were staged (here the queue is not a list) raises
    Redis's error to the caller and leaves no staged hash. The mark is written after the push, so
    the event is not taken as seen: Smartcar's retry (or the spool's) enqueues it once the queue
    is mended."""
    from redis.exceptions import ResponseError

    async def scenario() -> tuple[BaseException | bool, bool]:
        redis = AsyncRedis.from_url(redis_url)
        try:
            inbox = Inbox(redis, OPTIONS, "smartcar:parked", 60)
            await redis.set(f"rq:queue:{OPTIONS.queue}", "not a list")
            (failed,) = await asyncio.gather(inbox.accept("f-1", "VEHICLE_STATE", "{}", 1), return_exceptions=True)
            assert staged_keys(redis_client) == []
            await redis.delete(f"rq:queue:{OPTIONS.queue}")
            return failed, await inbox.accept("f-1", "VEHICLE_STATE", "{}", 1)
        finally:
            await redis.aclose()

    failed, then = asyncio.run(scenario())
    assert isinstance(failed, ResponseError)
    assert "WRONGTYPE" in str(failed)
    assert then is True
    assert staged_keys(redis_client) == []
    assert redis_client.lrange(f"rq:queue:{OPTIONS.queue}", 0, -1) == [b"f-1"]
    assert redis_client.hget("rq:job:f-1", "status") == b"queued"


def test_an_enqueue_after_redis_lost_the_function_loads_it_and_stages_once(redis_url, redis_client):
    """The function missing at EXEC (``FUNCTION FLUSH``): the staged hashes are dropped, the
    function loaded and the whole transaction sent again; the event is enqueued once."""

    async def scenario() -> list[bool]:
        redis = AsyncRedis.from_url(redis_url)
        try:
            inbox = Inbox(redis, OPTIONS, "smartcar:parked", 60)
            first = await inbox.accept("l-1", "VEHICLE_STATE", "{}", 1)
            await redis.function_flush()
            return [
                first,
                await inbox.accept("l-2", "VEHICLE_STATE", "{}", 1),
                await inbox.accept("l-2", "VEHICLE_STATE", "{}", 1),
            ]
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()) == [True, True, False]
    assert staged_keys(redis_client) == []
    assert redis_client.lrange(f"rq:queue:{OPTIONS.queue}", 0, -1) == [
        job_id_for("l-1").encode(),
        job_id_for("l-2").encode(),
    ]


@pytest.mark.process
def test_an_out_of_memory_redis_refuses_the_enqueue_and_the_next_call_works():
    """A Redis at its memory limit refuses the staged write: nothing runs, the caller gets the
    out-of-memory error, and the connection (every reply read) serves the next call."""
    from redis.exceptions import OutOfMemoryError

    private_redis = RedisServer()
    private_redis.start()

    async def scenario() -> bool:
        redis = AsyncRedis.from_url(private_redis.url)
        try:
            inbox = Inbox(redis, OPTIONS, "smartcar:parked", 60)
            assert await inbox.accept("m-1", "VEHICLE_STATE", "{}", 1)
            await redis.config_set("maxmemory", 1)
            with pytest.raises(OutOfMemoryError):
                await inbox.accept("m-2", "VEHICLE_STATE", "{}", 1)
            await redis.config_set("maxmemory", 0)
            assert [c.is_connected for c, _ in inbox._script.idle] == [True]
            assert await redis.exists(Job.key_for(job_id_for("m-2"))) == 0
            assert await redis.keys(STAGED_JOB_PREFIX + "*") == []
            return await inbox.accept("m-2", "VEHICLE_STATE", "{}", 1)
        finally:
            await redis.aclose()

    try:
        assert asyncio.run(scenario()) is True
    finally:
        private_redis.cleanup()


def test_group_commit_failure_reaches_every_waiter(redis_url):
    """When Redis fails, every caller of the batch gets the error rather than hanging."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def scenario():
        redis = AsyncRedis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        inbox = Inbox(redis, JobOptions("q"), "parked", 60)
        accepts = [inbox.accept(f"x{i}", "VEHICLE_STATE", "{}", 1) for i in range(10)]
        outcomes = await asyncio.gather(*accepts, return_exceptions=True)
        await redis.aclose()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, RedisConnectionError | OSError) for o in outcomes)


# --- the enqueue script's own connection ------------------------------------------------------


def test_the_function_is_loaded_again_when_redis_has_lost_it(redis_url):
    """After ``FUNCTION FLUSH`` (what a restart of a Redis without persistence does) the next call
    loads the function again and runs."""

    async def scenario() -> list[object]:
        redis = AsyncRedis.from_url(redis_url)
        function = lua_function("test_direct_echo", "return {KEYS[1], ARGV[1]}")
        try:
            script = DirectScript(redis, function)
            first = await script(["k"], ["a"])
            await redis.function_flush()
            assert await redis.function_list(library=function.redis_name) == []
            second = await script(["k"], [b"b"])
            assert len(await redis.function_list(library=function.redis_name)) == 1
            return [first, second]
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()) == [[b"k", b"a"], [b"k", b"b"]]


def test_a_connection_redis_closed_is_replaced_on_the_next_call(redis_url, redis_client):
    """Redis closing the script's connection (a restart, an idle timeout) costs no failed call."""

    async def scenario() -> list[object]:
        redis = AsyncRedis.from_url(redis_url)
        try:
            script = DirectScript(redis, lua_function("test_direct_arg", "return ARGV[1]"))
            answers = [await script([], ["before"])]
            ((connection, _),) = script.idle
            await connection.send_command("CLIENT", "ID")
            assert redis_client.client_kill_filter(_id=await connection.read_response()) == 1
            answers.append(await script([], ["after"]))
            return answers
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()) == [b"before", b"after"]


@pytest.mark.drill
def test_a_call_that_times_out_closes_its_connection_and_the_next_one_works():
    """A Redis that stops answering (SIGSTOP) fails the call within the client's socket timeout;
    the connection, in an unknown state, is closed, and once Redis answers the next call runs."""
    import signal
    import time

    private_redis = RedisServer()
    private_redis.start()

    async def scenario() -> tuple[float, object]:
        redis = AsyncRedis.from_url(private_redis.url, socket_timeout=0.3)
        try:
            script = DirectScript(redis, lua_function("test_direct_arg", "return ARGV[1]"))
            assert await script([], ["warm"]) == b"warm"
            private_redis.process.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            try:
                await script([], ["frozen"])
            except TimeoutError:
                elapsed = time.monotonic() - started
            else:
                raise AssertionError("a frozen Redis answered")
            finally:
                private_redis.process.send_signal(signal.SIGCONT)
            ((connection, _),) = script.idle
            assert not connection.is_connected
            return elapsed, await script([], ["thawed"])
        finally:
            await redis.aclose()

    try:
        elapsed, answer = asyncio.run(scenario())
    finally:
        private_redis.stop()
    assert elapsed < 5  # bounded by the socket timeout, far from a hang
    assert answer == b"thawed"


def test_an_error_reply_reaches_the_caller_and_keeps_the_connection(redis_url):
    """A script's error reply (what an out-of-memory Redis sends) is raised as Redis's error; the
    answer was read whole, so the connection stays open for the next call."""
    from redis.exceptions import OutOfMemoryError

    async def scenario() -> object:
        redis = AsyncRedis.from_url(redis_url)
        try:
            script = DirectScript(
                redis,
                lua_function(
                    "test_direct_error", "if ARGV[1] == 'fail' then return redis.error_reply('OOM test') end return 1"
                ),
            )
            assert await script([], ["ok"]) == 1
            ((connection, _),) = script.idle
            with pytest.raises(OutOfMemoryError, match=r"^test$"):
                await script([], ["fail"])
            assert [c for c, _ in script.idle] == [connection]
            assert connection.is_connected
            return await script([], ["ok"])
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()) == 1


def test_a_connection_idle_past_the_health_check_interval_is_replaced(redis_url, redis_client):
    """A connection left idle longer than the pool's health-check interval is not trusted (a NAT
    may have dropped it silently): the next call runs on a new one; a busy one is kept."""

    async def client_id(script: DirectScript) -> int:
        ((connection, _),) = script.idle
        await connection.send_command("CLIENT", "ID")
        return int(await connection.read_response())

    async def scenario() -> tuple[int, int, int]:
        redis = AsyncRedis.from_url(redis_url, health_check_interval=0.3)
        try:
            script = DirectScript(redis, lua_function("test_direct_one", "return 1"))
            await script([], [])
            first = await client_id(script)
            await script([], [])
            kept = await client_id(script)
            await asyncio.sleep(0.5)
            await script([], [])
            return first, kept, await client_id(script)
        finally:
            await redis.aclose()

    first, kept, after_idle = asyncio.run(scenario())
    assert kept == first
    assert after_idle != first


def test_a_restart_that_lost_the_functions_costs_no_delivery(redis_url):
    """A Redis restarted without persistence closes the kept connection and forgets the function:
    the call reconnects and loads it, in one go."""

    async def scenario() -> list[object]:
        redis = AsyncRedis.from_url(redis_url)
        function = lua_function("test_direct_restart", "return ARGV[1]")
        try:
            script = DirectScript(redis, function)
            first = await script([], ["a"])
            await redis.function_flush()
            await redis.client_kill_filter(_id=None, skipme=True, laddr=None, _type="normal")
            second = await script([], ["b"])
            return [first, second]
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()) == [b"a", b"b"]
