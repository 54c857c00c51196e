"""Quota-aware enrichment end to end (issue 14): real Redis, the emulator, worker processes.

Each test is one line of the issue's Tests section. The emulator's call log (``/_emulator/calls``)
is the witness: it says which requests reached "Smartcar", for which vehicle, when, and how they
were answered. No test asserts that something was fast; where time matters the assertion only
gets easier on a slower machine (calls spread further apart, or a pause long enough to outlast
the workers' start-up), or the test checks the order of events in the log instead.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from rq import Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from cli.samples import SAMPLE_USER_ID, SAMPLE_VEHICLE_ID, encode, sample_event
from core.config import Settings
from core.redis.keys import APPLICATION_PAUSE_KEY, vehicle_pause_key
from service.app import create_app
from tests.conftest import signed_headers
from tests.pipeline import outputs, run_worker_burst, stream_entries, worker_env

VW_USER = "2fbd0033-83e7-43b8-a367-776d6dff1134"
VW = "a1d50709-3502-4faa-ba43-a5c7565e6a09"
IONIQ = "70076e4a-d774-464c-8241-60de654ccb24"
BYD_USER = "da4ef0df-73b9-4ad7-8c59-1b15ff646f0b"
BYD = "b3014ded-85db-4f12-8923-7a231354d8d0"
#: (user, vehicle) pairs of the emulator's seed whose signals fit in one page.
FLEET = [(SAMPLE_USER_ID, SAMPLE_VEHICLE_ID), (VW_USER, VW), (VW_USER, IONIQ), (BYD_USER, BYD)]
VEHICLE_ROUTE = "/v3/vehicles/{id}"
SIGNALS_ROUTE = "/v3/vehicles/{id}/signals"
#: Every read on every event, as before this issue.
READ_EVERY_EVENT = {"vehicle_info_ttl_seconds": 0, "signals_max_age_seconds": 0}


def deliver(settings: Settings, *events: dict[str, Any]) -> None:
    """Post each event, signed, to the web app; each must be accepted."""
    with TestClient(create_app(settings)) as client:
        for event in events:
            body = encode(event)
            response = client.post("/webhooks/smartcar", content=body, headers=signed_headers(body))
            assert response.status_code == 202, response.text


def event_for(user: str, vehicle: str, event_type: str = "VEHICLE_STATE") -> dict[str, Any]:
    return sample_event(event_type=event_type, user_id=user, vehicle_id=vehicle)


def calls(emulator: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{emulator}/_emulator/calls").json()["calls"])


def calls_by(emulator: str) -> Counter[tuple[str, str]]:
    """(route, vehicle id) → how many requests reached the emulator."""
    return Counter((c["route"], c["vehicleId"]) for c in calls(emulator))


def documents(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """eventId → the published payload."""
    return {entry["event_id"]: entry["document"] for entry in outputs(client)}


def env_for(settings: Settings) -> dict[str, str]:
    """The quota settings of ``settings`` as a worker subprocess reads them."""
    values = {
        "VEHICLE_INFO_TTL_SECONDS": str(settings.vehicle_info_ttl_seconds),
        "SIGNALS_MAX_AGE_SECONDS": str(settings.signals_max_age_seconds),
        "ENRICH_WAIT_SECONDS": str(settings.enrich_wait_seconds),
        "METRICS_PORT": "0",
    }
    if settings.smartcar_requests_per_minute is not None:
        values["SMARTCAR_REQUESTS_PER_MINUTE"] = str(settings.smartcar_requests_per_minute)
    if settings.smartcar_burst is not None:
        values["SMARTCAR_BURST"] = str(settings.smartcar_burst)
    return values


class Workers:
    """Worker processes started, and registered with RQ, before any job is queued, so that they
    all take jobs as the jobs arrive."""

    def __init__(self, settings: Settings, client: redis.Redis, count: int, concurrency: int = 8) -> None:
        env = worker_env(settings, **env_for(settings))
        command = [sys.executable, "-m", "cli.main", "worker", "--concurrency", str(concurrency)]
        self.processes = [subprocess.Popen(command, env=env) for _ in range(count)]
        deadline = time.monotonic() + 90
        while len(Worker.all(connection=client)) < count:
            assert time.monotonic() < deadline, "the workers did not register"
            assert all(p.poll() is None for p in self.processes), "a worker exited"
            time.sleep(0.1)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def workers(pipeline: Settings, redis_client: redis.Redis) -> Iterator[list[Workers]]:
    started: list[Workers] = []
    yield started
    for group in started:
        group.stop()


def wait_published(client: redis.Redis, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(stream_entries(client, "smartcar:vehicle-events")) < count:
        assert time.monotonic() < deadline, f"{len(stream_entries(client, 'smartcar:vehicle-events'))} of {count}"
        time.sleep(0.1)


@pytest.mark.process
def test_worker_processes_share_one_attribute_read_and_one_signals_read_per_vehicle(
    pipeline, redis_client, emulator, workers
):
    """Three worker processes, eight events per vehicle in flight together: Smartcar sees one
    vehicle read and one signals read per vehicle, and every event is published complete."""
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0.3}).raise_for_status()
    workers.append(Workers(pipeline, redis_client, count=3))
    events = [event_for(user, vehicle) for _ in range(8) for user, vehicle in FLEET]
    deliver(pipeline, *events)
    wait_published(redis_client, len(events))

    seen = calls_by(emulator)
    assert seen == Counter({(route, vehicle): 1 for _, vehicle in FLEET for route in (VEHICLE_ROUTE, SIGNALS_ROUTE)})
    published = documents(redis_client)
    assert all(doc["enrichment"]["status"] == "complete" for doc in published.values())
    for _, vehicle in FLEET:
        mine = [doc for doc in published.values() if doc["vehicle"]["id"] == vehicle]
        for call in ("vehicle", "signals"):
            sources = Counter(doc["enrichment"]["reads"][call]["source"] for doc in mine)
            assert sources["fetched"] == 1, (vehicle, call, sources)
            assert sources["fetched"] + sources["cached"] + sources["shared"] == 8
        assert all(doc["latestSignals"] for doc in mine)
    # The jobs were spread over the processes, so the sharing crossed them.
    ran_by = {Job.fetch(e["eventId"], connection=redis_client, serializer=JSONSerializer).worker_name for e in events}
    assert len(ran_by) >= 2


@pytest.mark.process
def test_the_budget_holds_across_worker_processes(pipeline, redis_client, emulator, workers):
    """SMARTCAR_REQUESTS_PER_MINUTE=300 with a burst of 1, two worker processes, a read on every
    event: at the emulator, no 2-second span holds more requests than the budget allows (plus a
    little for requests that left together), and the requests spread over the time the budget needs."""
    settings = pipeline.model_copy(
        update={**READ_EVERY_EVENT, "smartcar_requests_per_minute": 300, "smartcar_burst": 1, "enrich_wait_seconds": 60}
    )
    workers.append(Workers(settings, redis_client, count=2))
    events = [event_for(user, vehicle) for _ in range(5) for user, vehicle in FLEET]
    deliver(settings, *events)
    wait_published(redis_client, len(events))

    times = sorted(c["at"] for c in calls(emulator))
    assert len(times) == 2 * len(events)
    # 5 a second and one at once: at most 11 in any 2 s; 3 more for requests delayed on their way.
    busiest = max(sum(1 for t in times if start <= t < start + 2000) for start in times)
    assert busiest <= 14, busiest
    assert times[-1] - times[0] >= (len(times) - 1) * 200 * 0.75
    assert all(doc["enrichment"]["status"] == "complete" for doc in documents(redis_client).values())


@pytest.mark.drill
@pytest.mark.process
@pytest.mark.parametrize("scope", ["vehicle", "application"])
def test_a_429_stops_every_process_calls_until_retry_after_passes(pipeline, redis_client, emulator, workers, scope):
    """Smartcar answers 429 with Retry-After (for the VW, or for the whole application): the first
    event's reads meet it; worker processes started afterwards send nothing it covers while it
    lasts and publish those events at once, partial, their reads skipped as rate_limited; once it
    has passed, the next event reads again."""
    settings = pipeline.model_copy(update={**READ_EVERY_EVENT, "enrich_wait_seconds": 1})
    limit = {"vehicleId": VW} if scope == "vehicle" else {"retryAfter": True}
    httpx.post(f"{emulator}/_emulator/rate-limits", json=limit | {"seconds": 15}).raise_for_status()

    first = event_for(VW_USER, VW)
    deliver(settings, first)
    run_worker_burst(settings)
    met = calls(emulator)
    assert 1 <= len(met) <= 2  # the vehicle and signals reads left together; no retry followed
    assert {c["status"] for c in met} == {429}
    pause_key = vehicle_pause_key(VW) if scope == "vehicle" else APPLICATION_PAUSE_KEY
    pause_until = int(redis_client.hget(pause_key, "until") or 0)
    assert pause_until > redis_time_ms(redis_client)

    later = [event_for(VW_USER, VW) for _ in range(4)] + [event_for(BYD_USER, BYD) for _ in range(2)]
    deliver(settings, *later)
    group = Workers(settings, redis_client, count=2)
    workers.append(group)
    wait_published(redis_client, 1 + len(later))
    group.stop()

    # Publication times are Redis's clock, like the pause: what went out before it ended was skipped.
    published_at = {
        fields[b"event_id"].decode(): int(entry_id.decode().split("-")[0])
        for entry_id, fields in redis_client.xrange("smartcar:vehicle-events")
    }
    published = documents(redis_client)
    during_pause = 0
    for event in [first, *later]:
        document = published[event["eventId"]]
        if scope == "vehicle" and event["data"]["vehicle"]["id"] == BYD:
            assert document["enrichment"]["status"] == "complete"
        elif published_at[event["eventId"]] < pause_until:
            during_pause += 1
            assert document["enrichment"]["status"] == "partial"
            for call in ("vehicle", "signals"):
                skipped = {"source": "skipped", "fetchedAt": None, "reason": "rate_limited"}
                assert document["enrichment"]["reads"][call] == skipped
    assert during_pause >= 2, "the workers started too late to see the pause"
    covered = [
        c
        for c in calls(emulator)[len(met) :]
        if (scope == "application" or c["vehicleId"] == VW) and c["at"] < pause_until - 100
    ]
    assert covered == []
    assert stream_entries(redis_client, "smartcar:parked") == []

    while redis_time_ms(redis_client) <= pause_until or httpx.get(f"{emulator}/_emulator/rate-limits").json()["limits"]:
        time.sleep(0.2)
    after = event_for(VW_USER, VW)
    deliver(settings, after)
    run_worker_burst(settings)
    assert documents(redis_client)[after["eventId"]]["enrichment"]["status"] == "complete"
    assert [c["status"] for c in calls(emulator) if c["vehicleId"] == VW][-2:] == [200, 200]


def redis_time_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_a_budget_too_small_for_the_load_publishes_partial_events_and_parks_none(pipeline, redis_client, emulator):
    """One request per ten seconds, a burst of 2, ENRICH_WAIT_SECONDS=0.5, a read on every event,
    RQ retries left: every event is published (partial once the budget is spent, with the reads
    already held), none parked, none failed, none retried, and Smartcar sees two requests."""
    settings = pipeline.model_copy(
        update={
            **READ_EVERY_EVENT,
            "smartcar_requests_per_minute": 6,
            "smartcar_burst": 2,
            "enrich_wait_seconds": 0.5,
            "job_retries": 3,
        }
    )
    events = [event_for(SAMPLE_USER_ID, SAMPLE_VEHICLE_ID) for _ in range(10)]
    deliver(settings, events[0])
    run_worker_burst(settings)
    deliver(settings, *events[1:])
    run_worker_burst(settings, concurrency=4)

    assert len(calls(emulator)) == 2
    published = documents(redis_client)
    assert sorted(published) == sorted(e["eventId"] for e in events)
    assert published[events[0]["eventId"]]["enrichment"]["status"] == "complete"
    for event in events[1:]:
        document = published[event["eventId"]]
        assert document["enrichment"]["status"] == "partial"
        reads = document["enrichment"]["reads"]
        assert {reads[call]["source"] for call in reads} == {"skipped"}
        assert {reads[call]["reason"] for call in reads} == {"rate_limited"}
        # Whatever is cached stands in: the first event's reads.
        assert reads["signals"]["fetchedAt"] is not None
        assert document["latestSignals"]
        assert document["vehicle"]["make"] == "TESLA"
    assert stream_entries(redis_client, "smartcar:parked") == []
    assert FailedJobRegistry(settings.ingest_queue, connection=redis_client).count == 0
    assert ScheduledJobRegistry(settings.ingest_queue, connection=redis_client).count == 0


@pytest.mark.parametrize(
    ("windows", "expected"),
    [
        (READ_EVERY_EVENT, (6, 6)),
        ({"signals_max_age_seconds": 0}, (1, 6)),
        ({}, (1, 1)),
    ],
    ids=["both-0", "signals-0", "defaults"],
)
def test_a_window_of_0_restores_a_read_per_event(pipeline, redis_client, emulator, windows, expected):
    """Six events of one vehicle: with both windows 0, six vehicle and six signals reads; with the
    signals window 0 only, one vehicle read and six signals reads; with the defaults, one of each."""
    settings = pipeline.model_copy(update=windows)
    events = [event_for(VW_USER, VW) for _ in range(6)]
    deliver(settings, *events)
    run_worker_burst(settings, concurrency=3)
    seen = calls_by(emulator)
    assert (seen[VEHICLE_ROUTE, VW], seen[SIGNALS_ROUTE, VW]) == expected
    published = documents(redis_client)
    assert len(published) == 6
    fetched = Counter(
        call for doc in published.values() for call, r in doc["enrichment"]["reads"].items() if r["source"] == "fetched"
    )
    assert (fetched["vehicle"], fetched["signals"]) == expected


def test_the_first_event_after_a_vehicle_error_reads_the_signals_again(pipeline, redis_client, emulator):
    """Within the window: the first event reads, the next uses that read, a VEHICLE_ERROR uses it
    too, and the event after the error reads the signals afresh (the attributes stay cached)."""
    sources = []
    for event_type in ("VEHICLE_STATE", "VEHICLE_STATE", "VEHICLE_ERROR", "VEHICLE_STATE", "VEHICLE_STATE"):
        event = event_for(BYD_USER, BYD, event_type)
        deliver(pipeline, event)
        run_worker_burst(pipeline)
        reads = documents(redis_client)[event["eventId"]]["enrichment"]["reads"]
        sources.append((reads["vehicle"]["source"], reads["signals"]["source"]))
    assert sources == [
        ("fetched", "fetched"),
        ("cached", "cached"),
        ("cached", "cached"),
        ("cached", "fetched"),
        ("cached", "cached"),
    ]
    seen = calls_by(emulator)
    assert (seen[VEHICLE_ROUTE, BYD], seen[SIGNALS_ROUTE, BYD]) == (1, 2)
