"""Redis trouble at the edge (a fast 503 with Retry-After, then recovery without a restart) and in
the workers' waits (:mod:`core.redis.outage`: through a real outage, until stopped, or up to a limit)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
import stamina
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.serializers import JSONSerializer

from cli.samples import encode, sample_event
from core.config import Settings
from core.redis import outage
from core.redis.outage import WAIT_JITTER, WAIT_MAX, until_redis_answers, until_redis_answers_async
from service.app import create_admin_app, create_app
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


@pytest.mark.drill
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


@pytest.mark.drill
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


# --- the workers' wait (core.redis.outage), against a real redis-server ----------------------------

#: How late a wait may end after the moment it should, on a busy machine.
SLACK = 2.0


class Recorded:
    """Stands in for the outage module's logger: keeps each warning's event and fields."""

    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


@pytest.fixture
def waits(monkeypatch) -> Recorded:
    """Real waits (stamina's testing mode off, as for a worker process), their log lines recorded."""
    assert not stamina.is_testing(), "stamina's testing mode leaked into this test: these waits must be real"
    recorded = Recorded()
    monkeypatch.setattr(outage, "log", recorded)
    return recorded


def quick_client(url: str) -> redis.Redis:
    """A client that fails at once while Redis is down (no retries of its own), so the wait is ours."""
    return redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))


def quick_async_client(url: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(
        url, socket_connect_timeout=0.5, socket_timeout=0.5, retry=redis.asyncio.retry.Retry(NoBackoff(), 0)
    )


def run_sync_wait(url: str, step: Callable[[redis.Redis], Any], **options: Any) -> Any:
    client = quick_client(url)
    try:
        return until_redis_answers(lambda: step(client), **options)
    finally:
        client.close()


def run_async_wait(url: str, step: Callable[[redis.asyncio.Redis], Awaitable[Any]], **options: Any) -> Any:
    async def main() -> Any:
        client = quick_async_client(url)
        try:
            return await until_redis_answers_async(lambda: step(client), **options)
        finally:
            await client.aclose()

    return asyncio.run(main())


def run_wait(form: str, url: str, step: Callable[[Any], Any], **options: Any) -> Any:
    """``step(client)`` through the sync wait with a sync client, or the async one with an async client."""
    return (run_sync_wait if form == "sync" else run_async_wait)(url, step, **options)


def restart_later(server: RedisServer, after: float) -> threading.Thread:
    def restart() -> None:
        time.sleep(after)
        server.start()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


@pytest.mark.drill
@pytest.mark.parametrize("form", ["sync", "async"])
def test_the_wait_rides_out_a_redis_restart(private_redis, waits, form):
    """Redis killed, then started again 2 s later: the step is tried until Redis answers, with a
    warning per wait and waits that back off, and its result is returned; no error escapes."""
    quick_client(private_redis.url).set("before", "1")
    private_redis.stop(kill=True)
    restarter = restart_later(private_redis, after=2.0)
    started = time.monotonic()
    value = run_wait(form, private_redis.url, lambda client: client.incr("counter"))
    elapsed = time.monotonic() - started
    restarter.join(timeout=10)
    assert value == 1  # exactly one try reached Redis
    assert 2.0 <= elapsed < 2.0 + WAIT_MAX + SLACK
    assert waits.warnings, "no warning logged while waiting"
    assert {event for event, _ in waits.warnings} == {"Redis unavailable; waiting"}
    assert {fields["error"] for _, fields in waits.warnings} == {"ConnectionError"}
    delays = [fields["retryIn"] for _, fields in waits.warnings]
    assert delays[0] <= outage.WAIT_INITIAL + WAIT_JITTER + 0.01
    assert delays[-1] > delays[0]  # backing off
    assert max(delays) <= WAIT_MAX


@pytest.mark.drill
@pytest.mark.parametrize("form", ["sync", "async"])
def test_the_wait_ends_at_once_when_stop_turns_true(private_redis, waits, form):
    """With Redis down and no time limit, the wait ends at the first failure after stop() turns true,
    raising the Redis error."""
    private_redis.stop(kill=True)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        run_wait(form, private_redis.url, lambda client: client.ping(), stop=stop.is_set)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 1.0 + WAIT_MAX + SLACK


@pytest.mark.drill
@pytest.mark.parametrize("form", ["sync", "async"])
def test_the_wait_gives_up_after_its_time_limit(private_redis, waits, form):
    """With Redis down, ``give_up_after`` bounds the wait: the Redis error is raised at the first
    failure past the limit."""
    private_redis.stop(kill=True)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        run_wait(form, private_redis.url, lambda client: client.ping(), give_up_after=1.5)
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 1.5 + WAIT_MAX + SLACK
    assert len(waits.warnings) >= 2


@pytest.mark.parametrize("form", ["sync", "async"])
@pytest.mark.parametrize("reply", ["BUSY Redis is busy running a script.", "MISCONF no disk", "NOREPLICAS none"])
def test_a_refusal_inside_a_pipeline_is_waited_out_as_alone(reply, form):
    """redis-py names the failed command of a pipeline or transaction before the reply (the async
    pipeline shows the reply as a tuple): the refusal is still one to wait out; a real fault is not."""
    client = redis.Redis() if form == "sync" else redis.asyncio.Redis()
    pipe = client.pipeline()
    refused, fault = redis.ResponseError(reply), redis.ResponseError("WRONGTYPE Operation against a key")
    for exc in (refused, fault):
        pipe.annotate_exception(exc, 1, ("XADD", "stream", "*", "a", "b"))
    assert "of pipeline caused error" in str(refused)
    assert outage.redis_unavailable(refused)
    assert not outage.redis_unavailable(fault)


@pytest.mark.process
def test_a_redis_fault_is_raised_at_once(private_redis, waits):
    """An error that is not Redis being unavailable (here a wrong type) is not waited out."""
    client = quick_client(private_redis.url)
    client.set("text", "not a list")
    tries = []

    def step() -> object:
        tries.append(1)
        return client.lpush("text", "x")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        until_redis_answers(step)
    client.close()
    assert len(tries) == 1
    assert waits.warnings == []


@pytest.mark.drill
def test_a_signal_handler_ends_the_wait(private_redis, waits):
    """The worker's SIGTERM handler raises StopRequested while the dequeue waits: an exception
    raised by a signal handler while the wait sleeps ends it at once."""

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    private_redis.stop(kill=True)
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        # Late enough that the wait has reached a long sleep (0.2, 0.4, 0.8, 1.6 s...).
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        started = time.monotonic()
        with pytest.raises(Interrupted):
            run_sync_wait(private_redis.url, lambda client: client.ping())
        elapsed = time.monotonic() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert 2.0 <= elapsed < 2.0 + SLACK


@pytest.mark.drill
def test_stamina_testing_mode_takes_the_waits_out_too(private_redis):
    """Under ``stamina.set_testing`` the wait makes the tries the test asked for, back to back,
    then raises: an in-process test cannot hang on a Redis that is down."""
    private_redis.stop(kill=True)
    client = quick_client(private_redis.url)
    tries = []

    def step() -> object:
        tries.append(1)
        return client.ping()

    stamina.set_testing(True, attempts=3)
    try:
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            until_redis_answers(step)
        assert time.monotonic() - started < 1.0
    finally:
        stamina.set_testing(False)
        client.close()
    assert len(tries) == 3


def test_only_redis_waits_log_the_redis_line(waits):
    """The retry hook logs our line for a retry caused by Redis being unavailable, and leaves every
    other stamina retry (the Smartcar calls') to stamina's own line."""

    def retried_once(cause: Exception) -> None:
        for attempt in stamina.retry_context(on=type(cause), attempts=2):
            with attempt:
                raise cause

    stamina.set_testing(True, attempts=2)
    try:
        for cause in (ValueError("not Redis"), redis.ConnectionError("refused")):
            with pytest.raises(type(cause)):
                retried_once(cause)
    finally:
        stamina.set_testing(False)
    assert [(event, fields["error"]) for event, fields in waits.warnings] == [
        ("Redis unavailable; waiting", "ConnectionError")
    ]
