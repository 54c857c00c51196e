"""Whoever can write to Redis must not run code in the workers: only ingest jobs are executed."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from rq import Queue
from rq.callbacks import Callback
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from cli.samples import encode, sample_event
from core.redis.jobs import PROCESS_EVENT, JobOptions, deflated, inflated, job_payload, spliced_job_data
from core.redis.keys import job_id_for
from tests.pipeline import outputs, run_worker_burst
from tests.test_inbox import accept
from workers.batch import ClaimedJob
from workers.jobs import admit


def _queue(client: redis.Redis, name: str) -> Queue:
    return Queue(name, connection=client, serializer=JSONSerializer)


def test_worker_refuses_a_job_naming_another_function(pipeline, redis_client, tmp_path: Path):
    """A JSON job calling os.mkdir, written straight into the ingest queue, is never run and is failed."""
    target = tmp_path / "pwned"
    job = _queue(redis_client, pipeline.ingest_queue).enqueue("os.mkdir", str(target))
    run_worker_burst(pipeline)
    assert not target.exists()
    assert job.id in FailedJobRegistry(pipeline.ingest_queue, connection=redis_client)
    refused = Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer)
    assert refused.get_status() == JobStatus.FAILED
    assert "Refused by smartcar-ingest: the job names a function other than" in refused.latest_result().exc_string
    assert redis_client.llen(_queue(redis_client, pipeline.ingest_queue).intermediate_queue_key) == 0


def test_worker_refuses_callbacks_on_an_ingest_job(pipeline, redis_client, tmp_path: Path):
    """process_event carrying a success or failure callback is refused: RQ would import and call them."""
    event = sample_event()
    payload = job_payload(event["eventId"], "VEHICLE_STATE", encode(event).decode(), 0)
    queue = _queue(redis_client, pipeline.ingest_queue)
    with_success = queue.enqueue(PROCESS_EVENT, payload, on_success=Callback("os.getcwd"))
    with_failure = queue.enqueue(PROCESS_EVENT, payload, on_failure=Callback("os.getcwd"))
    run_worker_burst(pipeline)
    failed = FailedJobRegistry(pipeline.ingest_queue, connection=redis_client)
    assert with_success.id in failed
    assert with_failure.id in failed
    assert outputs(redis_client) == []


def test_genuine_jobs_still_run_beside_refused_ones(pipeline, redis_client):
    """A refused job does not stop the worker: the genuine event queued after it is published."""
    queue = _queue(redis_client, pipeline.ingest_queue)
    queue.enqueue("subprocess.run", ["true"])
    event = sample_event()
    queue.enqueue(PROCESS_EVENT, job_payload(event["eventId"], "VEHICLE_STATE", encode(event).decode(), 0))
    run_worker_burst(pipeline)
    assert [entry["event_id"] for entry in outputs(redis_client)] == [event["eventId"]]


def test_refusal_reasons(redis_client):
    """Odd argument shapes are refused too; the job the web writes is admitted."""
    queue = _queue(redis_client, "admission-test")

    def refusal_of(job: Job) -> str | None:
        admitted = admit(ClaimedJob(job.id, redis_client.hgetall(job.key)), redis_client, 262_144)
        return admitted if isinstance(admitted, str) else None

    assert refusal_of(queue.enqueue(PROCESS_EVENT, "not a dict")) == "the job's arguments are not one JSON object"
    assert refusal_of(queue.enqueue(PROCESS_EVENT, {}, {})) == "the job's arguments are not one JSON object"
    assert refusal_of(queue.enqueue(PROCESS_EVENT, payload={})) == "the job's arguments are not one JSON object"
    assert refusal_of(queue.enqueue("os.getcwd", {})) == "the job names a function other than process_event"
    assert refusal_of(queue.enqueue(PROCESS_EVENT, {}, on_success=Callback("os.getcwd"))) == "the job carries callbacks"
    assert refusal_of(queue.enqueue(PROCESS_EVENT, {"eventId": "e"})) is None


def test_a_job_hash_rq_cannot_load_is_refused_and_the_worker_goes_on(pipeline, redis_client):
    """Anyone who can write to Redis can queue a hash RQ cannot even restore (here a created_at that
    is not a time): it goes to the failed registry, left as found, and the next job still runs."""
    redis_client.hset(Job.key_for("unloadable"), mapping={"created_at": "not a time", "data": "{"})
    redis_client.rpush(f"rq:queue:{pipeline.ingest_queue}", "unloadable")
    event = sample_event()
    queue = Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    queue.enqueue(PROCESS_EVENT, job_payload(event["eventId"], "VEHICLE_STATE", encode(event).decode(), 0))
    run_worker_burst(pipeline)
    assert "unloadable" in FailedJobRegistry(pipeline.ingest_queue, connection=redis_client).get_job_ids()
    assert redis_client.hget(Job.key_for("unloadable"), "status") == b"failed"
    assert redis_client.hget(Job.key_for("unloadable"), "data") == b"{"
    assert 0 < redis_client.ttl(Job.key_for("unloadable")) <= 7 * 24 * 3600  # gone with its registry entry
    assert redis_client.xlen(Result.get_key("unloadable")) == 1  # the refusal's reason, for RQ's tools
    assert [entry["event_id"] for entry in outputs(redis_client)] == [event["eventId"]]


def test_a_queued_id_whose_key_is_not_a_hash_is_dropped_and_the_worker_goes_on(pipeline, redis_client):
    """A web pod's Redis user may write job keys and push ids: an id whose job key holds a string
    crashed every worker that claimed it (and a reaper put it back for the next). It is dropped as a
    job deleted while queued, its key left as found, and the next job runs."""
    redis_client.set(Job.key_for("not-a-hash"), "spoiled")
    redis_client.rpush(f"rq:queue:{pipeline.ingest_queue}", "not-a-hash")
    event = sample_event()
    queue = Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    queue.enqueue(PROCESS_EVENT, job_payload(event["eventId"], "VEHICLE_STATE", encode(event).decode(), 0))
    run_worker_burst(pipeline)
    assert [entry["event_id"] for entry in outputs(redis_client)] == [event["eventId"]]
    assert redis_client.get(Job.key_for("not-a-hash")) == b"spoiled"
    assert redis_client.llen(f"rq:queue:{pipeline.ingest_queue}") == 0
    assert redis_client.keys("smartcar-ingest:dequeued:*") == []


def test_a_zlib_bomb_in_a_job_hash_is_refused_without_inflating_it(pipeline, redis_client):
    """Anyone who can write to Redis can store a job whose data inflates a thousandfold (here 40 MB
    from about 40 KB). The worker refuses it unread: it never holds the inflated bytes, parks nothing,
    leaves the hash as found, and the next job still runs."""
    import tracemalloc

    body = '{"eventId":"bomb","eventType":"VEHICLE_STATE","padding":"' + "0" * 40_000_000 + '"}'
    data = zlib.compress(
        json.dumps([PROCESS_EVENT, None, [job_payload("bomb", "VEHICLE_STATE", body, 0)], {}]).encode()
    )
    del body
    assert len(data) < 100_000
    redis_client.hset(Job.key_for("bomb"), mapping={"created_at": "2026-12-06T00:00:00.000000Z", "data": data})
    redis_client.rpush(f"rq:queue:{pipeline.ingest_queue}", "bomb")
    event = sample_event()
    queue = Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    queue.enqueue(PROCESS_EVENT, job_payload(event["eventId"], "VEHICLE_STATE", encode(event).decode(), 0))
    tracemalloc.start()
    try:
        run_worker_burst(pipeline)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"traced peak while refusing the bomb: {peak} bytes")
    assert peak < 20_000_000, f"the worker held {peak} bytes while refusing the job"
    assert "bomb" in FailedJobRegistry(pipeline.ingest_queue, connection=redis_client).get_job_ids()
    assert redis_client.hget(Job.key_for("bomb"), "data") == data
    assert redis_client.xlen(pipeline.parked_stream) == 0
    assert [entry["event_id"] for entry in outputs(redis_client)] == [event["eventId"]]


def test_a_due_retry_whose_job_cannot_be_loaded_is_dropped_and_the_others_are_queued(redis_client):
    """RQ's scheduler loads every due retry of a queue at once: one id whose job key holds a string
    (or a hash RQ cannot restore) failed it on every pass, and the scheduler process with it, so no
    retry of that queue was ever queued again. Such ids leave the scheduled registry first."""
    from rq.registry import ScheduledJobRegistry

    from workers.housekeeping import PatientScheduler

    name = "scheduled-test"
    queue = _queue(redis_client, name)
    genuine = queue.enqueue(PROCESS_EVENT, {"eventId": "due"})
    redis_client.delete(f"rq:queue:{name}")
    registry = ScheduledJobRegistry(name, connection=redis_client, serializer=JSONSerializer)
    redis_client.set(Job.key_for("a-string"), "spoiled")
    redis_client.hset(Job.key_for("unloadable"), mapping={"created_at": "not a time", "data": "{"})
    for job_id in (genuine.id, "a-string", "unloadable"):
        redis_client.zadd(registry.key, {job_id: 1})
    scheduler = PatientScheduler([queue], connection=redis_client, serializer=JSONSerializer)
    assert scheduler.acquire_locks() == {name}
    try:
        scheduler.enqueue_scheduled_jobs()
    finally:
        scheduler.release_locks()
    assert redis_client.lrange(f"rq:queue:{name}", 0, -1) == [genuine.id.encode()]
    assert registry.get_job_ids() == []
    assert redis_client.get(Job.key_for("a-string")) == b"spoiled"
    # the hash is refused as the worker refuses one: failed, with the reason, left as found
    assert FailedJobRegistry(name, connection=redis_client).get_job_ids() == ["unloadable"]
    assert redis_client.hget(Job.key_for("unloadable"), "status") == b"failed"
    assert redis_client.hget(Job.key_for("unloadable"), "data") == b"{"


def _rq_reads(raw: bytes) -> bytes:
    """A job's data as RQ's ``Job.restore`` reads it: inflated when the stdlib's zlib takes it, else as stored."""
    try:
        return zlib.decompress(raw)
    except zlib.error:
        return raw


@settings(max_examples=300, deadline=None)
@given(
    plain=st.binary(max_size=300),
    cut=st.integers(min_value=0, max_value=400),
    tail=st.binary(max_size=8),
    form=st.sampled_from(["plain", "deflated", "stdlib", "cut", "tail"]),
)
def test_the_worker_reads_a_jobs_data_as_rq_reads_it(plain, cut, tail, form):
    """Whatever a job's data holds (plain bytes, a zlib stream from the edge or from RQ, one cut short,
    one with bytes after it), the worker's inflation gives RQ's reading of it, within the limit."""
    raw = {
        "plain": plain,
        "deflated": deflated(plain),
        "stdlib": zlib.compress(plain),
        "cut": deflated(plain)[:cut],
        "tail": deflated(plain) + tail,
    }[form]
    assert inflated(raw, 10_000) == _rq_reads(raw)
    expected = _rq_reads(raw)
    assert inflated(raw, len(expected)) == expected
    if expected:
        assert inflated(raw, len(expected) - 1) is None


def test_edge_jobs_are_admitted_deflated_and_plain_alike(redis_client):
    """The edge deflates each job's data; a job an earlier release queued holds it plain. Both are read
    as the same payload through the spliced path, and RQ's own reading of the deflated one agrees."""
    event = sample_event()
    body = encode(event)
    spliced = spliced_job_data(event["eventId"], "VEHICLE_STATE", body, 7)
    expected = {"eventId": event["eventId"], "eventType": "VEHICLE_STATE", "body": body.decode(), "receivedAt": 7}
    for data in (deflated(spliced), spliced):
        assert admit(ClaimedJob("j", {b"data": data}), redis_client, 262_144) == expected
    job = Job("j", connection=redis_client, serializer=JSONSerializer)
    job.restore({b"data": deflated(spliced), b"created_at": b"2026-12-06T00:00:00.000000Z"})
    assert job.func_name == PROCESS_EVENT
    assert job.args[0]["body"] == event
    assert len(deflated(spliced)) < len(spliced) / 2


def test_a_job_an_earlier_release_queued_with_its_data_plain_is_still_published(pipeline, redis_client):
    """During a rollout, jobs queued by the earlier edge hold their data plain: the worker publishes
    them beside the deflated ones."""
    events = [sample_event(), sample_event()]
    options = JobOptions.from_settings(pipeline)
    payloads = [job_payload(e["eventId"], "VEHICLE_STATE", encode(e).decode(), 0) for e in events]
    assert accept(pipeline.redis_url, *payloads, options=options) == [True, True]
    earlier = Job.key_for(job_id_for(events[0]["eventId"]))
    redis_client.hset(earlier, "data", zlib.decompress(redis_client.hget(earlier, "data")))
    run_worker_burst(pipeline)
    assert sorted(entry["event_id"] for entry in outputs(redis_client)) == sorted(e["eventId"] for e in events)
