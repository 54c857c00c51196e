"""Drill: a worker SIGKILLed mid-batch; every job it held is re-run and published exactly once."""

from __future__ import annotations

import time

import httpx
from rq.registry import FailedJobRegistry, StartedJobRegistry

from cli.samples import sample_event
from tests.drills.common import kill_group, report, start_worker
from tests.pipeline import outputs
from tests.test_pipeline import deliver


def test_sigkilled_worker_jobs_are_rerun_and_published_once(pipeline, redis_client, emulator):
    """Kill -9 a worker holding 20 jobs; a second worker publishes all 20, each once, within seconds."""
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 3.0}).raise_for_status()
    events = [sample_event() for _ in range(20)]
    deliver(pipeline, *events)
    victim = start_worker(pipeline, "--concurrency", "20")
    survivor = None
    try:
        started = StartedJobRegistry(pipeline.ingest_queue, connection=redis_client)
        deadline = time.monotonic() + 30
        while started.count < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.count == 20
        kill_group(victim)
        killed_at = time.monotonic()
        httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0.05}).raise_for_status()
        survivor = start_worker(pipeline, "--concurrency", "20")
        while len(outputs(redis_client)) < 20 and time.monotonic() < killed_at + 90:
            time.sleep(0.1)
        recovered_in = time.monotonic() - killed_at
    finally:
        kill_group(victim)
        if survivor is not None:
            kill_group(survivor)
    published = [e["event_id"] for e in outputs(redis_client)]
    report("worker SIGKILL", jobs=20, recovered_seconds=round(recovered_in, 1), published=len(published))
    assert sorted(published) == sorted(e["eventId"] for e in events)  # all, and each exactly once
    assert FailedJobRegistry(pipeline.ingest_queue, connection=redis_client).count == 0
