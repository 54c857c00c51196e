"""The one park path: web and worker park through ParkedStream; repeats park once, differences never vanish."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError
from rq.job import Job
from rq.serializers import JSONSerializer

from core.redis.dedupe import parked_marks
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions
from core.redis.parked import ParkedStream, count_by_reason, replay_parked
from tests.contracts import check_parked_entry
from tests.marks import recall
from tests.spoiled import SPOILED_STREAMS

STREAM = "smartcar:parked"


def run(redis_url: str, scenario):
    async def wrapped():
        redis = AsyncRedis.from_url(redis_url)
        try:
            return await scenario(redis)
        finally:
            await redis.aclose()

    return asyncio.run(wrapped())


def entries(redis_client) -> list[dict[str, str]]:
    found = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in redis_client.xrange(STREAM, "-", "+")]
    for entry in found:
        check_parked_entry(entry)
    return found


def test_a_retried_park_of_the_same_event_is_kept_once(redis_url, redis_client):
    """A worker re-running a job (crash after parking, RQ retry) parks the event once."""

    async def scenario(redis):
        parked = ParkedStream(redis, STREAM, 60)
        first = await parked.park("ev-1", "unknown_user", "No internal user.", '{"eventId":"ev-1"}')
        again = await parked.park("ev-1", "unknown_user", "No internal user.", '{"eventId":"ev-1"}')
        return first, again

    first, again = run(redis_url, scenario)
    assert first is not None
    assert again is None
    assert len(entries(redis_client)) == 1


def test_concurrent_parks_of_one_event_write_one_entry(redis_url, redis_client):
    """Racing redeliveries of one broken delivery: one entry, whatever the interleaving."""

    async def scenario(redis):
        inbox = Inbox(redis, JobOptions("q"), STREAM, 60)
        return await asyncio.gather(
            *(inbox.parked.park("ev-race", "invalid_payload", "Bad.", '{"eventId":"ev-race"}') for _ in range(20))
        )

    results = run(redis_url, scenario)
    assert sum(entry_id is not None for entry_id in results) == 1
    assert len(entries(redis_client)) == 1


def test_web_and_worker_parks_of_one_event_with_different_reasons_are_both_kept(redis_url, redis_client):
    """The edge parked a broken delivery of X; a later valid delivery of X fails in the worker: both stay."""

    async def scenario(redis):
        web = Inbox(redis, JobOptions("q"), STREAM, 60)
        worker = ParkedStream(redis, STREAM, 60)
        await web.parked.park("ev-2", "invalid_payload", "Bad.", '{"eventId":"ev-2","data":1}')
        return await worker.park("ev-2", "unknown_user", "No user.", '{"eventId":"ev-2","data":{}}')

    assert run(redis_url, scenario) is not None
    assert [e["reason"] for e in entries(redis_client)] == ["invalid_payload", "unknown_user"]


def test_same_reason_with_a_different_body_is_kept(redis_url, redis_client):
    """Two different bodies under one eventId are two facts: neither may be dropped."""

    async def scenario(redis):
        parked = ParkedStream(redis, STREAM, 60)
        await parked.park("ev-3", "invalid_payload", "Bad.", '{"eventId":"ev-3","v":1}')
        return await parked.park("ev-3", "invalid_payload", "Bad.", '{"eventId":"ev-3","v":2}')

    assert run(redis_url, scenario) is not None
    assert len(entries(redis_client)) == 2


def test_a_replayed_event_that_fails_again_is_parked_again(redis_url, redis_client):
    """Replay clears the parked mark with the entry: the re-run's identical park must not vanish."""
    body = '{"eventId":"ev-4","eventType":"VEHICLE_STATE"}'
    options = JobOptions("q")

    async def scenario(redis):
        parked = ParkedStream(redis, STREAM, 60)
        await parked.park("ev-4", "unknown_user", "No user.", body)
        report = await replay_parked(redis, options, STREAM)
        assert recall(redis_client, parked_marks(60), "ev-4") is None
        again = await parked.park("ev-4", "unknown_user", "No user.", body)
        return report, again

    report, again = run(redis_url, scenario)
    assert report.requeued == 1
    assert again is not None
    assert len(entries(redis_client)) == 1  # the first entry left with the replay; the second is the re-park
    job = Job.fetch("ev-4", connection=redis_client, serializer=JSONSerializer)
    assert job.args[0]["body"] == body


def test_parks_without_an_event_id_are_kept_once_per_body(redis_url, redis_client):
    """No eventId to deduplicate by: the body's own digest is the mark, so a repeat of the same bytes
    is kept once (a replayed legacy delivery cannot fill the stream) and every other body is kept."""

    async def scenario(redis):
        parked = ParkedStream(redis, STREAM, 60)
        repeats = [await parked.park(None, "invalid_payload", "Bad.", "{}") for _ in range(3)]
        other = await parked.park(None, "invalid_payload", "Bad.", '{"other": 1}')
        other_reason = await parked.park(None, "legacy_v2", "Old.", "{}")
        return repeats, other, other_reason

    repeats, other, other_reason = run(redis_url, scenario)
    assert repeats[0] is not None
    assert repeats[1:] == [None, None]
    assert other is not None
    assert other_reason is not None
    assert len(entries(redis_client)) == 3


def test_a_body_with_a_lone_surrogate_is_parked_as_its_escape(redis_url, redis_client):
    """Text Redis cannot store (a lone surrogate from a JSON escape) is written as its escape, from either side."""

    async def scenario(redis):
        return await ParkedStream(redis, STREAM, 60).park("ev-5", "invalid_payload", "Bad.", '{"x":"\ud800"}')

    assert run(redis_url, scenario) is not None
    assert entries(redis_client)[0]["payload"] == '{"x":"\\ud800"}'


def test_count_by_reason_reads_every_reason_in_batches(redis_client):
    for i in range(1200):
        redis_client.xadd(STREAM, {"event_id": f"e{i}", "reason": "unknown_user" if i % 3 else "legacy_v2"})
    redis_client.xadd(STREAM, {"event_id": "x"})
    assert count_by_reason(redis_client, STREAM) == ({"unknown_user": 800, "legacy_v2": 400, "(none)": 1}, 1201)
    capped, scanned = count_by_reason(redis_client, STREAM, limit=700)
    assert scanned == 700
    assert sum(capped.values()) == 700


@pytest.mark.parametrize("refusal", list(SPOILED_STREAMS))
def test_a_park_redis_refuses_leaves_no_mark_and_its_retry_is_written(redis_url, redis_client, refusal):
    """The mark is written after the entry: a refused entry never leaves the event looking parked,
    so the retry (Smartcar's, or the worker's) parks it once the stream is mended."""
    SPOILED_STREAMS[refusal](redis_client, STREAM)

    async def park(redis):
        return await ParkedStream(redis, STREAM, 60).park("ev-9", "unknown_user", "No user.", '{"eventId":"ev-9"}')

    with pytest.raises(ResponseError, match=refusal):
        run(redis_url, park)
    assert recall(redis_client, parked_marks(60), "ev-9") is None
    redis_client.delete(STREAM)
    assert run(redis_url, park) is not None
    assert [entry["event_id"] for entry in entries(redis_client)] == ["ev-9"]


def test_a_replay_redis_refuses_leaves_the_entry_to_replay_again(redis_url, redis_client):
    """The job is queued before its hash is written and the entry removed: a queue key that is not a
    list fails the replay with nothing changed, and the next replay requeues the entry."""
    options = JobOptions("q")
    queue = f"rq:queue:{options.queue}"
    body = '{"eventId":"ev-8","eventType":"VEHICLE_STATE"}'
    run(redis_url, lambda redis: ParkedStream(redis, STREAM, 60).park("ev-8", "unknown_user", "No user.", body))
    redis_client.set(queue, "spoiled")

    with pytest.raises(ResponseError):
        run(redis_url, lambda redis: replay_parked(redis, options, STREAM))
    assert redis_client.exists(Job.key_for("ev-8")) == 0
    assert len(entries(redis_client)) == 1
    redis_client.delete(queue)
    report = run(redis_url, lambda redis: replay_parked(redis, options, STREAM))
    assert (report.requeued, report.busy) == (1, 0)
    assert entries(redis_client) == []
    assert redis_client.lrange(queue, 0, -1) == [b"ev-8"]


def test_a_replay_that_cannot_forget_the_mark_leaves_the_entry(redis_url, redis_client):
    """The entry leaves the stream last: when Redis refuses to forget the parked mark (a newer
    generation's hash written over with a string), the entry stays, so the event is never left
    marked parked with no entry (the replayed job's own park would be taken for a repeat)."""
    options = JobOptions("q")
    body = '{"eventId":"ev-7","eventType":"VEHICLE_STATE"}'
    now = time.time()

    async def park(redis, event_id, reason, at):
        return await ParkedStream(redis, STREAM, 60, clock=lambda: at).park(event_id, reason, "d", body)

    run(redis_url, lambda redis: park(redis, "ev-7", "unknown_user", now - 40))  # an older slot
    older = set(redis_client.scan_iter("smartcar-ingest:parked-ids:*"))
    run(redis_url, lambda redis: park(redis, "ev-new", "legacy_v2", now))
    newer = [key for key in redis_client.scan_iter("smartcar-ingest:parked-ids:*") if key not in older]
    assert newer
    for key in newer:
        redis_client.set(key, "spoiled")

    with pytest.raises(ResponseError):
        run(redis_url, lambda redis: replay_parked(redis, options, STREAM, reason="unknown_user"))
    assert "ev-7" in [entry["event_id"] for entry in entries(redis_client)]
    # a job key written over with a string is not a job: the replay writes the job over it
    redis_client.delete(*newer)
    redis_client.set(Job.key_for("ev-7"), "spoiled")
    report = run(redis_url, lambda redis: replay_parked(redis, options, STREAM, reason="unknown_user"))
    assert (report.requeued, report.busy) == (1, 0)
    assert "ev-7" not in [entry["event_id"] for entry in entries(redis_client)]
    assert redis_client.hget(Job.key_for("ev-7"), "status") == b"queued"
