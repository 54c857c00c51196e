"""The spool file: whole records in, whole records out, a torn tail detected and never applied."""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import REGISTRY
from pydantic import SecretStr
from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.serializers import JSONSerializer

from cli.samples import encode, sample_event
from core.config import Settings
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions
from service.app import create_app
from service.spool import (
    MAGIC,
    DrainReport,
    Spool,
    SpooledDelivery,
    drain_forever,
    drain_once,
    encode_record,
    read_records,
)
from tests.conftest import TOKEN, signed_headers
from tests.procs import LiveServer, RedisServer


def delivery(i: int) -> SpooledDelivery:
    body = '{"i": ' + str(i) + ', "text": "é\\n"}'
    return SpooledDelivery(f"e-{i}", "VEHICLE_STATE", body, 1000 + i)


def test_appended_records_read_back_in_order(tmp_path):
    """Every appended delivery is read back whole and in order."""
    spool = Spool(tmp_path)
    for i in range(5):
        spool.append(delivery(i))
    [path] = spool.pending()
    report = DrainReport()
    assert list(read_records(path, report)) == [delivery(i) for i in range(5)]
    assert report.torn_tail_bytes == 0


def test_torn_last_record_is_detected_and_not_applied(tmp_path):
    """A crash mid-write leaves a torn tail: earlier records read, the torn one reported, not returned."""
    spool = Spool(tmp_path)
    for i in range(3):
        spool.append(delivery(i))
    [path] = spool.pending()
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    report = DrainReport()
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


def whole_record(fields: dict[str, object]) -> bytes:
    """A record whose checksum holds, around whatever ``fields`` are."""
    payload = json.dumps(fields).encode()
    return struct.pack(">4sII", MAGIC, len(payload), zlib.crc32(payload)) + payload


#: Records a checksum cannot catch: written by another version, or by hand, with fields of the wrong type.
MISTYPED = {
    "received_at_ms text": {**delivery(9).__dict__, "received_at_ms": "soon"},
    "body an object": {**delivery(9).__dict__, "body": {"i": 9}},
    "event type a number": {**delivery(9).__dict__, "event_type": 5},
    "event id a list": {**delivery(9).__dict__, "event_id": ["e-9"]},
    "a field too many": {**delivery(9).__dict__, "priority": 1},
    "not an object": ["e-9"],
}


@pytest.mark.parametrize("name", MISTYPED)
def test_a_record_with_a_field_of_the_wrong_type_is_kept_for_inspection(tmp_path, redis_url, name):
    """It stops the read as a corrupt record does, and the drain keeps it in a .torn file. Before, a
    time as text or a body as an object raised a TypeError that ended the drainer's task (nothing
    spooled was drained again, and a restart met the same record), and a number or a list for an
    id or a type was enqueued as it was."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    [path] = spool.pending()
    with path.open("ab") as handle:
        handle.write(whole_record(MISTYPED[name]))  # type: ignore[arg-type]
    assert list(read_records(path)) == [delivery(0)]
    report = drain(spool, redis_url)
    assert (report.accepted, report.torn_tail_bytes > 0) == (1, True)
    assert [p.suffix for p in tmp_path.iterdir()] == [".torn"]


def drain(spool: Spool, redis_url: str):
    """One pass of the drainer over ``spool`` into the Redis at ``redis_url``; its report."""

    async def scenario():
        redis = AsyncRedis.from_url(redis_url)
        try:
            return await drain_once(spool, Inbox(redis, JobOptions("smartcar-events"), "smartcar:parked", 60))
        finally:
            await redis.aclose()

    return asyncio.run(scenario())


def test_drain_enqueues_through_the_dedupe_and_removes_the_file(tmp_path, redis_url, redis_client):
    """Draining enqueues each spooled event once (twice-spooled included) and deletes the file."""
    spool = Spool(tmp_path)
    for i in (0, 1, 2, 1):
        spool.append(delivery(i))
    spool.append(SpooledDelivery("p-1", "UNKNOWN", "{}", 5, "unknown_event_type", "Not ours."))

    report = drain(spool, redis_url)
    assert (report.accepted, report.duplicates, report.parked) == (3, 1, 1)
    assert queued_ids(redis_client) == ["e-0", "e-1", "e-2"]
    assert redis_client.xlen("smartcar:parked") == 1
    assert spool.pending() == []


def test_torn_file_is_kept_for_inspection_after_draining_its_whole_records(tmp_path, redis_url, redis_client):
    """A file with a torn tail is drained up to the tear and kept as .torn."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    spool.append(delivery(1))
    [path] = spool.pending()
    path.write_bytes(path.read_bytes()[:-5])

    report = drain(spool, redis_url)
    assert report.accepted == 1
    assert report.torn_tail_bytes > 0
    assert [p.suffix for p in tmp_path.iterdir()] == [".torn"]
    assert spool.pending() == []


class FaultyInbox(Inbox):
    """A real inbox on a real Redis, whose accept fails with a fault of ours (not Redis's, not the
    disk's) for the event ids in ``faulty``, ``times`` times each."""

    def __init__(self, redis: AsyncRedis, faulty: set[str], times: int) -> None:
        super().__init__(redis, JobOptions("smartcar-events"), "smartcar:parked", 60)
        self.faults = dict.fromkeys(faulty, times)

    async def accept(self, event_id: str, event_type: str, body: bytes | str, received_at_ms: int) -> bool:
        if self.faults.get(event_id, 0) > 0:
            self.faults[event_id] -= 1
            raise RuntimeError("a fault in the enqueue")
        return await super().accept(event_id, event_type, body, received_at_ms)


def queued_ids(redis_client: redis.Redis) -> list[str]:
    return sorted(Queue("smartcar-events", connection=redis_client, serializer=JSONSerializer).job_ids)


def test_a_file_that_fails_otherwise_than_redis_is_kept_and_the_others_drain(tmp_path, redis_url, redis_client):
    """A fault in one file's enqueue leaves that file claimed for the next pass; the other files of
    the pass still drain. Before, the error left the pass at the first file: nothing after it drained."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    spool.append(delivery(1))
    [first] = spool.pending()
    spool.claim(first)  # a file an earlier pass claimed; appends go to a fresh one
    spool.append(delivery(2))

    async def scenario(faulty: set[str]):
        client = AsyncRedis.from_url(redis_url)
        try:
            return await drain_once(spool, FaultyInbox(client, faulty, times=1))
        finally:
            await client.aclose()

    report = asyncio.run(scenario({"e-1"}))
    # the failed file's other record (its accepts end before the failure is raised) and the other file's
    assert (report.files, report.failed_files, report.accepted) == (1, 1, 2)
    assert "e-2" in queued_ids(redis_client)
    assert [p.suffix for p in spool.pending()] == [".draining"]

    report = asyncio.run(scenario(set()))  # the next pass: the kept file, its first record a repeat
    assert (report.files, report.failed_files, report.accepted) == (1, 0, 1)
    assert queued_ids(redis_client) == ["e-0", "e-1", "e-2"]
    assert spool.pending() == []


def test_the_drainer_outlives_a_fault_of_ours_and_drains_later(tmp_path, redis_url, redis_client):
    """The drainer's task keeps going after an error that is neither Redis's nor the disk's, and
    drains the delivery on a later pass. Before, such an error ended the task: the spool was not
    drained again until the process restarted."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))

    async def scenario() -> None:
        client = AsyncRedis.from_url(redis_url)
        drainer = asyncio.create_task(drain_forever(spool, FaultyInbox(client, {"e-0"}, times=2)))
        try:
            for _ in range(100):  # the fault twice, a second apart, then the drain: ≈ 2 s
                if spool.pending() == [] or drainer.done():
                    break
                await asyncio.sleep(0.1)
            assert not drainer.done(), drainer.exception()
        finally:
            drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
            await client.aclose()

    asyncio.run(scenario())
    assert queued_ids(redis_client) == ["e-0"]
    assert spool.pending() == []


def test_an_entry_that_cannot_be_examined_does_not_stop_the_drain(tmp_path, redis_url, redis_client):
    """A symbolic link in the spool directory that loops on itself makes stat fail (ELOOP). Before,
    that error ended every pass at its listing: nothing was drained again. The drainer only takes
    regular files (never a link: it would read whatever the link points at), so it drains the rest."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    loop = tmp_path / "spool-loop.log"
    loop.symlink_to(loop.name)
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_bytes(encode_record(delivery(1)))
    (tmp_path / "spool-link.log").symlink_to(elsewhere)

    report = drain(spool, redis_url)
    assert (report.files, report.accepted, report.failed_files) == (1, 1, 0)
    assert queued_ids(redis_client) == ["e-0"]
    assert loop.is_symlink()  # both links left as they were
    assert (tmp_path / "spool-link.log").is_symlink()
    assert elsewhere.read_bytes() == encode_record(delivery(1))


#: Linux's inode flag ioctls (linux/fs.h) and the flag that makes a file immutable (chattr +i).
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def set_immutable(path: Path, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        flags[0] = flags[0] | FS_IMMUTABLE_FL if on else flags[0] & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)
    finally:
        os.close(fd)


@pytest.fixture
def immutable():
    """Marks files immutable (not even root may rename them); skips where the file system cannot."""
    marked: list[Path] = []

    def mark(path: Path) -> None:
        try:
            set_immutable(path, True)
        except OSError as exc:
            pytest.skip(f"this file system keeps no immutable flag ({exc.strerror})")
        marked.append(path)

    yield mark
    for path in marked:
        with contextlib.suppress(OSError):
            set_immutable(path, False)


def failed_files_gauge() -> float | None:
    return REGISTRY.get_sample_value("smartcar_ingest_spool_failed_files")


def test_a_file_the_drainer_cannot_claim_is_left_and_the_others_drain(
    tmp_path, redis_url, redis_client, immutable, capsys, caplog
):
    """One file the drainer cannot rename (immutable: EPERM, even for root) fails on its own while
    the other files drain, counted by a gauge and logged once. Before, its OSError paused the whole
    pass, every second, for as long as the file stayed; then it was logged every second, and no
    metric said so."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    [stuck] = spool.pending()
    other = tmp_path / "spool-other-1.log"
    other.write_bytes(encode_record(delivery(1)))
    immutable(stuck)

    for _ in range(3):
        report = drain(spool, redis_url)
        assert report.failed_files == 1
        assert failed_files_gauge() == 1
    assert report.files == 0  # the other file drained on the first pass
    assert queued_ids(redis_client) == ["e-1"]
    assert spool.pending() == [stuck]  # kept as it is, for the next pass
    # Printed by structlog's default logger, or, once a test configured logging, passed to the
    # standard library (caplog), whose handler may also print it: each place holds every line once.
    printed, passed = "".join(capsys.readouterr()), caplog.text
    assert max(printed.count("spool file not drained"), passed.count("spool file not drained")) == 1
    assert "PermissionError: Operation not permitted" in printed + passed

    set_immutable(stuck, False)
    report = drain(spool, redis_url)
    assert (report.files, report.accepted, report.failed_files) == (1, 1, 0)
    assert failed_files_gauge() == 0
    assert queued_ids(redis_client) == ["e-0", "e-1"]
    assert spool.pending() == []
    assert REGISTRY.get_sample_value("smartcar_ingest_spool_bytes") == 0


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


# --- bounds: SPOOL_MAX_BYTES and streaming reads ----------------------------------------------------


def spool_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.endswith((".log", ".draining")))


def test_a_full_spool_refuses_the_append_and_writes_nothing(tmp_path):
    """An append that would pass max_bytes raises ENOSPC and leaves the file as it was."""
    record_size = len(encode_record(delivery(0)))
    spool = Spool(tmp_path, max_bytes=record_size * 3)
    for i in range(3):
        spool.append(delivery(i))
    before = spool_bytes(tmp_path)
    with pytest.raises(OSError, match="The spool holds") as refused:
        spool.append(delivery(3))
    assert refused.value.errno == errno.ENOSPC
    assert spool_bytes(tmp_path) == before == spool.pending_bytes == record_size * 3
    [path] = spool.pending()
    assert [r.event_id for r in read_records(path)] == ["e-0", "e-1", "e-2"]


@pytest.mark.process
def test_the_size_count_follows_other_processes_and_the_drainer(tmp_path, redis_url):
    """Appends by another process are counted at the next listing; a drained file stops counting."""
    spool = Spool(tmp_path, max_bytes=1_000_000)
    spool.append(delivery(0))
    script = (
        "import sys; from service.spool import Spool, SpooledDelivery; "
        "Spool(sys.argv[1]).append(SpooledDelivery('e-other', 'VEHICLE_STATE', '{}', 1))"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}
    )
    assert len(spool.pending()) == 2
    assert spool.pending_bytes == spool_bytes(tmp_path)

    assert drain(spool, redis_url).accepted == 2
    assert spool.pending_bytes == 0 == spool_bytes(tmp_path)


def test_records_are_read_one_at_a_time_not_the_whole_file(tmp_path):
    """Reading a 30 MB spool file holds about one record in memory, not the file."""
    path = tmp_path / "spool-big.log"
    body = '{"pad": "' + "x" * 3000 + '"}'
    with path.open("wb") as handle:
        for i in range(10_000):
            handle.write(encode_record(SpooledDelivery(f"e-{i}", "VEHICLE_STATE", body, i)))
    assert path.stat().st_size > 30_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_records(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 10_000
    assert peak < 1_000_000


def test_a_corrupt_length_ends_the_read_without_a_huge_allocation(tmp_path):
    """A record header claiming 4 GiB is treated as a torn tail: nothing past it is read or allocated."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    [path] = spool.pending()
    with path.open("ab") as handle:
        handle.write(struct.pack(">4sII", MAGIC, 0xFFFFFFFF, 0) + b"{}")
    report = DrainReport()
    tracemalloc.start()
    try:
        records = list(read_records(path, report))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert records == [delivery(0)]
    assert report.torn_tail_bytes == 14
    assert peak < 1_000_000


@pytest.mark.process
def test_an_append_racing_a_claim_from_another_process_lands_in_a_fresh_file(tmp_path):
    """A record appended while another process renames the file for draining is never lost in it."""
    spool = Spool(tmp_path)
    spool.append(delivery(0))
    [path] = spool.pending()
    # Another process holds the file locked (as its claim does), renames it and then lets go.
    claim = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(0.5); os.replace(sys.argv[1], sys.argv[1] + '.1.draining')"
    )
    with subprocess.Popen([sys.executable, "-c", claim, str(path)], stdout=subprocess.PIPE) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        spool.append(delivery(1))  # waits for the lock, then must not write into the renamed file
        assert holder.wait(timeout=10) == 0
    claimed = path.with_name(path.name + ".1.draining")
    assert [r.event_id for r in read_records(claimed)] == ["e-0"]
    assert [r.event_id for r in read_records(path)] == ["e-1"]


@pytest.fixture
def private_redis():
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.mark.drill
def test_with_redis_down_the_spool_fills_to_its_bound_then_answers_503(private_redis, tmp_path, redis_client):
    """Over real HTTP with Redis stopped: 202 spooled up to SPOOL_MAX_BYTES, then 503 + Retry-After; room again after the drain."""
    spool_dir = tmp_path / "spool"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=private_redis.url,
        smartcar_management_token=SecretStr(TOKEN),
        spool_dir=str(spool_dir),
        spool_max_bytes=16_384,
    )
    url = "/webhooks/smartcar"
    with LiveServer(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        private_redis.stop(kill=True)
        # The signed-scalar replay never reaches the spool.
        scalar = b"123"
        assert http.post(url, content=scalar, headers=signed_headers(scalar)).status_code == 400
        statuses = []
        for _ in range(40):
            body = encode(sample_event())
            response = http.post(url, content=body, headers=signed_headers(body))
            statuses.append(response.json().get("status") or response.json()["error"]["code"])
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "spool_full"
                assert response.headers["retry-after"].isdigit()
        spooled = statuses.count("spooled")
        assert 5 <= spooled < 40
        assert statuses[spooled:] == ["spool_full"] * (40 - spooled)
        assert spool_bytes(spool_dir) <= 16_384

        private_redis.start()  # the drainer empties the spool into Redis, and the count follows
        deadline = time.monotonic() + 20
        while spool_bytes(spool_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert spool_bytes(spool_dir) == 0
        check = redis.Redis.from_url(private_redis.url)
        assert check.llen("rq:queue:smartcar-events") == spooled
        check.close()

        private_redis.stop(kill=True)
        body = encode(sample_event())
        response = http.post(url, content=body, headers=signed_headers(body))
        assert response.status_code == 202
        assert response.json()["status"] == "spooled"
