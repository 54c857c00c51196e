"""Drill: Redis killed and restarted (AOF) under traffic; every 2xx'd event is published exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.app import create_app
from tests.drills.common import Sender, kill_group, published_figures, report, start_worker
from tests.pipeline import outputs, pipeline_settings
from tests.procs import LiveServer


@pytest.mark.parametrize("spool", [False, True], ids=["503-and-retry", "spool"])
def test_redis_restart_loses_nothing(aof_redis, emulator, seeded_database, tmp_path: Path, spool):
    """Kill -9 Redis mid-traffic, restart it from its AOF: web and worker recover without restarts."""
    settings = pipeline_settings(
        aof_redis.url,
        emulator,
        seeded_database,
        spool_dir=str(tmp_path / "spool") if spool else None,
        job_retries=3,
    )
    with LiveServer(create_app(settings)) as web:
        worker = start_worker(settings, "--concurrency", "16")
        sender = Sender(web.url, 120)
        try:
            import redis as redis_lib
            from rq import Worker

            probe = redis_lib.Redis.from_url(aof_redis.url)
            deadline = time.monotonic() + 30
            while not Worker.all(connection=probe) and time.monotonic() < deadline:
                time.sleep(0.1)
            probe.close()
            sender.thread.start()
            time.sleep(1.0)
            aof_redis.stop(kill=True)
            outage_started = time.monotonic()
            time.sleep(3.0)
            aof_redis.start()
            outage = time.monotonic() - outage_started
            sender.thread.join(timeout=120)
            assert not sender.thread.is_alive()
            deadline = time.monotonic() + 90
            client = redis_lib.Redis.from_url(aof_redis.url)
            while len(outputs(client)) < len(sender.acknowledged) and time.monotonic() < deadline:
                time.sleep(0.2)
            published = [e["event_id"] for e in outputs(client)]
            missing = sorted(set(sender.acknowledged) - set(published))
            diagnosis = {
                event_id: {
                    "status": client.hget(f"rq:job:{event_id}", "status"),
                    "queued": client.lpos("rq:queue:smartcar-events", event_id),
                    "intermediate": client.lpos("rq:queue:smartcar-events:intermediate", event_id),
                    "failed": client.zscore("rq:registry:failed:smartcar-events", event_id),
                    "started": [
                        k for k in client.zrange("rq:registry:started:smartcar-events", 0, -1) if event_id.encode() in k
                    ],
                    "scheduled": client.zscore("rq:registry:scheduled:smartcar-events", event_id),
                    "parked": client.xlen("smartcar:parked"),
                    "exc": (client.hget(f"rq:job:{event_id}", "exc_info") or b"")[:300],
                }
                for event_id in missing
            }
            if spool:
                diagnosis["spool_files"] = sorted(p.name for p in (tmp_path / "spool").iterdir())
            client.close()
        finally:
            kill_group(worker)
    statuses = sorted(set(sender.acknowledged.values()))
    report(
        "redis restart" + (" with spool" if spool else ""),
        outage_seconds=round(outage, 1),
        acknowledged=len(sender.acknowledged),
        refused_attempts=sender.refusals,
        slowest_answer_seconds=round(sender.slowest, 2),
        **published_figures(published),
        statuses=statuses,
    )
    assert len(sender.acknowledged) == 120
    assert sorted(published) == sorted(sender.acknowledged), diagnosis  # every acknowledged event, exactly once
    assert sender.slowest < 5.0  # never a hang: 503 (or the spool) answers within the deadline
    if spool:
        assert "spooled" in statuses
