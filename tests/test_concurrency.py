"""Concurrent redeliveries of one eventId, over real HTTP: exactly one job."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from cli.samples import encode, sample_event
from service.app import create_app
from tests.conftest import signed_headers
from tests.procs import LiveServer


def test_racing_redeliveries_enqueue_exactly_one_job(settings, redis_client):
    """Fifty simultaneous deliveries of one event: one accepted, the rest duplicates, one job."""
    documents = [sample_event() for _ in range(5)]
    for document in documents[1:]:
        document["eventId"] = documents[0]["eventId"]  # same event, different deliveryId

    async def storm(url: str) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:

            async def one(i: int) -> str:
                body = encode(documents[i % len(documents)])
                response = await http.post("/webhooks/smartcar", content=body, headers=signed_headers(body))
                assert response.status_code == 202
                return str(response.json()["status"])

            return await asyncio.gather(*(one(i) for i in range(50)))

    with LiveServer(create_app(settings)) as server:
        statuses = asyncio.run(storm(server.url))
    assert statuses.count("accepted") == 1
    assert statuses.count("duplicate") == 49
    queue = Queue(settings.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    assert queue.job_ids == [documents[0]["eventId"]]


def test_many_distinct_events_each_get_one_job(settings, redis_client):
    """Concurrent distinct events are all accepted and all queued."""
    documents = [sample_event() for _ in range(100)]

    async def send(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:

            async def one(document: dict) -> None:
                body = encode(document)
                response = await http.post("/webhooks/smartcar", content=body, headers=signed_headers(body))
                assert response.json()["status"] == "accepted"

            await asyncio.gather(*(one(d) for d in documents))

    with LiveServer(create_app(settings)) as server:
        asyncio.run(send(server.url))
    queue = Queue(settings.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    assert sorted(queue.job_ids) == sorted(d["eventId"] for d in documents)


@pytest.mark.process
def test_a_worker_with_more_jobs_in_flight_than_redis_pys_default_pool_requeues_nothing(
    pipeline, redis_client, emulator
):
    """150 jobs in flight at once in one worker: every event is published once and no job is
    requeued for a connection pool that ran dry (redis-py's default pool holds 100)."""
    import subprocess
    import sys

    from tests.pipeline import outputs, worker_env
    from tests.test_pipeline import deliver

    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 1.0}).raise_for_status()
    events = [sample_event() for _ in range(150)]
    deliver(pipeline, *events)
    worker = subprocess.run(
        [sys.executable, "-m", "cli.main", "worker", "--concurrency", "150", "--burst"],
        env=worker_env(pipeline, LOG_LEVEL="INFO", LOG_FORMAT="json", METRICS_PORT="0"),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    published = [entry["event_id"] for entry in outputs(redis_client)]
    assert sorted(published) == sorted(e["eventId"] for e in events)
    logs = worker.stdout + worker.stderr
    assert "MaxConnectionsError" not in logs
    assert "requeued" not in logs


def test_redis_steps_held_by_an_outage_leave_lookups_and_housekeeping_free(pipeline):
    """During an outage, up to 256 give-backs may each wait for Redis on a thread. They wait on the
    worker's own few step threads: a user lookup (the default thread pool) still runs at once, and
    the steps wait their turn (the housekeeping tick has a thread of its own, outside any pool)."""
    import threading

    import redis as sync_redis

    from workers.worker import STEP_THREADS, AsyncWorker

    connection = sync_redis.Redis.from_url(pipeline.redis_url)
    queue = Queue(pipeline.ingest_queue, connection=connection, serializer=JSONSerializer)
    outage = threading.Event()
    started = threading.Semaphore(0)

    def give_back_during_an_outage() -> str:
        started.release()
        outage.wait(timeout=30)
        return "given back"

    async def scenario() -> tuple[str, list[str]]:
        worker = AsyncWorker(pipeline, connection, queue, concurrency=8)
        try:
            steps = [asyncio.ensure_future(worker._blocking(give_back_during_an_outage)) for _ in range(256)]
            for _ in range(STEP_THREADS):
                await asyncio.to_thread(started.acquire)
            lookup = await asyncio.wait_for(asyncio.to_thread(lambda: "user found"), timeout=10)
            outage.set()
            return lookup, await asyncio.gather(*steps)
        finally:
            outage.set()
            worker._step_threads.shutdown(wait=False)
            await worker.redis.aclose()

    try:
        lookup, given_back = asyncio.run(scenario())
    finally:
        connection.close()
    assert lookup == "user found"
    assert given_back == ["given back"] * 256


def test_a_housekeeping_step_that_raises_is_logged_and_its_thread_goes_on(pipeline, capsys):
    """An unexpected error in one tick must not end the thread: RQ's view (state, heartbeat) would go
    stale for the rest of the worker's life."""
    import threading

    import redis as sync_redis

    from workers.worker import AsyncWorker

    connection = sync_redis.Redis.from_url(pipeline.redis_url)
    queue = Queue(pipeline.ingest_queue, connection=connection, serializer=JSONSerializer)
    calls: list[int] = []
    twice = threading.Event()

    def step() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug in one tick")
        twice.set()

    async def scenario() -> None:
        worker = AsyncWorker(pipeline, connection, queue, concurrency=1)
        try:
            worker.housekeeping._every(0.01, step, "test-step")
            assert await asyncio.to_thread(twice.wait, 10)
        finally:
            worker.housekeeping._stopping.set()
            for thread in worker.housekeeping._threads:
                thread.join(timeout=10)
            worker._step_threads.shutdown(wait=False)
            await worker.redis.aclose()

    try:
        asyncio.run(scenario())
    finally:
        connection.close()
    assert "worker housekeeping step failed" in capsys.readouterr().out
