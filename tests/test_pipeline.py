"""End to end over real HTTP and real Redis: webhook → queue → worker → stream."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import httpx
import pytest
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from cli.main import build_parser
from cli.operations import replay
from cli.samples import SAMPLE_VEHICLE_ID, encode, sample_event
from core.redis.dedupe import event_marks
from core.store.users import UserStore
from service.app import create_app
from tests.conftest import fixture_paths, load_fixture, signed_headers
from tests.marks import recall
from tests.pipeline import cached_token, emulator_stats, inject, outputs, run_worker_burst, stream_entries, worker_env

UNKNOWN_USER = "11111111-2222-4333-8444-555555555555"


def deliver(settings, *documents_or_bodies):
    with TestClient(create_app(settings)) as client:
        for item in documents_or_bodies:
            body = item if isinstance(item, bytes) else encode(item)
            headers = signed_headers(body, "test-management-token")
            response = client.post("/webhooks/smartcar", content=body, headers=headers)
            assert response.status_code == 202, response.text


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.name)
def test_every_captured_fixture_is_published_enriched(pipeline, redis_client, path):
    """Each real capture goes through the whole pipeline and comes out as one enriched entry."""
    document = load_fixture(path)
    # Captures are historical: let the edge take a meta.deliveredAt that is months old.
    deliver(pipeline.model_copy(update={"max_delivery_age_seconds": 20 * 365 * 24 * 3600}), path.read_bytes())
    run_worker_burst(pipeline)
    [entry] = outputs(redis_client)
    assert entry["event_id"] == document["eventId"]
    assert entry["event_type"] == document["eventType"]
    assert entry["vehicle_id"] == document["data"]["vehicle"]["id"]
    user = UserStore(pipeline.database_url).find_by_smartcar_user_id(document["data"]["user"]["id"])
    assert user is not None
    assert entry["user_id"] == str(user.id)
    output = entry["document"]
    assert output["schemaVersion"] == 2
    assert output["user"] == {"id": user.id, "smartcarUserId": document["data"]["user"]["id"]}
    reads = output["enrichment"].pop("reads")
    assert output["enrichment"] == {"status": "complete", "errors": []}
    # A vehicle's first event reads both itself.
    for call in ("vehicle", "signals"):
        assert reads[call]["source"] == "fetched"
        assert reads[call]["reason"] is None
        assert isinstance(reads[call]["fetchedAt"], int)
    assert output["vehicle"]["id"] == document["data"]["vehicle"]["id"]
    assert output["latestSignals"], "the emulator's signals for the vehicle"
    assert len(output["signals"]) == len(document["data"].get("signals", []))
    assert output["receivedAt"].endswith("Z")
    assert output["publishedAt"] >= output["receivedAt"]
    if document["eventType"] == "VEHICLE_ERROR":
        assert len(output["errors"]) == len(document["data"]["errors"])


def test_output_document_fields(pipeline, redis_client, emulator):
    """The sample event's document carries the API's vehicle, signals, triggers and delivery meta."""
    event = sample_event()
    deliver(pipeline, event)
    run_worker_burst(pipeline)
    [entry] = outputs(redis_client)
    output = entry["document"]
    # The vehicle is the API's resource, not the webhook's (a FORD): mode and powertrainType are
    # there exactly when that resource carries them, with its values.
    resource = httpx.get(
        f"{emulator}/v3/vehicles/{SAMPLE_VEHICLE_ID}",
        headers={"authorization": f"Bearer {cached_token(redis_client)}"},
    )
    assert resource.status_code == 200, resource.text
    attributes = resource.json()["attributes"]
    source = {key: attributes[key] for key in ("mode", "powertrainType") if attributes.get(key) is not None}
    assert output["vehicle"] == {"id": SAMPLE_VEHICLE_ID, "make": "TESLA", "model": "Model Y", "year": 2022} | source
    assert output["triggers"] == [{"type": "SIGNAL_UPDATED", "code": "tractionbattery-stateofcharge"}]
    assert output["staleSignals"] == []  # the vehicle's first event: the state held nothing yet
    assert output["meta"]["deliveryId"] == event["meta"]["deliveryId"]
    assert output["meta"]["mode"] == "TEST"
    assert {s["code"] for s in output["signals"]} == {"tractionbattery-stateofcharge", "odometer-traveleddistance"}
    first = output["latestSignals"][0]
    assert set(first) >= {"code", "name", "group", "body", "status", "oemUpdatedAt", "retrievedAt"}


def test_replay_after_users_link_publishes(pipeline, redis_client, capsys):
    """An unknown_user event is delivered after `users link` and `replay --reason unknown_user`."""
    store = UserStore(pipeline.database_url)
    store.add_user(901, "late@example.test", "Late Linker")
    event = sample_event(user_id=UNKNOWN_USER)
    deliver(pipeline, event)
    run_worker_burst(pipeline)
    assert stream_entries(redis_client, "smartcar:parked")[0]["reason"] == "unknown_user"

    # The command as main() runs it, with the pipeline's settings.
    options = vars(build_parser().parse_args(["users", "link", "--user-id", "901", "--smartcar-user-id", UNKNOWN_USER]))
    module, _, name = options.pop("run").partition(":")
    del options["command"]
    users_link = getattr(importlib.import_module(module), name)
    users_link(pipeline, **options)
    assert f"user 901 linked to Smartcar user {UNKNOWN_USER}\n" in capsys.readouterr().out
    users_link(pipeline, **options)  # the same pair again: nothing to do
    assert capsys.readouterr().out == f"user 901 already linked to Smartcar user {UNKNOWN_USER}\n"
    replay(pipeline, reason="unknown_user", limit=None)
    assert "re-enqueued 1 of 1" in capsys.readouterr().out
    assert stream_entries(redis_client, "smartcar:parked") == []
    run_worker_burst(pipeline)
    [entry] = outputs(redis_client)
    assert entry["event_id"] == event["eventId"]
    assert entry["user_id"] == "901"
    # The emulator does not know this user's vehicle: published, but partially enriched.
    assert entry["document"]["enrichment"]["status"] == "partial"


def test_replay_filters_by_reason_and_limit(pipeline, redis_client, capsys):
    """replay --reason only touches that reason; --limit caps how many are re-enqueued."""
    for _ in range(3):
        redis_client.xadd(
            "smartcar:parked",
            {"event_id": f"e-{_}", "reason": "unknown_user", "detail": "d", "payload": encode(sample_event()).decode()},
        )
    redis_client.xadd("smartcar:parked", {"event_id": "x", "reason": "legacy_v2", "detail": "d", "payload": "{}"})
    replay(pipeline, reason="unknown_user", limit=2)
    assert "re-enqueued 2 of 2" in capsys.readouterr().out
    reasons = [e["reason"] for e in stream_entries(redis_client, "smartcar:parked")]
    assert reasons == ["unknown_user", "legacy_v2"]
    queue = Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    assert queue.job_ids == ["e-0", "e-1"]


def test_vehicle_refused_for_good_is_published_partial(pipeline, redis_client, emulator):
    """A 404 from GET /vehicles/{id} publishes the webhook's own vehicle with enrichment partial."""
    # The route template matches the vehicle call only (a path prefix would also catch /signals).
    inject(emulator, path="/v3/vehicles/{id}", status=404, count=1, code="VEHICLE_NOT_FOUND")
    event = sample_event()
    deliver(pipeline, event)
    run_worker_burst(pipeline)
    [entry] = outputs(redis_client)
    output = entry["document"]
    assert output["enrichment"]["status"] == "partial"
    [error] = output["enrichment"]["errors"]
    assert error["call"] == "vehicle"
    assert error["status"] == 404
    assert output["vehicle"]["make"] == event["data"]["vehicle"]["make"]  # the webhook's copy
    assert output["latestSignals"]


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_failures_are_retried_then_published(pipeline, redis_client, emulator, status):
    """429 (with Retry-After) and 5xx are retried within the job and the event is published."""
    inject(emulator, path="/v3/vehicles/{id}/signals", status=status, count=2, retry_after=0)
    deliver(pipeline, sample_event())
    run_worker_burst(pipeline)
    [entry] = outputs(redis_client)
    assert entry["document"]["enrichment"]["status"] == "complete"
    assert emulator_stats(emulator)["statuses_by_route"]["/v3/vehicles/{id}/signals"][str(status)] == 2


def test_persistent_5xx_parks_retries_exhausted(pipeline, redis_client, emulator):
    """When every attempt fails and no RQ retry is left, the event is parked retries_exhausted."""
    inject(emulator, path="/v3/vehicles/{id}/signals", status=503, rate=1.0)
    event = sample_event()
    deliver(pipeline, event)
    run_worker_burst(pipeline)
    assert outputs(redis_client) == []
    [parked] = stream_entries(redis_client, "smartcar:parked")
    assert parked["reason"] == "retries_exhausted"
    assert parked["event_id"] == event["eventId"]
    assert FailedJobRegistry(pipeline.ingest_queue, connection=redis_client).count == 0


def test_transient_failure_with_rq_retries_left_requeues_the_job(pipeline, redis_client, emulator):
    """With RQ retries left, a transient failure fails the attempt and RQ schedules a retry."""
    settings = pipeline.model_copy(update={"job_retries": 2})
    inject(emulator, path="/v3/vehicles/{id}/signals", status=503, rate=1.0)
    event = sample_event()
    deliver(settings, event)
    run_worker_burst(settings)
    assert outputs(redis_client) == []
    assert stream_entries(redis_client, "smartcar:parked") == []
    job = Job.fetch(event["eventId"], connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == "scheduled"
    assert job.retries_left == 1


def test_expired_token_is_refreshed_once(pipeline, redis_client, emulator):
    """After the emulator expires every token, one 401 forces one refresh and the event is published."""
    # Every event reads (no shared reads), so the second event calls Smartcar with the old token.
    pipeline = pipeline.model_copy(update={"vehicle_info_ttl_seconds": 0, "signals_max_age_seconds": 0})
    deliver(pipeline, sample_event())
    run_worker_burst(pipeline)
    assert emulator_stats(emulator)["token_requests"] == 1
    httpx.post(f"{emulator}/_emulator/expire").raise_for_status()
    deliver(pipeline, sample_event())
    run_worker_burst(pipeline)
    assert len(outputs(redis_client)) == 2
    assert emulator_stats(emulator)["token_requests"] == 2


def test_revoked_token_is_refreshed(pipeline, redis_client, emulator):
    """A revoked token is replaced after its first 401."""
    pipeline = pipeline.model_copy(update={"vehicle_info_ttl_seconds": 0, "signals_max_age_seconds": 0})
    deliver(pipeline, sample_event())
    run_worker_burst(pipeline)
    httpx.post(f"{emulator}/_emulator/revoke").raise_for_status()
    deliver(pipeline, sample_event())
    run_worker_burst(pipeline)
    assert len(outputs(redis_client)) == 2
    assert emulator_stats(emulator)["token_requests"] == 2
    assert {entry["document"]["enrichment"]["status"] for entry in outputs(redis_client)} == {"complete"}


def test_401_that_survives_a_refresh_parks_upstream_rejected(pipeline, redis_client, emulator):
    """A 401 even with a fresh token parks the event upstream_rejected."""
    inject(emulator, path=f"/v3/vehicles/{SAMPLE_VEHICLE_ID}", status=401, rate=1.0)
    deliver(pipeline, sample_event())
    run_worker_burst(pipeline)
    assert outputs(redis_client) == []
    [parked] = stream_entries(redis_client, "smartcar:parked")
    assert parked["reason"] == "upstream_rejected"
    assert "Bearer" not in parked["detail"]


def test_a_job_run_twice_publishes_once(pipeline, redis_client):
    """Re-running a finished job (as after a crash) leaves exactly one output entry."""
    event = sample_event()
    deliver(pipeline, event)
    run_worker_burst(pipeline)
    job = Job.fetch(event["eventId"], connection=redis_client, serializer=JSONSerializer)
    assert job.return_value()["status"] == "published"
    Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer).enqueue_job(job)
    run_worker_burst(pipeline)
    assert len(outputs(redis_client)) == 1
    job = Job.fetch(event["eventId"], connection=redis_client, serializer=JSONSerializer)
    assert job.return_value()["status"] == "already_published"


def test_killed_after_publishing_rerun_publishes_once(pipeline, redis_client, emulator):
    """A job killed after its publish but before RQ recorded success is re-run without a second entry."""
    event = sample_event()
    deliver(pipeline, event)
    run_worker_burst(pipeline)
    calls_before = emulator_stats(emulator)["calls"]
    # Replay the crash: the event is marked published, and a job for it runs again from the queue.
    assert recall(redis_client, event_marks(pipeline.dedupe_ttl_seconds), event["eventId"]) == b"2"
    # The edge takes a redelivery for a duplicate: the mark that records the publish is the dedupe mark.
    deliver_again = sample_event(event_id=event["eventId"])
    with TestClient(create_app(pipeline)) as client:
        body = encode(deliver_again)
        response = client.post(
            "/webhooks/smartcar", content=body, headers=signed_headers(body, "test-management-token")
        )
        assert response.json()["status"] == "duplicate"
    queue_raw_body(redis_client, event["eventId"], encode(deliver_again).decode())
    run_worker_burst(pipeline)
    assert len(outputs(redis_client)) == 1
    # The re-run did not call Smartcar again.
    assert emulator_stats(emulator)["calls"] == calls_before


def queue_raw_body(client, event_id: str, body: str) -> None:
    """Queue a job carrying ``body`` as if the web had accepted it, bypassing the web's checks."""
    from core.redis.jobs import JobOptions, build_job_hash, job_payload

    job_id, mapping = build_job_hash(job_payload(event_id, "VEHICLE_STATE", body, 1), JobOptions("smartcar-events"))
    client.hset(Job.key_for(job_id), mapping=mapping)
    client.rpush("rq:queue:smartcar-events", job_id)


def test_invalid_body_in_a_job_is_parked(pipeline, redis_client):
    """A queued body that no longer parses is parked invalid_payload, not failed."""
    queue_raw_body(redis_client, "bad-1", "{not json")
    run_worker_burst(pipeline)
    [parked] = stream_entries(redis_client, "smartcar:parked")
    assert parked["reason"] == "invalid_payload"
    assert parked["payload"] == "{not json"


@pytest.mark.parametrize("body", ['{"eventId": NaN}', "[1, 2]", '{"eventId": "\\ud800"}', "\ud800"])
def test_a_job_body_the_parser_cannot_read_is_parked_never_failed(pipeline, redis_client, body):
    """NaN, a non-object or a lone surrogate in a queued body: parked invalid_payload, nothing in RQ's failed registry."""
    queue_raw_body(redis_client, "bad-2", body)
    run_worker_burst(pipeline)
    [parked] = stream_entries(redis_client, "smartcar:parked")
    assert parked["reason"] == "invalid_payload"
    assert parked["event_id"] == "bad-2"
    assert FailedJobRegistry("smartcar-events", connection=redis_client).get_job_ids() == []


def test_unreadable_times_and_years_are_published_as_null(pipeline, redis_client):
    """A 4,301-digit time, a 5,000-digit year and a 1e400 value: published as valid JSON with nulls, not failed."""
    document = sample_event()
    document["data"]["signals"][0]["meta"]["oemUpdatedAt"] = "1" * 4301
    document["data"]["vehicle"]["year"] = "9" * 5000
    body = encode(document).replace(b'"value":81', b'"value":1e400')
    assert b"1e400" in body
    deliver(pipeline, body)
    run_worker_burst(pipeline)
    [entry] = outputs(redis_client)
    signal = entry["document"]["signals"][0]
    assert signal["oemUpdatedAt"] is None
    assert signal["body"]["value"] is None

    def no_constants(name):
        raise AssertionError(f"{name} in the output")

    json.loads(entry["payload"], parse_constant=no_constants)
    assert FailedJobRegistry("smartcar-events", connection=redis_client).get_job_ids() == []


def test_a_worker_park_trims_the_parked_stream_by_age(pipeline, redis_client):
    """The worker's XADD to the parked stream trims entries older than PARKED_RETENTION_SECONDS."""
    for i in range(1000):
        old = {"event_id": f"old-{i}", "reason": "legacy_v2", "detail": "Old.", "payload": "{}"}
        redis_client.xadd("smartcar:parked", old, id=f"{1000 + i}-0")
    deliver(pipeline, sample_event(user_id=UNKNOWN_USER))
    run_worker_burst(pipeline)
    entries = stream_entries(redis_client, "smartcar:parked")
    assert entries[-1]["reason"] == "unknown_user"
    assert len(entries) <= 101  # "~" trims whole nodes: at most one node of old entries remains


@pytest.mark.process
def test_token_is_shared_by_two_worker_processes(pipeline, redis_client, emulator):
    """Two worker processes draining one queue make exactly one token request between them."""
    deliver(pipeline, *[sample_event() for _ in range(20)])
    env = worker_env(pipeline)
    workers = [subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--burst"], env=env) for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=120) == 0
    assert len(outputs(redis_client)) == 20
    assert emulator_stats(emulator)["token_requests"] == 1


@pytest.mark.process
def test_rq_info_shows_the_queue(pipeline, redis_client):
    """`rq info` lists the ingest queue with its queued jobs."""
    deliver(pipeline, sample_event(), sample_event())
    result = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", pipeline.redis_url, "--only-queues"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "smartcar-events" in result.stdout
    assert "2" in result.stdout


def test_concurrent_worker_keeps_rqs_registries_true(pipeline, redis_client, emulator):
    """Many events through one concurrent worker: all published once, all in the finished registry, none failed."""
    from rq.registry import FinishedJobRegistry, StartedJobRegistry

    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0.05}).raise_for_status()
    events = [sample_event() for _ in range(60)]
    deliver(pipeline, *events)
    run_worker_burst(pipeline, concurrency=16)
    entries = outputs(redis_client)
    assert sorted(e["event_id"] for e in entries) == sorted(e["eventId"] for e in events)
    queue = pipeline.ingest_queue
    assert sorted(FinishedJobRegistry(queue, connection=redis_client).get_job_ids()) == sorted(
        e["eventId"] for e in events
    )
    assert FailedJobRegistry(queue, connection=redis_client).count == 0
    assert StartedJobRegistry(queue, connection=redis_client).count == 0


@pytest.mark.process
def test_jobs_in_flight_are_visible_and_sigterm_lets_them_finish(pipeline, redis_client, emulator):
    """A worker with eight slots shows eight started jobs at once in RQ; SIGTERM finishes them, then exits."""
    import signal
    import time

    from rq import Worker
    from rq.registry import StartedJobRegistry

    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 1.5}).raise_for_status()
    events = [sample_event() for _ in range(8)]
    deliver(pipeline, *events)
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker", "--concurrency", "8"], env=worker_env(pipeline)
    )
    try:
        started = StartedJobRegistry(pipeline.ingest_queue, connection=redis_client)
        deadline = time.monotonic() + 30
        while started.count < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.count == 8
        [rq_worker] = Worker.all(connection=redis_client)
        assert rq_worker.get_state() == "busy"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert sorted(e["event_id"] for e in outputs(redis_client)) == sorted(e["eventId"] for e in events)
    assert started.count == 0
    assert FailedJobRegistry(pipeline.ingest_queue, connection=redis_client).count == 0
    assert Worker.all(connection=redis_client) == []
