"""Redis trouble at the edge: a fast 503 with Retry-After, then recovery without a restart."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
import redis
from pydantic import SecretStr
from rq import Queue
from rq.serializers import JSONSerializer

from cli.samples import encode, sample_event
from core.config import Settings
from service.admin import create_admin_app
from service.app import create_app
from tests.conftest import TOKEN, signed_headers
from tests.procs import LiveServer, RedisServer

# The endpoint's own deadline is under one second; this bound only catches a hang.
NO_HANG_SECONDS = 3.0


@pytest.fixture
def private_redis():
    server = RedisServer()
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.cleanup()


@pytest.fixture
def live_settings(private_redis):
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=private_redis.url,
        smartcar_management_token=SecretStr(TOKEN),
    )


@pytest.fixture
def live(live_settings):
    with LiveServer(create_app(live_settings)) as server:
        yield server


@pytest.fixture
def live_admin(live_settings):
    with LiveServer(create_admin_app(live_settings)) as server:
        yield server


def post_event(url: str, document: dict | None = None) -> tuple[httpx.Response, float]:
    body = encode(document or sample_event())
    started = time.monotonic()
    response = httpx.post(url + "/webhooks/smartcar", content=body, headers=signed_headers(body), timeout=10)
    return response, time.monotonic() - started


def test_stopped_redis_gives_503_then_recovers_without_restart(private_redis, live, live_admin):
    """With Redis down the edge answers 503 + Retry-After quickly; once Redis is back it accepts again."""
    assert post_event(live.url)[0].status_code == 202
    private_redis.stop(kill=True)
    for _ in range(3):
        response, elapsed = post_event(live.url)
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert response.json()["error"]["code"] == "redis_unavailable"
        assert elapsed < NO_HANG_SECONDS
    ready = httpx.get(live_admin.url + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("failing")
    private_redis.start()
    response, _ = post_event(live.url)
    assert response.status_code == 202
    assert response.json()["status"] == "accepted"
    assert httpx.get(live_admin.url + "/readyz", timeout=10).status_code == 200


def test_frozen_redis_gives_503_instead_of_a_hang(private_redis, live):
    """A Redis that accepts connections but never answers (SIGSTOP) yields a bounded 503, and the
    redelivery that the 503 provokes ends as exactly one job even if the stalled write landed late."""
    first, refused = sample_event(), sample_event()
    assert post_event(live.url, first)[0].status_code == 202
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        response, elapsed = post_event(live.url, refused)
        assert response.status_code == 503
        assert "retry-after" in response.headers
        assert elapsed < NO_HANG_SECONDS
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    # Smartcar redelivers the refused event: accepted now, or recognised if the stalled write landed.
    response, _ = post_event(live.url, refused)
    assert response.status_code == 202
    assert response.json()["status"] in {"accepted", "duplicate"}
    client = redis.Redis.from_url(private_redis.url)
    queue = Queue("smartcar-events", connection=client, serializer=JSONSerializer)
    assert sorted(queue.job_ids) == sorted([first["eventId"], refused["eventId"]])
    client.close()
