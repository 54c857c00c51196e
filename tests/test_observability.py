"""Metrics, queue gauges, the `status` screen and the logs, after scripted runs of the real pipeline.

prometheus-client's registry is global to the process, so counters are read before and after each
scripted run and compared by difference.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from cli.main import main
from cli.samples import SAMPLE_VEHICLE_ID, encode, sample_event
from cli.status import collect_status, render_text
from core import metrics
from core.redis import keys
from core.redis.deployment_counts import read_usage
from core.redis.queue_metrics import QueueCollector
from service.app import create_admin_app
from tests.conftest import signed_headers
from tests.pipeline import cached_token, inject, outputs, run_worker_burst, stream_entries, worker_env
from tests.procs import WebProcess, free_port, service_env, wait_for_port
from tests.test_pipeline import UNKNOWN_USER, deliver
from workers.worker import start_worker_metrics

# (sample name, labels) of every counter the scripted runs move.
JOB = "smartcar_ingest_jobs_total"
CALLS = "smartcar_ingest_smartcar_calls_total"
READS = "smartcar_ingest_enrichment_reads_total"
SOURCES = ("fetched", "cached", "shared")


class Counters:
    """Sample values of the global registry, read before a run, compared after it."""

    def __init__(self, *samples: tuple[str, dict[str, str]]) -> None:
        self.samples = samples
        self.before = [self._value(s) for s in samples]

    @staticmethod
    def _value(sample: tuple[str, dict[str, str]]) -> float:
        return REGISTRY.get_sample_value(sample[0], sample[1]) or 0.0

    def delta(self, name: str, **labels: str) -> float:
        index = self.samples.index((name, labels))
        return self._value(self.samples[index]) - self.before[index]


def sample(name: str, **labels: str) -> tuple[str, dict[str, str]]:
    return (name, labels)


def test_a_scripted_run_moves_each_counter_by_exactly_its_events(pipeline, redis_client):
    """Two routed events and one unknown user: jobs, latency, Smartcar calls, token and web counters
    add up, and the deployment's usage in Redis (what `status` reads) is what the counters gained."""
    counters = Counters(
        sample(JOB, outcome="published"),
        sample(JOB, outcome="parked_unknown_user"),
        sample(JOB, outcome="retried"),
        sample("smartcar_ingest_end_to_end_seconds_count"),
        sample(CALLS, endpoint="vehicle", status="200"),
        sample(CALLS, endpoint="signals", status="200"),
        sample(CALLS, endpoint="token", status="200"),
        *(sample(READS, call=c, source=s) for c in ("vehicle", "signals") for s in SOURCES),
        sample("smartcar_ingest_token_refreshes_total"),
        sample("smartcar_ingest_smartcar_retries_total", endpoint="signals"),
        sample("smartcar_ingest_deliveries_total", outcome="accepted"),
    )
    deliver(pipeline, sample_event(), sample_event(), sample_event(user_id=UNKNOWN_USER))
    run_worker_burst(pipeline)

    assert len(outputs(redis_client)) == 2
    assert counters.delta("smartcar_ingest_deliveries_total", outcome="accepted") == 3
    assert counters.delta(JOB, outcome="published") == 2
    assert counters.delta(JOB, outcome="parked_unknown_user") == 1
    assert counters.delta(JOB, outcome="retried") == 0
    assert counters.delta("smartcar_ingest_end_to_end_seconds_count") == 2
    # Each routed event reads the vehicle and its signals once: by its own call, by joining one in
    # flight or from the read the other made; the two events of one vehicle make one call of each.
    for call in ("vehicle", "signals"):
        sources = {s: counters.delta(READS, call=call, source=s) for s in SOURCES}
        assert sum(sources.values()) == 2
        assert sources["fetched"] == counters.delta(CALLS, endpoint=call, status="200") == 1
    assert counters.delta(CALLS, endpoint="token", status="200") == 1
    assert counters.delta("smartcar_ingest_token_refreshes_total") == 1
    assert counters.delta("smartcar_ingest_smartcar_retries_total", endpoint="signals") == 0
    usage = read_usage(redis_client)
    assert usage["events"] == counters.delta(JOB, outcome="published") == 2
    assert usage["calls"] == {
        call: counters.delta(CALLS, endpoint=call, status="200") for call in ("vehicle", "signals")
    }
    gained = {(c, s): counters.delta(READS, call=c, source=s) for c in ("vehicle", "signals") for s in SOURCES}
    assert usage["reads"] == {
        c: {s: n for (call, s), n in gained.items() if call == c and n} for c in ("vehicle", "signals")
    }


def test_retried_calls_are_counted_by_endpoint_and_status(pipeline, redis_client, emulator):
    """Two 503s on /signals count two retries and two 503 answers, then one 200."""
    inject(emulator, path="/v3/vehicles/{id}/signals", status=503, count=2)
    counters = Counters(
        sample("smartcar_ingest_smartcar_retries_total", endpoint="signals"),
        sample(CALLS, endpoint="signals", status="503"),
        sample(CALLS, endpoint="signals", status="200"),
        sample("smartcar_ingest_smartcar_call_seconds_count", endpoint="signals"),
        sample(JOB, outcome="published"),
    )
    deliver(pipeline, sample_event())
    run_worker_burst(pipeline)
    assert len(outputs(redis_client)) == 1
    assert counters.delta("smartcar_ingest_smartcar_retries_total", endpoint="signals") == 2
    assert counters.delta(CALLS, endpoint="signals", status="503") == 2
    assert counters.delta(CALLS, endpoint="signals", status="200") == 1
    assert counters.delta("smartcar_ingest_smartcar_call_seconds_count", endpoint="signals") == 3
    assert counters.delta(JOB, outcome="published") == 1


def test_a_transient_failure_with_rq_retries_left_counts_as_retried(pipeline, redis_client, emulator):
    """A job that fails transiently while RQ retries remain is counted retried, not parked."""
    settings = pipeline.model_copy(update={"job_retries": 2})
    inject(emulator, path="/v3/vehicles/{id}/signals", status=503, rate=1.0)
    counters = Counters(sample(JOB, outcome="retried"), sample(JOB, outcome="parked_retries_exhausted"))
    deliver(settings, sample_event())
    run_worker_burst(settings)
    assert counters.delta(JOB, outcome="retried") == 1
    assert counters.delta(JOB, outcome="parked_retries_exhausted") == 0


def test_no_identifier_or_secret_becomes_a_label(pipeline, redis_client):
    """After a run, no label value in the exposition is an event, user or vehicle id, or a secret."""
    event = sample_event()
    deliver(pipeline, event)
    run_worker_burst(pipeline)
    text = generate_latest().decode()
    token = cached_token(redis_client)
    for value in (event["eventId"], event["meta"]["deliveryId"], SAMPLE_VEHICLE_ID, event["data"]["user"]["id"]):
        assert value not in text
    for secret in ("emulator-secret", "test-management-token", token):
        assert secret not in text


def _queue_gauges(registry, queue="smartcar-events"):
    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    return {
        "up": value("smartcar_ingest_redis_up"),
        "depth": value("smartcar_ingest_queue_depth", queue=queue),
        "oldest": value("smartcar_ingest_queue_oldest_age_seconds", queue=queue),
        "output": value("smartcar_ingest_output_stream_length"),
        "parked": value("smartcar_ingest_parked_stream_length"),
        **{
            name: value("smartcar_ingest_queue_registry_jobs", queue=queue, registry=name)
            for name in ("started", "failed", "scheduled", "deferred")
        },
    }


def test_queue_gauges_match_redis_at_scrape_time(pipeline, redis_client):
    """Depth, oldest age, stream lengths and registry counts are read from Redis on each scrape."""
    registry = CollectorRegistry()
    collector = QueueCollector(pipeline)
    registry.register(collector)
    try:
        assert _queue_gauges(registry) == {
            "up": 1,
            "depth": 0,
            "oldest": 0,
            "output": 0,
            "parked": 0,
            "started": 0,
            "failed": 0,
            "scheduled": 0,
            "deferred": 0,
        }
        deliver(pipeline, sample_event(), sample_event(), sample_event(user_id=UNKNOWN_USER))
        head = redis_client.lindex("rq:queue:smartcar-events", 0).decode()
        ninety_ago = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=90)
        redis_client.hset(Job.key_for(head), "enqueued_at", ninety_ago.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        gauges = _queue_gauges(registry)
        assert gauges["depth"] == 3 == redis_client.llen("rq:queue:smartcar-events")
        assert 90 <= gauges["oldest"] < 100

        run_worker_burst(pipeline)
        gauges = _queue_gauges(registry)
        assert (gauges["depth"], gauges["oldest"]) == (0, 0)
        assert gauges["output"] == 2 == redis_client.xlen("smartcar:vehicle-events")
        assert gauges["parked"] == 1 == redis_client.xlen("smartcar:parked")
        assert gauges["started"] == gauges["failed"] == 0
    finally:
        collector.close()


def test_scheduled_retries_show_in_the_registry_gauge(pipeline, redis_client, emulator):
    """A job waiting for an RQ retry is counted in the scheduled registry, not in the queue."""
    settings = pipeline.model_copy(update={"job_retries": 2})
    inject(emulator, path="/v3/vehicles/{id}/signals", status=503, rate=1.0)
    registry = CollectorRegistry()
    collector = QueueCollector(settings)
    registry.register(collector)
    try:
        deliver(settings, sample_event())
        run_worker_burst(settings)
        gauges = _queue_gauges(registry)
        assert (gauges["depth"], gauges["scheduled"], gauges["failed"]) == (0, 1, 0)
    finally:
        collector.close()


def test_stranded_jobs_show_in_the_gauges_and_in_status(pipeline, redis_client):
    """Ids in RQ's intermediate list or held by a dead worker are counted as stranded, with the oldest's
    age; a live worker's job in hand is not."""
    registry = CollectorRegistry()
    collector = QueueCollector(pipeline)
    registry.register(collector)
    queue, key = "smartcar-events", "rq:queue:smartcar-events"

    def gauges():
        return (
            registry.get_sample_value("smartcar_ingest_queue_stranded_jobs", {"queue": queue}),
            registry.get_sample_value("smartcar_ingest_queue_stranded_oldest_age_seconds", {"queue": queue}),
        )

    try:
        deliver(pipeline, *(sample_event() for _ in range(4)))
        assert gauges() == (0, 0)
        assert collect_status(redis_client, pipeline)["stranded"] == {"count": 0, "oldestAgeSeconds": 0}
        oldest = redis_client.lmove(key, keys.rq_intermediate_key(queue), "LEFT", "RIGHT").decode()
        a_minute_ago = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60)
        redis_client.hset(Job.key_for(oldest), "enqueued_at", a_minute_ago.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        redis_client.sadd(keys.WORKERS_SET, "dead-worker", "live-worker")
        redis_client.set(keys.alive_key("live-worker"), "1", ex=30)
        redis_client.lmove(key, keys.dequeued_key(queue, "dead-worker"), "LEFT", "RIGHT")
        redis_client.lmove(key, keys.dequeued_key(queue, "live-worker"), "LEFT", "RIGHT")

        count, age = gauges()
        assert count == 2
        assert 60 <= age < 90
        report = collect_status(redis_client, pipeline)
        assert report["stranded"]["count"] == 2
        assert 60 <= report["stranded"]["oldestAgeSeconds"] < 90
        assert "stranded       2 taken off the queue" in render_text(report)
    finally:
        collector.close()


def test_unreachable_redis_exports_only_redis_up_zero_quickly(pipeline):
    """With Redis gone, a scrape answers within a second with redis_up 0 and no stale gauges."""
    settings = pipeline.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    registry = CollectorRegistry()
    collector = QueueCollector(settings)
    registry.register(collector)
    try:
        started = time.monotonic()
        text = generate_latest(registry).decode()
        assert time.monotonic() - started < 1.0
        assert "smartcar_ingest_redis_up 0.0" in text
        assert "smartcar_ingest_queue_depth{" not in text
    finally:
        collector.close()


def test_an_admin_app_and_a_worker_endpoint_in_one_process_each_export_the_gauges_once(pipeline):
    """Each /metrics serves its own collector's gauges once, and none stay behind in the default registry."""
    port = free_port()
    stop = start_worker_metrics(pipeline.model_copy(update={"metrics_port": port, "admin_host": "127.0.0.1"}))
    assert stop is not None
    try:
        with TestClient(create_admin_app(pipeline)) as admin:
            web = admin.get("/metrics").text
            worker = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        stop()
    for text in (web, worker):
        assert text.count("# TYPE smartcar_ingest_queue_depth gauge") == 1
    assert "smartcar_ingest_queue_depth" not in generate_latest().decode()


def test_worker_metrics_endpoint_serves_counters_and_queue_gauges(pipeline, redis_client):
    """start_worker_metrics serves /metrics on METRICS_PORT with the worker counters and the queue gauges."""
    port = free_port()
    stop = start_worker_metrics(pipeline.model_copy(update={"metrics_port": port, "admin_host": "127.0.0.1"}))
    assert stop is not None
    try:
        deliver(pipeline, sample_event())
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'smartcar_ingest_queue_depth{queue="smartcar-events"} 1.0' in text
        assert "smartcar_ingest_redis_up 1.0" in text
        # Each family by its TYPE line: a labelled counter has no sample until this process counts
        # one, which depends on which tests ran before in this test process.
        families = {JOB: "counter", CALLS: "counter", "smartcar_ingest_token_refreshes_total": "counter"}
        families["smartcar_ingest_end_to_end_seconds"] = "histogram"
        for name, kind in families.items():
            assert f"# TYPE {name} {kind}\n" in text, name
    finally:
        stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
    assert "smartcar_ingest_queue_depth" not in generate_latest().decode()


def test_worker_metrics_are_off_at_port_0_and_skipped_when_the_port_is_taken(pipeline):
    """METRICS_PORT=0 serves nothing; a taken port is logged and the worker runs on without metrics."""
    assert start_worker_metrics(pipeline.model_copy(update={"metrics_port": 0})) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = pipeline.model_copy(update={"metrics_port": port, "admin_host": "127.0.0.1"})
        assert start_worker_metrics(settings) is None
    assert "smartcar_ingest_queue_depth" not in generate_latest().decode()


def test_worker_metrics_listen_on_admin_host_only(pipeline):
    """With ADMIN_HOST=127.0.0.1 the worker's /metrics answers there and refuses another local address."""
    port = free_port()
    stop = start_worker_metrics(pipeline.model_copy(update={"metrics_port": port, "admin_host": "127.0.0.1"}))
    assert stop is not None
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=2)
    finally:
        stop()


# --- the web's admin port ----------------------------------------------------------------------------


def test_admin_readyz_fails_while_the_web_is_not_serving(settings):
    """/readyz answers 503 naming the web while the public server starts, stops or lost a process; 200 once it serves."""
    status: list[str | None] = ["starting"]
    with TestClient(create_admin_app(settings, web_status=lambda: status[0])) as admin:
        starting = admin.get("/readyz")
        assert starting.status_code == 503
        assert starting.json()["checks"] == {"web": "failing: starting", "redis": "ok"}
        status[0] = None
        assert admin.get("/readyz").json() == {"status": "ok", "checks": {"web": "ok", "redis": "ok"}}
        status[0] = "1 of 2 processes are down"
        assert admin.get("/readyz").status_code == 503


@pytest.mark.process
def test_readyz_and_metrics_are_served_on_the_admin_port_only(redis_url, tmp_path):
    """`web` answers 404 for /readyz and /metrics on the public port; ADMIN_HOST:ADMIN_PORT serves them, and only them."""
    admin = free_port()
    env = service_env(
        SMARTCAR_MANAGEMENT_TOKEN="test-management-token",
        REDIS_URL=redis_url,
        ADMIN_PORT=str(admin),
        ADMIN_HOST="127.0.0.1",
        LOG_LEVEL="WARNING",
    )
    with WebProcess(env, cwd=tmp_path) as web:
        wait_for_port(admin, timeout=30)
        public, private = web.url, f"http://127.0.0.1:{admin}"
        body = encode(sample_event())
        response = httpx.post(f"{public}/webhooks/smartcar", content=body, headers=signed_headers(body))
        assert response.status_code == 202
        assert httpx.get(f"{public}/healthz").status_code == 200
        for path in ("/readyz", "/metrics"):
            hidden = httpx.get(public + path)
            assert hidden.status_code == 404, path
            assert hidden.json()["error"]["code"] == "not_found"

        ready = httpx.get(f"{private}/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ok", "checks": {"web": "ok", "redis": "ok"}})
        text = httpx.get(f"{private}/metrics").text
        assert 'smartcar_ingest_deliveries_total{outcome="accepted"} 1.0' in text
        assert 'smartcar_ingest_queue_depth{queue="smartcar-events"} 1.0' in text
        for path in ("/webhooks/smartcar", "/healthz", "/connect/callback"):
            assert httpx.get(private + path).status_code == 404, path
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.2:{admin}/readyz", timeout=2)


# --- status -----------------------------------------------------------------------------------------


def run_status(monkeypatch, tmp_path, settings, *args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    return main(["status", *args])


def test_status_json_matches_redis_after_a_run(pipeline, redis_client, monkeypatch, tmp_path, capsys):
    """`status --json` reports the queue, registries, parked by reason, groups' lag and the last published event."""
    deliver(pipeline, sample_event(), sample_event(), sample_event(user_id=UNKNOWN_USER))
    run_worker_burst(pipeline)
    redis_client.xgroup_create("smartcar:vehicle-events", "billing", id="0")
    redis_client.xreadgroup("billing", "billing-0", {"smartcar:vehicle-events": ">"}, count=1)
    deliver(pipeline, sample_event())  # waiting in the queue
    capsys.readouterr()  # the run's own log lines

    assert run_status(monkeypatch, tmp_path, pipeline, "--json") == 0
    report = json.loads(capsys.readouterr().out)

    assert report["queue"]["name"] == "smartcar-events"
    assert report["queue"]["depth"] == 1
    assert 0 <= report["queue"]["oldestAgeSeconds"] < 30
    assert report["registries"] == {"started": 0, "failed": 0, "scheduled": 0, "deferred": 0}
    assert report["workers"] == []  # the burst worker deregistered
    assert report["parked"] == {
        "stream": "smartcar:parked",
        "length": 1,
        "byReason": {"unknown_user": 1},
        "scanned": 1,
        "capped": False,
    }
    output = report["output"]
    assert output["length"] == 2
    assert output["retentionSeconds"] == pipeline.output_stream_retention_seconds
    # how far behind the group is: the age of its oldest unacknowledged or unread entry
    assert 0 <= output["groups"][0].pop("behindSeconds") < 60
    assert output["groups"][0].pop("nearRetention") is False
    assert output["groups"] == [
        {
            "name": "billing",
            "consumers": 1,
            "pending": 1,
            "lag": 1,
            "lastDeliveredId": stream_ids(redis_client)[0],
        }
    ]
    last = output["lastPublished"]
    assert last["entryId"] == stream_ids(redis_client)[-1]
    assert last["eventId"] == outputs(redis_client)[-1]["event_id"]
    assert 0 <= last["ageSeconds"] < 60


def stream_ids(client, stream="smartcar:vehicle-events"):
    return [entry_id.decode() for entry_id, _ in client.xrange(stream)]


def test_status_screen_shows_workers_and_their_jobs(pipeline, redis_client, monkeypatch, tmp_path, capsys):
    """The text screen lists a registered worker with its state, jobs in flight and heartbeat age."""
    queue = Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    worker = Worker([queue], connection=redis_client, name="worker-a")
    worker.register_birth()
    worker.set_state("busy")
    redis_client.sadd("rq:worker:worker-a:executions", "job-1:exec-1", "job-2:exec-2")
    redis_client.xadd("smartcar:parked", {"event_id": "e", "reason": "legacy_v2", "detail": "d", "payload": "{}"})
    capsys.readouterr()
    try:
        assert run_status(monkeypatch, tmp_path, pipeline, "--json") == 0
        [reported] = json.loads(capsys.readouterr().out)["workers"]
        assert run_status(monkeypatch, tmp_path, pipeline) == 0
    finally:
        worker.register_death()
    assert reported["jobsInFlight"] == 2
    screen = capsys.readouterr().out
    assert "smartcar-events: 0 waiting" in screen
    [row] = [line for line in screen.splitlines() if "worker-a" in line]
    assert row.split()[:3] == ["worker-a", "busy", "2"]
    # The count is of jobs in flight, not of jobs run (it reads 0 once they are done): the header says so.
    [header] = [line for line in screen.splitlines() if line.split()[:1] == ["NAME"]]
    assert header.split() == ["NAME", "STATE", "IN", "FLIGHT", "HEARTBEAT"]
    assert header.index("IN FLIGHT") + len("IN FLIGHT") == row.index(" 2 ") + 2  # right-aligned over its counts
    assert row.endswith("s ago")
    assert "smartcar:parked: 1 entry (legacy_v2 1)" in screen
    assert "no consumer groups" in screen
    assert screen.splitlines()[-1].split() == ["last", "published", "never"]
    assert len(screen.splitlines()) < 25


def test_status_reports_smartcar_calls_per_event_for_the_deployment(
    pipeline, redis_client, emulator, monkeypatch, tmp_path, capsys
):
    """Four events of one vehicle, enriched by two runs (two processes' worth): `status` adds both
    up: 2 calls for 4 events (0.5 per event), reads by source, and the 429 the second run met."""
    deliver(pipeline, *(sample_event() for _ in range(3)))
    run_worker_burst(pipeline)
    inject(emulator, path=f"/v3/vehicles/{SAMPLE_VEHICLE_ID}", status=429, count=1, retry_after=0)
    deliver(pipeline.model_copy(update={"vehicle_info_ttl_seconds": 0}), sample_event())
    run_worker_burst(pipeline.model_copy(update={"vehicle_info_ttl_seconds": 0}))
    capsys.readouterr()

    assert run_status(monkeypatch, tmp_path, pipeline, "--json") == 0
    usage = json.loads(capsys.readouterr().out)["enrichment"]
    assert usage["minutes"] == 60
    assert usage["events"] == 4
    # The fourth event read its vehicle again (a window of 0): a 429, then the retry.
    assert usage["calls"] == {"vehicle": 3, "signals": 1}
    assert usage["callsPerEvent"] == 1.0
    assert usage["reads"]["vehicle"]["fetched"] == 2
    assert usage["reads"]["signals"]["fetched"] == 1
    assert sum(usage["reads"]["signals"].values()) == 4
    assert usage["rateLimited"] == {"vehicle": 1}

    assert run_status(monkeypatch, tmp_path, pipeline) == 0
    screen = capsys.readouterr().out
    assert "4 events in the last 60 min, Smartcar calls: signals 1, vehicle 3, 1.00 per event" in screen
    assert "429s: vehicle 1" in screen


def test_quota_metrics_count_reads_by_source_limiter_waits_denials_and_429s(pipeline, redis_client, emulator):
    """Three events at once, each reading both (windows of 0), a budget of one request per 2 s after
    a burst of 2, ENRICH_WAIT_SECONDS=2.5 and one 429: some requests wait for the budget, the rest
    are denied and their reads skipped, and the reads, waits, denials and 429 counters say so."""
    reads = [sample(READS, call=c, source=s) for c in ("vehicle", "signals") for s in metrics.READ_SOURCES]
    counters = Counters(
        *reads,
        sample("smartcar_ingest_limiter_wait_seconds_count", cause="budget"),
        sample("smartcar_ingest_limiter_denials_total", cause="budget"),
        sample("smartcar_ingest_rate_limited_total", scope="vehicle"),
        sample("smartcar_ingest_rate_limited_total", scope="application"),
    )
    settings = pipeline.model_copy(
        update={
            "vehicle_info_ttl_seconds": 0,
            "signals_max_age_seconds": 0,
            "smartcar_requests_per_minute": 30,
            "smartcar_burst": 2,
            "enrich_wait_seconds": 2.5,
        }
    )
    inject(emulator, path=f"/v3/vehicles/{SAMPLE_VEHICLE_ID}", status=429, count=1, retry_after=0, code="VEHICLE")
    deliver(settings, sample_event(), sample_event(), sample_event())
    run_worker_burst(settings, concurrency=3)

    read_counts = {(labels["call"], labels["source"]): counters.delta(name, **labels) for name, labels in reads}
    assert sum(read_counts.values()) == 6
    assert read_counts["vehicle", "skipped"] + read_counts["signals", "skipped"] >= 1
    assert counters.delta("smartcar_ingest_rate_limited_total", scope="vehicle") == 1
    assert counters.delta("smartcar_ingest_rate_limited_total", scope="application") == 0
    assert counters.delta("smartcar_ingest_limiter_wait_seconds_count", cause="budget") >= 1
    assert counters.delta("smartcar_ingest_limiter_denials_total", cause="budget") >= 1
    skipped = read_counts["vehicle", "skipped"] + read_counts["signals", "skipped"]
    assert skipped == counters.delta("smartcar_ingest_limiter_denials_total", cause="budget")


def test_status_counts_parked_reasons_over_a_capped_scan(pipeline, redis_client, monkeypatch):
    """Parked reasons are counted in Redis over at most the scan limit, and the report says it was capped."""
    for index in range(7):
        reason = "unknown_user" if index % 2 else "legacy_v2"
        redis_client.xadd("smartcar:parked", {"event_id": f"e{index}", "reason": reason, "payload": "x" * 1000})
    with monkeypatch.context() as patch:
        patch.setattr("cli.status.COUNT_SCAN_LIMIT", 5)
        report = collect_status(redis_client, pipeline)
    assert report["parked"]["byReason"] == {"legacy_v2": 3, "unknown_user": 2}
    assert (report["parked"]["scanned"], report["parked"]["length"], report["parked"]["capped"]) == (5, 7, True)
    assert "oldest 5 entries only" in render_text(report)
    full = collect_status(redis_client, pipeline)
    assert full["parked"]["byReason"] == {"legacy_v2": 4, "unknown_user": 3}
    assert full["parked"]["capped"] is False


def test_status_with_redis_unreachable_is_one_line_and_exit_3(pipeline, monkeypatch, tmp_path, capsys):
    """`status` against a Redis that does not answer exits 3 (unavailable, not bad settings) with one line
    naming REDIS_URL, not its value."""
    dead = pipeline.model_copy(update={"redis_url": f"redis://:hunter2@127.0.0.1:{free_port()}/0"})
    assert run_status(monkeypatch, tmp_path, dead) == 3
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("smartcar-ingest status: Redis at REDIS_URL could not be read")
    assert "hunter2" not in captured.err
    assert captured.out == ""


# --- logs --------------------------------------------------------------------------------------------

VIN = "1FAKEVIN00TEST001"


def event_with_private_values():
    """A sample event whose signals carry a VIN and a precise location."""
    event = sample_event()
    event["data"]["signals"] += [
        {
            "code": "vehicleidentification-vin",
            "name": "VIN",
            "group": "VehicleIdentification",
            "body": {"value": VIN},
            "meta": {"oemUpdatedAt": 1767000000000, "retrievedAt": 1767000000100},
            "status": {"value": "SUCCESS"},
        },
        {
            "code": "location-preciselocation",
            "name": "PreciseLocation",
            "group": "Location",
            "body": {"latitude": 47.6101, "longitude": -122.2015, "heading": 212},
            "meta": {"oemUpdatedAt": 1767000000000, "retrievedAt": 1767000000100},
            "status": {"value": "SUCCESS"},
        },
    ]
    return event


@pytest.mark.process
def test_logs_of_a_full_run_carry_ids_and_no_secrets_or_vehicle_data(pipeline, redis_client, emulator, tmp_path):
    """Web and worker at DEBUG: every event line has eventId and deliveryId; no secret, token, VIN or location."""
    inject(emulator, path="/v3/vehicles/{id}/signals", status=503, count=1)  # one retry line too
    env = worker_env(
        pipeline,
        SMARTCAR_MANAGEMENT_TOKEN="test-management-token",
        LOG_LEVEL="DEBUG",
        LOG_FORMAT="json",
        METRICS_PORT="0",
        ADMIN_PORT="0",
    )
    events = [event_with_private_values(), event_with_private_values(), sample_event(user_id=UNKNOWN_USER)]
    with WebProcess(env, cwd=tmp_path, capture=True) as web:
        for event in events:
            body = encode(event)
            response = httpx.post(
                f"{web.url}/webhooks/smartcar", content=body, headers=signed_headers(body, "test-management-token")
            )
            assert response.status_code == 202, response.text
    web_out, web_err = web.stdout, web.stderr
    worker = subprocess.run(
        [sys.executable, "-m", "cli.main", "worker", "--burst"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 0, worker.stderr
    assert len(outputs(redis_client)) == 2
    assert [e["reason"] for e in stream_entries(redis_client, "smartcar:parked")] == ["unknown_user"]

    logs = web_out + web_err + worker.stdout + worker.stderr
    access_token = cached_token(redis_client)
    published = outputs(redis_client)[0]["document"]
    emulator_vin = next(s for s in published["latestSignals"] if s["code"] == "vehicleidentification-vin")
    forbidden = {
        "VIN in the webhook": VIN,
        "VIN from the API": emulator_vin["body"]["value"],
        "latitude": "47.6101",
        "longitude": "-122.2015",
        "state of charge body": '"unit": "percent"',
        "client secret": pipeline.smartcar_client_secret.get_secret_value(),
        "management token": "test-management-token",
        "access token": access_token,
    }
    leaked = {what: value for what, value in forbidden.items() if value in logs}
    assert not leaked, leaked

    lines, garbled = parse_json_lines(web_err + worker.stderr)
    # With LOG_FORMAT=json every line is one JSON object; a line that is not (structlog's and the
    # stdlib's writes interleaved, a stray print) is the regression this guards against.
    assert garbled == [], garbled
    by_event = {e["eventId"]: e["meta"]["deliveryId"] for e in events}
    event_lines = [line for line in lines if line.get("logger_name", "").startswith("smartcar_ingest")]
    processed = [line for line in event_lines if line.get("event") in {"event published", "event parked"}]
    assert len(processed) == 3, processed
    for line in event_lines:
        if line.get("eventId") is None and line["event"] not in {"event published", "event parked"}:
            continue  # process-level lines (startup, token refresh outside an event)
        assert by_event.get(line["eventId"]) == line["deliveryId"], line
    retries = [line for line in lines if line.get("event") == "stamina.retry_scheduled"]
    assert retries
    for line in retries:
        assert by_event.get(line["eventId"]) == line["deliveryId"], line
    web_accepted = [line for line in lines if line.get("event") == "delivery accepted"]
    assert {line["eventId"] for line in web_accepted} == set(by_event)


def parse_json_lines(text):
    """``(parsed, garbled)``: the lines that are JSON objects, and those that are not."""
    parsed, garbled = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            parsed.append(json.loads(line))
        except ValueError:
            garbled.append(line)
    return parsed, garbled


_THREADED_LOGGING = """
import logging, threading
from core.logs import configure_logging, get_logger
configure_logging("INFO", "json")
ours, theirs = get_logger("smartcar_ingest.worker"), logging.getLogger("rq.worker")
def structlog_lines():
    for i in range(1500):
        ours.info("event published", eventId=f"e{i}", deliveryId="d" * 36)
def stdlib_lines():
    for i in range(1500):
        theirs.info("smartcar-events: Job OK (%s)", "e" * 36)
threads = [threading.Thread(target=f) for f in (structlog_lines, stdlib_lines) * 2]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


@pytest.mark.process
def test_log_lines_stay_whole_when_threads_log_at_once(tmp_path):
    """structlog lines (event loop) and stdlib lines (RQ's job threads) written at once are each one JSON line."""
    result = subprocess.run(
        [sys.executable, "-c", _THREADED_LOGGING],
        env=os.environ | {"PYTHONPATH": os.getcwd()},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines, garbled = parse_json_lines(result.stderr)
    assert garbled == []
    assert len(lines) == 6000
