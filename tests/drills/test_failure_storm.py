"""Drill: Smartcar failing one call in five for a while; nothing is parked that a retry would deliver."""

from __future__ import annotations

import time

import httpx

from cli.samples import sample_event
from tests.drills.common import kill_group, report, start_worker
from tests.pipeline import emulator_stats, inject, outputs, stream_entries


def test_twenty_percent_upstream_failures_park_nothing(pipeline, redis_client, emulator):
    """With 20% of Smartcar calls failing (503 and 429), every event is still published, none parked."""
    settings = pipeline.model_copy(update={"job_retries": 5})
    inject(emulator, path="/v3/", status=503, rate=0.1)
    inject(emulator, path="/v3/", status=429, rate=0.1, retry_after=0)
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0.02}).raise_for_status()
    events = [sample_event() for _ in range(150)]
    # Every event reads for itself (windows of 0), so nearly every event makes its own calls.
    worker = start_worker(settings, "--concurrency", "32", VEHICLE_INFO_TTL_SECONDS="0", SIGNALS_MAX_AGE_SECONDS="0")
    started = time.monotonic()
    try:
        # A trickle, as webhooks arrive: each event comes after earlier fetches started, so they
        # cannot share them, and nearly every event makes its own calls into the storm.
        from rq import Worker
        from starlette.testclient import TestClient

        from cli.samples import encode
        from service.app import create_app
        from tests.conftest import signed_headers

        while not Worker.all(connection=redis_client) and time.monotonic() < started + 30:
            time.sleep(0.05)
        with TestClient(create_app(settings)) as web:
            for event in events:
                body = encode(event)
                headers = signed_headers(body, "test-management-token")
                assert web.post("/webhooks/smartcar", content=body, headers=headers).status_code == 202
                time.sleep(0.03)
        while len(outputs(redis_client)) < len(events) and time.monotonic() < started + 150:
            time.sleep(0.2)
    finally:
        kill_group(worker)
    stats = emulator_stats(emulator)
    published = [e["event_id"] for e in outputs(redis_client)]
    parked = stream_entries(redis_client, "smartcar:parked")
    report(
        "failure storm",
        events=len(events),
        injected_failures=stats["injected_failures"],
        calls=sum(stats["calls"].values()),
        published=len(published),
        parked=len(parked),
        seconds=round(time.monotonic() - started, 1),
    )
    assert stats["injected_failures"] > 30
    assert parked == []
    assert sorted(published) == sorted(e["eventId"] for e in events)
