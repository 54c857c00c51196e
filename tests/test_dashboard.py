"""rq-dashboard (the chart's optional dashboard, `make dashboard`) over a live ingest queue.

The real dashboard runs as a subprocess, on a free port, with the flags the chart and the Makefile
give it (``--json --disable-delete``) and its Redis URL in the environment as the chart hands it
over, from a working directory outside the checkout and without the checkout on ``PYTHONPATH``:
it reads the jobs without importing the service's code, as in its own image. The queue is filled through the project's own paths:
a signed delivery accepted by the web app (queued, or published by ``smartcar-ingest worker
--burst``: finished), a job whose argument is not a job payload, failed by that worker (failed), a
job scheduled for later (scheduled); a running ``smartcar-ingest worker`` for the workers view and,
with the emulator answering slowly, for a job in flight (started). The assertions read the JSON endpoints
the dashboard's pages poll (rq_dashboard/web.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from cli.samples import encode, sample_event
from core.config import Settings
from core.redis.jobs import PROCESS_EVENT, JobOptions, build_job_hash, job_payload
from core.redis.keys import queue_key
from service.app import create_app
from tests.conftest import signed_headers
from tests.pipeline import worker_env
from tests.procs import STARTUP_SECONDS, free_port, service_env, wait_for_port

pytestmark = pytest.mark.process

#: How long a test waits for the dashboard to see a worker come or go (RQ's heartbeat is seconds).
WORKER_SECONDS = 60.0
#: What the chart and `make dashboard` run it with: JSON jobs, no deleting.
FLAGS = ("--json", "--disable-delete")
REGISTRIES = ("queued", "started", "failed", "scheduled", "deferred", "finished", "canceled")


class Dashboard:
    """``rq-dashboard`` in a child process on a free port; ``env`` adds RQ_DASHBOARD_* settings."""

    def __init__(self, redis_url: str, cwd: Path, **env: str) -> None:
        self.port = free_port()
        # The service's settings and any RQ_DASHBOARD_* of the shell stay out, and so does the
        # checkout (PYTHONPATH): the dashboard must not need the project's code to show its jobs.
        base = {k: v for k, v in service_env().items() if not k.startswith("RQ_DASHBOARD_") and k != "PYTHONPATH"}
        self.log = cwd / "rq-dashboard.log"
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rq_dashboard", *("--bind", "127.0.0.1", "--port", str(self.port)), *FLAGS],
            env=base | {"RQ_DASHBOARD_REDIS_URL": redis_url, **env},
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def __enter__(self) -> Dashboard:
        try:
            wait_for_port(self.port, STARTUP_SECONDS, process=self.process, what="rq-dashboard")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
        self._log_file.close()

    def data(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON of ``/0/data/<path>.json`` (instance 0: the one Redis URL)."""
        response = self.client.get(f"/0/data/{path}.json", **kwargs)
        assert response.status_code == 200, (path, response.status_code, self.log.read_text()[-2000:])
        body: dict[str, Any] = response.json()
        return body

    def queue(self, name: str) -> dict[str, Any]:
        (queue,) = [q for q in self.data("queues")["queues"] if q["name"] == name]
        return queue

    def job_ids(self, queue: str, registry: str) -> list[str]:
        return [job["id"] for job in self.jobs(queue, registry)]

    def jobs(self, queue: str, registry: str) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.data(f"jobs/{queue}/{registry}/100/asc/1")["jobs"]
        return jobs


def _enqueue_job_hash(client: redis.Redis, settings: Settings, payload: Mapping[str, Any]) -> str:
    """Queue ``payload`` as the argument of an ingest job built by the project (core.redis.jobs)."""
    job_id, mapping = build_job_hash(payload, JobOptions.from_settings(settings))
    client.hset(Job.key_for(job_id), mapping=mapping)
    client.rpush(queue_key(settings.ingest_queue), job_id)
    client.sadd(Queue.redis_queues_keys, queue_key(settings.ingest_queue))
    return job_id


def _worker_burst(settings: Settings) -> None:
    """``smartcar-ingest worker --burst``: work the queue until it is empty, in a child process."""
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "worker", "--burst"],
        env=worker_env(settings, METRICS_PORT="0"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _deliver(settings: Settings) -> str:
    """A signed VEHICLE_STATE accepted by the web app: queued as the edge queues every event."""
    event = sample_event()
    body = encode(event)
    with TestClient(create_app(settings)) as web:
        response = web.post("/webhooks/smartcar", content=body, headers=signed_headers(body))
    assert response.json() == {"status": "accepted", "eventId": event["eventId"]}
    return str(event["eventId"])


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = WORKER_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds:.0f} s"
        time.sleep(0.2)


@pytest.fixture
def live_queue(pipeline: Settings, redis_client: redis.Redis) -> dict[str, str]:
    """One job in each of the queue and the finished, failed and scheduled registries; their ids by registry."""
    # Finished jobs are kept an hour here rather than a minute, so a slow machine cannot expire one mid-test.
    settings = pipeline.model_copy(update={"job_result_ttl_seconds": 3600})
    # 1. A delivery the worker publishes (its user is linked in the seeded store).
    finished = _deliver(settings)
    # 2. Not a job payload (no body, no receivedAt): the worker refuses it with InvalidJob.
    failed = _enqueue_job_hash(redis_client, settings, {"eventId": "not-a-payload", "eventType": "VEHICLE_STATE"})
    _worker_burst(settings)
    # 3. Queued after the worker has gone, so it stays queued.
    queued = _deliver(settings)
    # 4. Due in an hour: in the scheduled registry until then.
    event = sample_event()
    payload = job_payload(event["eventId"], "VEHICLE_STATE", encode(event).decode(), int(time.time() * 1000))
    ingest = Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    scheduled = ingest.enqueue_in(dt.timedelta(hours=1), PROCESS_EVENT, payload).id
    return {"finished": finished, "failed": failed, "queued": queued, "scheduled": scheduled}


def test_dashboard_counts_and_lists_each_registry_of_the_ingest_queue(live_queue, pipeline, tmp_path: Path):
    """queues.json counts one queued, finished, failed and scheduled job and nothing else; each registry lists its job's id."""
    with Dashboard(pipeline.redis_url, tmp_path) as dashboard:
        queue = dashboard.queue(pipeline.ingest_queue)
        counts = {
            "queued": queue["count"],
            **{name: queue[f"{name}_job_registry_count"] for name in REGISTRIES if name != "queued"},
        }
        assert counts == {name: int(name in live_queue) for name in REGISTRIES}
        for registry in REGISTRIES:
            expected = [live_queue[registry]] if registry in live_queue else []
            assert dashboard.job_ids(pipeline.ingest_queue, registry) == expected, registry
        # The web's own description: event type and id, never the body (locations, VINs).
        [queued] = dashboard.jobs(pipeline.ingest_queue, "queued")
        assert queued["description"] == f"process_event(VEHICLE_STATE {live_queue['queued']})"


def test_dashboard_shows_each_jobs_status_result_and_why_the_failed_one_failed(live_queue, pipeline, tmp_path: Path):
    """job.json reads each JSON job: status and origin, the finished one's result, the failed one's InvalidJob reason."""
    with Dashboard(pipeline.redis_url, tmp_path) as dashboard:
        for status, job_id in live_queue.items():
            job = dashboard.data(f"job/{job_id}")
            assert (job["id"], job["status"], job["origin"]) == (job_id, status, pipeline.ingest_queue)
        # The result is JSON: only a dashboard started with --json can read it.
        finished = dashboard.data(f"job/{live_queue['finished']}")
        assert finished["result"]["eventId"] == live_queue["finished"]
        assert finished["result"]["status"] == "published"
        failed = dashboard.data(f"job/{live_queue['failed']}")
        assert "InvalidJob" in failed["exc_info"]
        assert "not a job payload" in failed["exc_info"]
        # The failed registry's page shows the same reason.
        [listed] = dashboard.jobs(pipeline.ingest_queue, "failed")
        assert listed["exc_info"] == failed["exc_info"]


def test_dashboard_cannot_delete_jobs_or_empty_registries(live_queue, pipeline, redis_client, tmp_path: Path):
    """With --disable-delete, deleting a job and emptying a registry answer DISABLED and change nothing."""
    with Dashboard(pipeline.redis_url, tmp_path) as dashboard:
        deleted = dashboard.client.post(f"/job/{live_queue['failed']}/delete")
        assert deleted.json() == {"status": "DISABLED"}
        for registry in ("queued", "failed", "scheduled"):
            emptied = dashboard.client.post(f"/queue/{pipeline.ingest_queue}/{registry}/empty")
            assert emptied.json() == {"status": "DISABLED"}, registry
        for registry, job_id in live_queue.items():
            assert dashboard.job_ids(pipeline.ingest_queue, registry) == [job_id]
            assert redis_client.exists(Job.key_for(job_id))


def test_dashboard_reads_everything_as_a_read_only_redis_user(live_queue, pipeline, redis_client, tmp_path: Path):
    """As the read-only ACL user docs/deploy.md suggests, every view reads; a requeue is refused by Redis."""
    rules = ["resetkeys", "~rq:*", "resetchannels", "-@all", "+@read", "+@connection"]
    redis_client.execute_command("ACL", "SETUSER", "rq-dashboard", "on", ">dash-read-3b7d", *rules)
    try:
        url = pipeline.redis_url.replace("redis://", "redis://rq-dashboard:dash-read-3b7d@")
        with Dashboard(url, tmp_path) as dashboard:
            queue = dashboard.queue(pipeline.ingest_queue)
            assert (queue["count"], queue["failed_job_registry_count"]) == (1, 1)
            for registry, job_id in live_queue.items():
                assert dashboard.job_ids(pipeline.ingest_queue, registry) == [job_id], registry
                assert dashboard.data(f"job/{job_id}")["status"] == registry
            assert dashboard.data("workers") == {"workers": []}
            for path in ("/", "/0/view/workers", f"/0/view/jobs/{pipeline.ingest_queue}/failed/8/asc/1"):
                assert dashboard.client.get(path).status_code == 200, path
            assert dashboard.client.post(f"/job/{live_queue['failed']}/requeue").status_code == 500
            assert dashboard.job_ids(pipeline.ingest_queue, "failed") == [live_queue["failed"]]
    finally:
        redis_client.execute_command("ACL", "DELUSER", "rq-dashboard")


def test_dashboard_lists_a_running_worker_and_drops_it_once_stopped(pipeline, redis_client, tmp_path: Path):
    """A running `smartcar-ingest worker` appears in workers.json with its pid and queue, as RQ sees it; gone after SIGTERM."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"],
        env=worker_env(pipeline, METRICS_PORT="0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Dashboard(pipeline.redis_url, tmp_path) as dashboard:
            _wait_for(lambda: bool(dashboard.data("workers")["workers"]), "the worker registers")
            [listed] = dashboard.data("workers")["workers"]
            [registered] = Worker.all(connection=redis_client)
            assert listed["name"] == registered.name
            assert listed["pid"] == worker.pid
            assert listed["queues"] == [pipeline.ingest_queue]
            assert listed["state"] in {"idle", "busy"}
            worker.terminate()
            assert worker.wait(timeout=WORKER_SECONDS) == 0
            _wait_for(lambda: dashboard.data("workers")["workers"] == [], "the stopped worker leaves the list")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@contextlib.contextmanager
def _job_in_flight(settings: Settings, emulator_url: str, dashboard: Dashboard) -> Iterator[str]:
    """A running `smartcar-ingest worker` holding one job while Smartcar answers slowly; yields its id
    once the dashboard counts it as started, and stops the worker afterwards."""
    httpx.post(f"{emulator_url}/_emulator/latency", json={"seconds": 3}).raise_for_status()
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"],
        env=worker_env(settings, METRICS_PORT="0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: bool(dashboard.data("workers")["workers"]), "the worker registers")
        event_id = _deliver(settings)
        _wait_for(lambda: dashboard.queue(settings.ingest_queue)["started_job_registry_count"] == 1, "the job starts")
        yield event_id
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=WORKER_SECONDS)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_dashboard_shows_a_job_in_flight_in_the_started_registry(pipeline, emulator, tmp_path: Path):
    """While a worker waits on a slow Smartcar, its job is listed as started; once done, as finished."""
    with Dashboard(pipeline.redis_url, tmp_path) as dashboard, _job_in_flight(pipeline, emulator, dashboard) as job:
        assert dashboard.job_ids(pipeline.ingest_queue, "started") == [job]
        assert dashboard.data(f"job/{job}")["status"] == "started"
        _wait_for(lambda: dashboard.job_ids(pipeline.ingest_queue, "finished") == [job], "the job finishes")
        assert dashboard.queue(pipeline.ingest_queue)["started_job_registry_count"] == 0


@pytest.mark.xfail(
    strict=True,
    reason="rq-dashboard 0.9.0 builds workers with Worker.all(connection) and no serializer, even with --json; "
    "RQ 3.0 gives such a worker its current execution from Redis, and the dashboard then decodes that JSON "
    "job with pickle (job.get_call_string) and answers 500: remove this mark once rq-dashboard passes the serializer",
)
def test_dashboard_lists_a_busy_worker(pipeline, emulator, tmp_path: Path):
    """workers.json lists a worker that is running a job, as busy, with that job."""
    with Dashboard(pipeline.redis_url, tmp_path) as dashboard, _job_in_flight(pipeline, emulator, dashboard) as job:
        [listed] = dashboard.data("workers")["workers"]
        assert listed["state"] == "busy"
        assert listed["current_job"]["job_id"] == job


def test_dashboard_basic_auth_from_the_environment(redis_url, tmp_path: Path):
    """RQ_DASHBOARD_USERNAME/PASSWORD (how the chart passes its Secret) make every page answer 401 without them."""
    auth = {"RQ_DASHBOARD_USERNAME": "operator", "RQ_DASHBOARD_PASSWORD": "dashboard-pass-7c2e"}
    with Dashboard(redis_url, tmp_path, **auth) as dashboard:
        for path in ("/", "/0/data/queues.json", "/0/data/workers.json"):
            assert dashboard.client.get(path).status_code == 401, path
            assert dashboard.client.get(path, auth=("operator", "wrong")).status_code == 401, path
        assert dashboard.data("queues", auth=("operator", "dashboard-pass-7c2e")) == {"queues": []}


def test_dashboard_shows_why_a_job_naming_another_function_was_refused(pipeline, redis_client, tmp_path: Path):
    """A job calling another function, refused before it runs, shows its refusal reason in the dashboard."""
    ingest = Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    refused = ingest.enqueue("os.getcwd").id
    _worker_burst(pipeline)
    with Dashboard(pipeline.redis_url, tmp_path) as dashboard:
        assert dashboard.job_ids(pipeline.ingest_queue, "failed") == [refused]
        assert "Refused by smartcar-ingest" in (dashboard.data(f"job/{refused}")["exc_info"] or "")
