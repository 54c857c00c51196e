"""The async worker writes RQ's bookkeeping itself, in batches (workers/batch.py): RQ's own public
API must read it back as if RQ had written it, after every outcome.

The SIGTERM and SIGKILL cases are in tests/test_pipeline.py and tests/drills (worker kill,
stranded jobs); here: the key layout, a finished job, a failed job and ``rq requeue``, a retry
on RQ's schedule, the worker in ``rq info`` and ``Worker.all()``, and jobs in flight in the
started registry while they run.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
from rq import Queue, Worker
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from cli.samples import sample_event
from core.redis.jobs import RETRY_INTERVALS, job_id_for
from tests.pipeline import inject, outputs, run_worker_burst, worker_env
from tests.spoiled import SPOILED_STREAMS
from tests.test_pipeline import deliver
from workers import batch

QUEUE = "smartcar-events"


def fetch(redis_client, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)


def test_rq_key_layout_is_the_one_the_batched_scripts_write():
    """If RQ moves a key or renumbers a result type, this fails before any job is mis-recorded."""
    assert batch.JOB_PREFIX == "rq:job:"
    assert Job.key_for("j") == "rq:job:j"
    assert batch.RESULTS_PREFIX == "rq:results:"
    assert Result.get_key("j") == "rq:results:j"
    assert Execution("e", "j", None).key == batch.EXECUTION_PREFIX + "j:e"  # type: ignore[arg-type]
    assert Execution("e", "j", None).composite_key == "j:e"  # type: ignore[arg-type]
    assert StartedJobRegistry.key_template.format(QUEUE) == f"rq:wip:{QUEUE}"
    assert FinishedJobRegistry.key_template.format(QUEUE) == f"rq:finished:{QUEUE}"
    assert WORKER_EXECUTIONS_KEY_TEMPLATE.format("w") == "rq:worker:w:executions"
    assert Result.Type.SUCCESSFUL.value == 1
    assert JobStatus.STARTED.value == "started"
    assert JobStatus.FINISHED.value == "finished"


def test_a_finished_job_reads_back_through_rq(pipeline, redis_client):
    """Status, result, registries and the worker's counters of a job the batch recorded."""
    event = sample_event()
    deliver(pipeline, event)
    job_id = job_id_for(event["eventId"])
    assert fetch(redis_client, job_id).get_status() == JobStatus.QUEUED
    run_worker_burst(pipeline)
    job = fetch(redis_client, job_id)
    assert job.get_status() == JobStatus.FINISHED
    assert job.started_at is not None
    assert job.ended_at is not None
    assert job.ended_at >= job.started_at
    result = job.latest_result()
    assert result is not None
    assert result.type == Result.Type.SUCCESSFUL
    assert result.return_value == job.return_value()
    assert job.return_value()["status"] == "published"
    assert job.return_value()["eventId"] == event["eventId"]
    assert job_id in FinishedJobRegistry(QUEUE, connection=redis_client).get_job_ids()
    assert StartedJobRegistry(QUEUE, connection=redis_client).get_job_ids() == []
    assert 0 < redis_client.ttl(Job.key_for(job_id)) <= pipeline.job_result_ttl_seconds
    assert redis_client.keys("rq:execution:*") == []


@pytest.mark.process
@pytest.mark.parametrize("refusal", list(SPOILED_STREAMS))
def test_a_failed_job_has_its_exception_and_rq_requeue_runs_it_again(pipeline, redis_client, refusal):
    """A job that raised (Redis refused the XADD) is failed with RQ's exception text, its event left
    unmarked; once the key is fixed, `rq requeue` runs it and it is published."""
    SPOILED_STREAMS[refusal](redis_client, "smartcar:vehicle-events")
    event = sample_event()
    deliver(pipeline, event)
    job_id = job_id_for(event["eventId"])
    run_worker_burst(pipeline)
    job = fetch(redis_client, job_id)
    assert job.get_status() == JobStatus.FAILED
    assert job_id in FailedJobRegistry(QUEUE, connection=redis_client).get_job_ids()
    result = job.latest_result()
    assert result is not None
    assert result.type == Result.Type.FAILED
    assert refusal in (result.exc_string or "")
    assert StartedJobRegistry(QUEUE, connection=redis_client).get_job_ids() == []

    redis_client.delete("smartcar:vehicle-events")
    requeue = subprocess.run(
        [sys.executable, "-m", "rq.cli", "requeue", "--all", "--queue", QUEUE, "--url", pipeline.redis_url,
         "--serializer", "rq.serializers.JSONSerializer"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert requeue.returncode == 0, requeue.stderr
    assert fetch(redis_client, job_id).get_status() == JobStatus.QUEUED
    run_worker_burst(pipeline)
    assert fetch(redis_client, job_id).get_status() == JobStatus.FINISHED
    assert [entry["event_id"] for entry in outputs(redis_client)] == [event["eventId"]]
    assert FailedJobRegistry(QUEUE, connection=redis_client).count == 0


def test_a_transient_failure_is_retried_on_rqs_schedule(pipeline, redis_client, emulator):
    """Smartcar answering 503: the job is scheduled again after RQ's first retry interval, one
    retry spent, visible in the ScheduledJobRegistry."""
    settings = pipeline.model_copy(update={"job_retries": 2})
    inject(emulator, path="/v3/vehicles/{id}/signals", status=503, rate=1.0)
    event = sample_event()
    deliver(settings, event)
    job_id = job_id_for(event["eventId"])
    before = time.time()
    run_worker_burst(settings)
    job = fetch(redis_client, job_id)
    assert job.get_status() == JobStatus.SCHEDULED
    assert job.retries_left == 1
    scheduled = ScheduledJobRegistry(QUEUE, connection=redis_client)
    assert scheduled.get_job_ids() == [job_id]
    when = scheduled.get_scheduled_time(job_id).timestamp()
    assert before + RETRY_INTERVALS[0] - 1 <= when <= time.time() + RETRY_INTERVALS[0] + 1
    assert outputs(redis_client) == []
    assert FailedJobRegistry(QUEUE, connection=redis_client).count == 0


@pytest.mark.process
def test_rq_sees_the_worker_and_its_jobs_in_flight(pipeline, redis_client, emulator):
    """`rq info` and Worker.all() list the running worker, busy while jobs run; the started registry
    holds exactly the jobs in flight; after SIGTERM the worker is gone and every job finished."""
    # Long enough that the jobs are still in flight when SIGTERM comes, after the checks and `rq info`
    # (2 s was not, on a slow machine: the worker had finished them and started the other two).
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 8.0}).raise_for_status()
    events = [sample_event() for _ in range(6)]
    deliver(pipeline, *events)
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker", "--concurrency", "4"], env=worker_env(pipeline)
    )
    try:
        started = StartedJobRegistry(QUEUE, connection=redis_client)
        deadline = time.monotonic() + 30
        while started.count < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        in_flight = set(started.get_job_ids())
        assert len(in_flight) == 4
        assert {fetch(redis_client, j).get_status() for j in in_flight} == {JobStatus.STARTED}
        queued = Queue(QUEUE, connection=redis_client, serializer=JSONSerializer).job_ids
        assert len(queued) == 2
        assert not in_flight & set(queued)
        [rq_worker] = Worker.all(connection=redis_client)
        assert rq_worker.get_state() == "busy"
        assert {fetch(redis_client, j).worker_name for j in in_flight} == {rq_worker.name}
        info = subprocess.run(
            [sys.executable, "-m", "rq.cli", "info", "--url", pipeline.redis_url, "--only-workers"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert info.returncode == 0, info.stderr
        assert rq_worker.name in info.stdout
        assert "busy" in info.stdout
        worker.terminate()
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    # Warm shutdown: the jobs in flight finished; the two never started stay queued for the next worker.
    assert {fetch(redis_client, j).get_status() for j in in_flight} == {JobStatus.FINISHED}
    assert len(outputs(redis_client)) == 4
    assert Worker.all(connection=redis_client) == []
    assert started.count == 0


def test_each_script_can_run_again_after_a_lost_answer(redis_url, redis_client):
    """claim, start and finish re-run (as after an answer lost to a Redis restart) do nothing twice:
    the claim hands back the ids already held, the start reports the same execution, the finish
    writes one result."""
    from redis.asyncio import Redis as AsyncRedis

    from core.redis.jobs import JobOptions, build_job_hash, job_payload

    job_id, mapping = build_job_hash(job_payload("e1", "VEHICLE_STATE", "{}", 0), JobOptions(queue=QUEUE, retries=0))
    redis_client.hset(Job.key_for(job_id), mapping=mapping)
    redis_client.rpush(f"rq:queue:{QUEUE}", job_id)

    async def scenario() -> None:
        client = AsyncRedis.from_url(redis_url)
        books = batch.Bookkeeping(client, QUEUE, "w1")
        [claimed_job] = await books.claim(10)
        [again] = await books.claim(10)  # the first answer "lost": the list still holds it
        assert again.job_id == claimed_job.job_id
        [started] = await books.start([claimed_job], 90)
        [restarted] = await books.start([claimed_job], 90)  # same execution id: reported, not doubled
        assert restarted.composite == started.composite
        assert await books.claim(10) == []
        assert await books.lost_executions(set()) == [started.composite]
        assert await books.lost_executions({started.composite}) == []
        started.result = {"ok": True}
        assert await books.finish([started]) == 1
        assert await books.finish([started]) == 0
        await client.aclose()

    asyncio.run(scenario())
    assert redis_client.xlen(Result.get_key(job_id)) == 1
    job = fetch(redis_client, job_id)
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == {"ok": True}
    assert redis_client.zcard(f"rq:wip:{QUEUE}") == 0
    assert redis_client.scard(WORKER_EXECUTIONS_KEY_TEMPLATE.format("w1")) == 0
    assert redis_client.hget("rq:worker:w1", "successful_job_count") == b"1"


def test_a_job_key_spoiled_between_claim_and_start_is_dropped_and_the_rest_start(redis_url, redis_client):
    """A job key set to a string after the claim read it (the web's Redis user may write job keys)
    refused the start's HSET halfway: the jobs before it said started in no registry, the worker
    exited, and its reap left them (only queued jobs go back). The start drops that id alone."""
    from redis.asyncio import Redis as AsyncRedis

    from core.redis.jobs import JobOptions, build_job_hash, job_payload

    ids = []
    for name in ("s1", "s2", "s3"):
        job_id, mapping = build_job_hash(job_payload(name, "VEHICLE_STATE", "{}", 0), JobOptions(queue=QUEUE))
        redis_client.hset(Job.key_for(job_id), mapping=mapping)
        redis_client.rpush(f"rq:queue:{QUEUE}", job_id)
        ids.append(job_id)

    async def scenario() -> list[str]:
        client = AsyncRedis.from_url(redis_url)
        try:
            books = batch.Bookkeeping(client, QUEUE, "w1")
            claimed = await books.claim(10)
            await client.set(Job.key_for(ids[1]), "spoiled")
            return [claimed_job.job_id for claimed_job in await books.start(claimed, 90)]
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [ids[0], ids[2]]
    assert StartedJobRegistry(QUEUE, connection=redis_client).get_job_ids() == [ids[0], ids[2]]
    assert redis_client.get(Job.key_for(ids[1])) == b"spoiled"
    assert redis_client.llen("smartcar-ingest:dequeued:" + QUEUE + ":w1") == 0


def test_the_finish_keeps_each_result_as_its_result_ttl_says(redis_url, redis_client):
    """As RQ: a result TTL of 0 deletes the job, a negative one keeps it and its result for good
    (scored +inf for -1, else the TTL), a positive one expires both and scores the finished registry
    at the end plus the TTL; a TTL no EXPIRE takes (a job hash this service never writes) is cut,
    and fails nothing."""
    from redis.asyncio import Redis as AsyncRedis

    from core.redis.jobs import JobOptions, build_job_hash, job_payload

    ids = {}
    for ttl in (0, -1, -5, 100, 10**30):
        options = JobOptions(queue=QUEUE, retries=0)
        job_id, mapping = build_job_hash(job_payload(f"ttl{ttl}", "VEHICLE_STATE", "{}", 0), options)
        redis_client.hset(Job.key_for(job_id), mapping=mapping | {"result_ttl": str(ttl)})
        redis_client.rpush(f"rq:queue:{QUEUE}", job_id)
        ids[ttl] = job_id

    async def scenario() -> None:
        client = AsyncRedis.from_url(redis_url)
        books = batch.Bookkeeping(client, QUEUE, "w1")
        started = await books.start(await books.claim(10), 90)
        for claimed_job in started:
            claimed_job.result = {"ok": True}
        assert await books.finish(started) == 5
        await client.aclose()

    before = time.time()
    asyncio.run(scenario())
    after = time.time()
    finished = dict(redis_client.zrange(f"rq:finished:{QUEUE}", 0, -1, withscores=True))
    assert not redis_client.exists(Job.key_for(ids[0]))
    assert ids[0].encode() not in finished
    kept = fetch(redis_client, ids[-1])
    assert kept.get_status() == JobStatus.FINISHED
    assert kept.return_value() == {"ok": True}
    assert redis_client.ttl(Job.key_for(ids[-1])) == -1
    assert redis_client.ttl(Result.get_key(ids[-1])) == -1
    assert finished[ids[-1].encode()] == float("inf")
    assert finished[ids[-5].encode()] == -5
    assert redis_client.ttl(Job.key_for(ids[-5])) == -1
    expiring = fetch(redis_client, ids[100])
    assert expiring.get_status() == JobStatus.FINISHED
    assert expiring.return_value() == {"ok": True}
    assert 0 < redis_client.ttl(Job.key_for(ids[100])) <= 100
    assert 0 < redis_client.ttl(Result.get_key(ids[100])) <= 100
    assert before + 100 - 1 <= finished[ids[100].encode()] <= after + 100
    assert fetch(redis_client, ids[10**30]).get_status() == JobStatus.FINISHED
    assert redis_client.ttl(Job.key_for(ids[10**30])) > 10**12


def test_a_job_with_its_body_as_text_is_read_as_rq_reads_it(redis_url, redis_client):
    """Jobs written with the body as a JSON string (replay, the spool's drain, RQ's own enqueue)
    share the spliced jobs' head and tail; the worker must not take them for spliced ones."""
    from redis.asyncio import Redis as AsyncRedis

    from core.redis.inbox import Inbox
    from core.redis.jobs import JobOptions, job_payload, spliced_job_data
    from workers.jobs import admit

    body = '{"eventId":"e2","eventType":"VEHICLE_STATE","x":",\\"body\\":{"}'

    async def accept_text() -> None:
        client = AsyncRedis.from_url(redis_url)
        await Inbox(client, JobOptions(queue=QUEUE, retries=0), "parked", 60).accept("e2", "VEHICLE_STATE", body, 1234)
        await client.aclose()

    asyncio.run(accept_text())
    stored = redis_client.hgetall(Job.key_for("e2"))
    text_data = stored[b"data"]
    spliced_data = spliced_job_data("e2", "VEHICLE_STATE", body.encode(), 1234)
    # A delivery is spliced byte for byte, whitespace before its object included.
    padded_body = "\n  " + body
    padded_data = spliced_job_data("e2", "VEHICLE_STATE", padded_body.encode(), 1234)
    for data, expected in ((text_data, body), (spliced_data, body), (padded_data, padded_body)):
        claimed_job = batch.ClaimedJob("j", stored | {b"data": data})
        assert admit(claimed_job, redis_client, 262_144) == job_payload("e2", "VEHICLE_STATE", expected, 1234)
