"""The inbox's fast job template and group commit, checked against RQ itself and a real Redis."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from cli.samples import encode, sample_event
from core.redis.inbox import GroupCommitter, Inbox
from core.redis.jobs import JobOptions, JobTemplate, build_job_hash, job_payload


def test_template_hash_matches_rqs_own_hash():
    """Apart from timestamps and compression, the template writes exactly what RQ's Job writes."""
    options = JobOptions(queue="smartcar-events", timeout_seconds=90, retries=3)
    payload = job_payload("evt-1", "VEHICLE_STATE", encode(sample_event()).decode(), 123)
    ours_id, ours = JobTemplate(options).build(payload)
    rq_id, reference = build_job_hash(payload, options)
    assert ours_id == rq_id
    assert set(ours) == set(reference)
    for key in set(ours) - {"created_at", "enqueued_at", "data"}:
        assert ours[key] == reference[key], key


def test_rq_reads_a_template_job_like_its_own(redis_client):
    """A job written from the template is fetched by RQ with its function, args and options."""
    options = JobOptions(queue="smartcar-events", timeout_seconds=90, retries=3)
    payload = job_payload("evt-2", "VEHICLE_ERROR", '{"a":"b \\"quoted\\" é"}', 456)
    job_id, mapping = JobTemplate(options).build(payload)
    redis_client.hset(Job.key_for(job_id), mapping=mapping)
    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    assert job.func_name == "workers.jobs.process_event"
    assert job.args == (payload,) or list(job.args) == [payload]
    assert job.kwargs == {}
    assert job.origin == "smartcar-events"
    assert job.timeout == 90
    assert job.retries_left == 3
    assert job.get_status() == "queued"
    assert job.description == "process_event(VEHICLE_ERROR evt-2)"
    assert job.enqueued_at is not None


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


def test_group_commit_failure_reaches_every_waiter(redis_url):
    """When Redis fails, every caller of the batch gets the error rather than hanging."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def scenario():
        redis = AsyncRedis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        template = JobTemplate(JobOptions("q"))
        committer = GroupCommitter(redis, "q", 60, template.constant)
        jobs = [template.variable(job_payload(f"x{i}", "VEHICLE_STATE", "{}", 1)) for i in range(10)]
        outcomes = await asyncio.gather(*(committer.submit(j) for j in jobs), return_exceptions=True)
        await redis.aclose()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, RedisConnectionError | OSError) for o in outcomes)
