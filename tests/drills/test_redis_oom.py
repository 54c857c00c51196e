"""Drill: Redis reaches ``maxmemory`` (noeviction) under load, then memory is freed.

The edge answers 503 (or spools) while Redis refuses writes; the workers wait it out, never
quit, and every acknowledged event is published exactly once once Redis accepts writes again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rq.registry import FailedJobRegistry
from starlette.testclient import TestClient

from cli.samples import encode, sample_event
from core.redis.outage import redis_unavailable
from service.app import create_app
from tests.conftest import TOKEN, signed_headers
from tests.drills.common import (
    SETTLE_SECONDS,
    Sender,
    kill_group,
    metrics_port_env,
    published_figures,
    published_ids,
    report,
    reruns,
    settle,
    start_worker,
    wait_until,
    whereabouts,
    worker_names,
)
from tests.pipeline import pipeline_settings
from tests.procs import LiveServer, RedisServer

JUNK = b"x" * 256 * 1024


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


def fill(client: redis.Redis, headroom: int = 4 * 1024 * 1024) -> int:
    """Cap Redis a little above what it uses now and write junk until it refuses; returns the junk keys.

    The cap then drops a megabyte under what Redis uses, so that the few keys RQ expires meanwhile
    do not reopen it: Redis stays full until :func:`free`.
    """
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + headroom)
    keys = 0
    while True:
        try:
            client.set(f"junk:{keys}", JUNK)
        except redis.exceptions.OutOfMemoryError:
            break
        keys += 1
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 1024 * 1024)
    return keys


def free(client: redis.Redis, keys: int) -> None:
    """DEL is allowed at maxmemory: drop the junk, and the cap with it."""
    for start in range(0, keys, 100):
        client.delete(*[f"junk:{i}" for i in range(start, min(keys, start + 100))])
    client.config_set("maxmemory", 0)


def test_workers_ride_out_redis_out_of_memory(small_redis, emulator, seeded_database):
    """Two workers under load when Redis hits maxmemory: neither exits, and once memory is freed every
    acknowledged event is published exactly once, none failed."""
    settings = pipeline_settings(small_redis.url, emulator, seeded_database, job_retries=3)
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0.5}).raise_for_status()
    client = redis.Redis.from_url(small_redis.url)
    ports_envs = [metrics_port_env(), metrics_port_env()]
    with LiveServer(create_app(settings)) as web:
        workers = [start_worker(settings, "--concurrency", "16", **env) for _, env in ports_envs]
        sender = Sender(web.url, 200, pause=0.01)
        try:
            assert wait_until(lambda: len(worker_names(client)) == 2, 60)
            sender.thread.start()
            assert wait_until(lambda: len(sender.acknowledged) >= 60)
            refused_before = sender.refusals
            junk = fill(client)
            full_since = time.monotonic()
            # Hold Redis full while deliveries keep coming and jobs in flight try to finish.
            while time.monotonic() - full_since < 8.0:
                assert all(w.poll() is None for w in workers), "a worker exited on OOM"
                time.sleep(0.2)
            refused_while_full = sender.refusals - refused_before
            free(client, junk)
            freed_at = time.monotonic()
            sender.thread.join(timeout=SETTLE_SECONDS)
            assert not sender.thread.is_alive()
            settle(client, len(sender.acknowledged))
            recovered = time.monotonic() - freed_at
            alive = [w.poll() is None for w in workers]
            rerun = sum(reruns(port) for port, _ in ports_envs)
            published = published_ids(client)
            diagnosis = whereabouts(client, sorted(set(sender.acknowledged) - set(published)))
            failed = FailedJobRegistry("smartcar-events", connection=client).count
        finally:
            for worker in workers:
                kill_group(worker)
            client.close()
    report(
        "Redis out of memory under load",
        acknowledged=len(sender.acknowledged),
        **published_figures(published),
        reruns=rerun,
        refused_while_full=refused_while_full,
        slowest_answer_seconds=round(sender.slowest, 2),
        recovered_seconds_after_free=round(recovered, 1),
        workers_alive=alive,
    )
    assert refused_while_full > 0  # the edge refused while Redis was full: the drill hit OOM
    assert all(alive), "a worker exited"
    assert sorted(published) == sorted(sender.acknowledged), diagnosis
    assert failed == 0


@pytest.mark.parametrize("spool", [False, True], ids=["503", "spooled"])
def test_edge_treats_redis_out_of_memory_as_an_outage(small_redis, tmp_path: Path, spool):
    """At maxmemory the edge answers 503 with Retry-After, or 202 spooled with SPOOL_DIR, never a 500;
    a spooled delivery reaches the queue once memory is freed."""
    settings = pipeline_settings(
        small_redis.url, "http://unused.invalid", "sqlite://", spool_dir=str(tmp_path / "spool") if spool else None
    )
    client = redis.Redis.from_url(small_redis.url)
    event = sample_event()
    body = encode(event)
    with TestClient(create_app(settings)) as app:
        junk = fill(client)
        response = app.post("/webhooks/smartcar", content=body, headers=signed_headers(body, TOKEN))
        if spool:
            assert response.status_code == 202, response.text
            assert response.json()["status"] == "spooled"
        else:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"].isdigit()
        free(client, junk)
        if spool:
            assert wait_until(lambda: client.exists(f"rq:job:{event['eventId']}") == 1, 60)
    client.close()


def test_refusals_of_a_redis_that_cannot_write_are_waited_out_and_faults_are_not(small_redis):
    """OOM (alone or inside a transaction), READONLY, MISCONF and LOADING count as Redis trouble to wait
    out; a wrong-type error is a fault, raised at once."""
    client = redis.Redis.from_url(small_redis.url)
    client.set("a-string", "x")
    with pytest.raises(redis.ResponseError) as wrong_type:
        client.lpush("a-string", "x")
    assert not redis_unavailable(wrong_type.value)
    junk = fill(client)
    with pytest.raises(redis.RedisError) as oom:
        client.set("one-more", "x")
    with pytest.raises(redis.RedisError) as oom_in_transaction, client.pipeline() as pipe:
        pipe.hset("h", "f", "v").lpush("l", "x").execute()
    free(client, junk)
    client.replicaof("127.0.0.1", "1")  # a replica of nobody: up, answering, refusing writes
    try:
        with pytest.raises(redis.RedisError) as read_only:
            client.set("k", "v")
    finally:
        client.replicaof("NO", "ONE")
    client.close()
    for refusal in (oom.value, oom_in_transaction.value, read_only.value):
        assert redis_unavailable(refusal), repr(refusal)
    misconf = redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to")
    assert redis_unavailable(misconf)
    assert redis_unavailable(redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"))
