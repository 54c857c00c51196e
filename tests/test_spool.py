"""The spool file: whole records in, whole records out, a torn tail detected and never applied."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.serializers import JSONSerializer

from core.inbox import Inbox, JobOptions
from core.spool import ReadReport, Spool, SpooledDelivery, read_records
from service.drain import drain_once


def delivery(i: int) -> SpooledDelivery:
    body = '{"i": ' + str(i) + ', "text": "é\\n"}'
    return SpooledDelivery(f"e-{i}", "VEHICLE_STATE", body, 1000 + i)


def test_appended_records_read_back_in_order(tmp_path):
    """Every appended delivery is read back whole and in order."""
    spool = Spool(tmp_path)
    for i in range(5):
        spool.append(delivery(i))
    [path] = spool.pending()
    report = ReadReport()
    assert list(read_records(path, report)) == [delivery(i) for i in range(5)]
    assert report.records == 5
    assert report.torn_tail_bytes == 0


def test_torn_last_record_is_detected_and_not_applied(tmp_path):
    """A crash mid-write leaves a torn tail: earlier records read, the torn one reported, not returned."""
    spool = Spool(tmp_path)
    for i in range(3):
        spool.append(delivery(i))
    [path] = spool.pending()
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    report = ReadReport()
    assert list(read_records(path, report)) == [delivery(0), delivery(1)]
    assert report.torn_tail_bytes > 0


def test_corrupt_payload_stops_the_read(tmp_path):
    """A flipped byte inside a record fails its checksum: the read stops before it."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    spool.append(delivery(1))
    [path] = spool.pending()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert list(read_records(path)) == [delivery(0)]


def test_drain_enqueues_through_the_dedupe_and_removes_the_file(tmp_path, redis_url, redis_client):
    """Draining enqueues each spooled event once (twice-spooled included) and deletes the file."""
    spool = Spool(tmp_path)
    for i in (0, 1, 2, 1):
        spool.append(delivery(i))
    spool.append(SpooledDelivery("p-1", "UNKNOWN", "{}", 5, "unknown_event_type", "Not ours."))

    async def scenario():
        redis = AsyncRedis.from_url(redis_url)
        inbox = Inbox(redis, JobOptions("smartcar-events"), "smartcar:parked", 60)
        report = await drain_once(spool, inbox)
        await redis.aclose()
        return report

    report = asyncio.run(scenario())
    assert (report.accepted, report.duplicates, report.parked) == (3, 1, 1)
    assert sorted(Queue("smartcar-events", connection=redis_client, serializer=JSONSerializer).job_ids) == [
        "e-0",
        "e-1",
        "e-2",
    ]
    assert redis_client.xlen("smartcar:parked") == 1
    assert spool.pending() == []


def test_torn_file_is_kept_for_inspection_after_draining_its_whole_records(tmp_path, redis_url, redis_client):
    """A file with a torn tail is drained up to the tear and kept as .torn."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    spool.append(delivery(1))
    [path] = spool.pending()
    path.write_bytes(path.read_bytes()[:-5])

    async def scenario():
        redis = AsyncRedis.from_url(redis_url)
        inbox = Inbox(redis, JobOptions("smartcar-events"), "smartcar:parked", 60)
        report = await drain_once(spool, inbox)
        await redis.aclose()
        return report

    report = asyncio.run(scenario())
    assert report.accepted == 1
    assert report.torn_tail_bytes > 0
    assert [p.suffix for p in tmp_path.iterdir()] == [".torn"]
    assert spool.pending() == []


def test_a_second_claim_never_overwrites_an_undrained_claim(tmp_path):
    """A file claimed while Redis was down survives the next claim of the fresh spool file."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    [first] = spool.pending()
    claimed = spool.claim(first)
    spool.append(delivery(1))
    fresh = next(p for p in spool.pending() if p.suffix == ".log")
    claimed_again = spool.claim(fresh)
    assert claimed != claimed_again
    records = [r for path in spool.pending() for r in read_records(path)]
    assert sorted(r.event_id for r in records) == ["e-0", "e-1"]
