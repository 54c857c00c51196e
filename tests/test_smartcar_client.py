"""The token provider and the v3 client, with httpx.MockTransport standing in for Smartcar."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter

import httpx
import pytest
import stamina
from redis.asyncio import Redis

from core import metrics
from core.errors import (
    SmartcarRateLimited,
    SmartcarRejected,
    SmartcarUnauthorized,
    SmartcarUnavailable,
    TokenRequestFailed,
)
from core.redis.keys import APPLICATION_PAUSE_KEY, TOKEN_KEY, TOKEN_LOCK_KEY, vehicle_pause_key
from core.smartcar.client import SmartcarClient, parse_error
from core.smartcar.limiter import OverBudget, RequestLimiter
from core.smartcar.tokens import LOCK_SECONDS, AppToken, AppTokenProvider, TokenSeal

API = "https://vehicle.example.test/v3"
TOKEN_URL = "https://iam.example.test/oauth2/token"


class FakeSmartcar:
    """A scripted Smartcar: token requests counted, API answers queued per path."""

    def __init__(self) -> None:
        self.token_requests = 0
        self.token_forms: list[dict[str, list[str]]] = []
        self.answers: dict[str, list[httpx.Response]] = {}
        self.requests: list[httpx.Request] = []
        self.token_delay = 0.0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if str(request.url) == TOKEN_URL:
            self.token_requests += 1
            from urllib.parse import parse_qs

            self.token_forms.append(parse_qs(request.content.decode()))
            await asyncio.sleep(self.token_delay)
            return httpx.Response(
                200, json={"access_token": f"tok-{self.token_requests}", "token_type": "Bearer", "expires_in": 3600}
            )
        queue = self.answers.get(request.url.path, [])
        if queue:
            return queue.pop(0)
        return httpx.Response(200, json={"id": "v", "attributes": {"make": "M"}})


@pytest.fixture
def fake():
    return FakeSmartcar()


@pytest.fixture
def no_waits():
    stamina.set_testing(True, attempts=4)
    yield
    stamina.set_testing(False)


def run(coro):
    return asyncio.run(coro)


def using(redis_url, fake, scenario, **kwargs):
    """Run ``scenario(tokens, client)`` against ``fake`` and close what ``make`` opened."""

    async def run_it():
        redis, http, tokens, client = await make(redis_url, fake, **kwargs)
        try:
            return await scenario(tokens, client)
        finally:
            await http.aclose()
            await redis.aclose()

    return asyncio.run(run_it())


async def make(redis_url, fake, **kwargs):
    redis = Redis.from_url(redis_url)
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handler))
    tokens = AppTokenProvider(redis, http, TOKEN_URL, "client_x", "secret-x", **kwargs)
    return redis, http, tokens, SmartcarClient(http, API, tokens)


def test_token_request_is_form_encoded_client_credentials(redis_url, fake):
    """The token request is a form-encoded client-credentials grant."""

    async def scenario(tokens, _client):
        assert await tokens.get() == "tok-1"

    using(redis_url, fake, scenario)
    assert fake.token_forms == [
        {"grant_type": ["client_credentials"], "client_id": ["client_x"], "client_secret": ["secret-x"]}
    ]
    assert fake.requests[0].headers["content-type"] == "application/x-www-form-urlencoded"


def test_many_callers_in_many_providers_share_one_token_request(redis_url, fake):
    """Fifty concurrent callers across five providers (processes) cause one token request."""
    fake.token_delay = 0.05

    async def scenario():
        made = [await make(redis_url, fake) for _ in range(5)]
        results = await asyncio.gather(*(made[i % 5][2].get() for i in range(50)))
        for redis, http, _, _ in made:
            await http.aclose()
            await redis.aclose()
        return results

    assert set(run(scenario())) == {"tok-1"}
    assert fake.token_requests == 1


def test_token_near_expiry_is_refreshed_ahead_of_time(redis_url, fake, redis_client):
    """A shared token within the refresh margin is replaced before it expires."""
    import time

    redis_client.set(TOKEN_KEY, TokenSeal("client_x", "secret-x").seal(AppToken("old", time.time() + 60)))

    async def scenario(tokens, _client):
        token = await tokens.get()
        return token

    assert using(redis_url, fake, scenario) == "tok-1"


def test_refresh_uses_a_replacement_made_by_another_process(redis_url, fake, redis_client):
    """get(stale=...) returns a newer shared token without asking Smartcar again."""
    import time

    async def scenario(tokens, _client):
        first = await tokens.get()
        replacement = AppToken("from-elsewhere", time.time() + 3600)
        redis_client.set(TOKEN_KEY, TokenSeal("client_x", "secret-x").seal(replacement))
        second = await tokens.get(stale=first)
        return first, second

    assert using(redis_url, fake, scenario) == ("tok-1", "from-elsewhere")
    assert fake.token_requests == 1


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda r: r.set(TOKEN_LOCK_KEY, "held-for-ever"), id="lock-without-expiry"),
        pytest.param(lambda r: r.hset(TOKEN_LOCK_KEY, "f", "v"), id="lock-not-a-string"),
        pytest.param(lambda r: r.hset(TOKEN_KEY, "f", "v"), id="token-not-a-string"),
    ],
)
def test_a_planted_token_or_lock_does_not_stop_the_refresh(redis_url, fake, redis_client, plant):
    """Every lock of ours expires within LOCK_SECONDS: one that would not (or a key of another type) is
    not waited for, and a token key that is not a string is replaced, so no written key stops enrichment."""
    plant(redis_client)

    async def scenario(tokens, _client):
        async with asyncio.timeout(LOCK_SECONDS):
            return await tokens.get()

    assert using(redis_url, fake, scenario) == "tok-1"
    assert TokenSeal("client_x", "secret-x").open(redis_client.get(TOKEN_KEY)) is not None


def test_refused_credentials_are_permanent_and_name_no_secret(redis_url):
    """401 invalid_client from the token endpoint is TokenRequestFailed without the secret in it."""

    async def handler(request):
        return httpx.Response(401, json={"error": "invalid_client", "error_description": "secret-x is wrong"})

    async def scenario():
        redis = Redis.from_url(redis_url)
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        tokens = AppTokenProvider(redis, http, TOKEN_URL, "client_x", "secret-x")
        try:
            await tokens.get()
        finally:
            await http.aclose()
            await redis.aclose()

    with pytest.raises(TokenRequestFailed) as info:
        run(scenario())
    assert "invalid_client" in info.value.message
    assert "secret-x" not in info.value.message


def test_calls_carry_bearer_token_and_sc_user_id(redis_url, fake):
    """Vehicle reads send the app token and the sc-user-id header, to /vehicles/<id> exactly."""

    async def scenario(_tokens, client):
        await client.get_vehicle("veh-1_A", "user-1")

    using(redis_url, fake, scenario)
    request = fake.requests[-1]
    assert request.headers["authorization"] == "Bearer tok-1"
    assert request.headers["sc-user-id"] == "user-1"
    assert request.url.raw_path == b"/v3/vehicles/veh-1_A"


def test_401_refreshes_once_and_retries_once(redis_url, fake):
    """A 401 forces one token refresh and one retry."""
    fake.answers["/v3/vehicles/v"] = [httpx.Response(401, json={"errors": [{"status": "401"}]})]

    async def scenario(_tokens, client):
        vehicle = await client.get_vehicle("v", "u")
        return vehicle

    assert using(redis_url, fake, scenario)["attributes"]["make"] == "M"
    assert fake.token_requests == 2
    assert fake.requests[-1].headers["authorization"] == "Bearer tok-2"


def test_401_after_refresh_is_unauthorized(redis_url, fake):
    """A second 401 with a fresh token raises SmartcarUnauthorized, with no token in the message."""
    fake.answers["/v3/vehicles/v"] = [httpx.Response(401), httpx.Response(401)]

    async def scenario(_tokens, client):
        await client.get_vehicle("v", "u")

    with pytest.raises(SmartcarUnauthorized) as info:
        using(redis_url, fake, scenario)
    assert "tok-" not in info.value.message


def test_429_with_retry_after_is_honoured(redis_url, fake, no_waits):
    """A 429 is retried and the call then succeeds."""
    fake.answers["/v3/vehicles/v"] = [httpx.Response(429, headers={"retry-after": "0"}, json={})]

    async def scenario(_tokens, client):
        result = await client.get_vehicle("v", "u")
        return result

    assert using(redis_url, fake, scenario)["id"] == "v"


def test_5xx_until_the_budget_runs_out_raises_unavailable(redis_url, fake, no_waits):
    """Persistent 503s are retried, then SmartcarUnavailable is raised."""
    fake.answers["/v3/vehicles/v"] = [httpx.Response(503) for _ in range(10)]

    async def scenario(_tokens, client):
        await client.get_vehicle("v", "u")

    with pytest.raises(SmartcarUnavailable):
        using(redis_url, fake, scenario)
    assert len(fake.answers["/v3/vehicles/v"]) == 6  # four attempts made


def test_other_4xx_is_rejected_without_retry(redis_url, fake, no_waits):
    """A 404 is SmartcarRejected with type and code, and is not retried."""
    body = {"errors": [{"status": "404", "type": "RESOURCE_NOT_FOUND", "code": "VEHICLE_NOT_FOUND"}]}
    fake.answers["/v3/vehicles/v"] = [httpx.Response(404, json=body), httpx.Response(200, json={})]

    async def scenario(_tokens, client):
        await client.get_vehicle("v", "u")

    with pytest.raises(SmartcarRejected) as info:
        using(redis_url, fake, scenario)
    assert (info.value.status, info.value.error_type, info.value.error_code) == (
        404,
        "RESOURCE_NOT_FOUND",
        "VEHICLE_NOT_FOUND",
    )
    assert len(fake.answers["/v3/vehicles/v"]) == 1


def test_network_errors_are_transient(redis_url, no_waits):
    """A connection error becomes SmartcarUnavailable after the retries."""
    calls = 0

    async def handler(request):
        nonlocal calls
        if request.url.path.endswith("/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})
        calls += 1
        raise httpx.ConnectError("refused")

    async def scenario():
        redis = Redis.from_url(redis_url)
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = SmartcarClient(http, API, AppTokenProvider(redis, http, TOKEN_URL, "c", "s"))
        try:
            await client.get_vehicle("v", "u")
        finally:
            await http.aclose()
            await redis.aclose()

    with pytest.raises(SmartcarUnavailable):
        run(scenario())
    assert calls == 4


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (
            {
                "errors": [
                    {"type": "RESOURCE_NOT_FOUND", "code": "VEHICLE_NOT_FOUND", "meta": {"debug": {"requestId": "r1"}}}
                ]
            },
            {},
            ("RESOURCE_NOT_FOUND", "VEHICLE_NOT_FOUND", "r1"),
        ),
        (
            {"type": "VALIDATION", "code": "PARAMETER", "requestId": "r2", "statusCode": 400},
            {},
            ("VALIDATION", "PARAMETER", "r2"),
        ),
        ({"errors": [{"status": "404", "code": "not_found"}]}, {"sc-request-id": "r3"}, (None, "not_found", "r3")),
        ("not an object", {}, (None, None, None)),
    ],
)
def test_both_error_shapes_are_parsed(body, headers, expected):
    """errors[] and the flat object both yield type, code and request id."""
    assert parse_error(httpx.Response(400, json=body, headers=headers)) == expected


def test_signal_pages_are_followed_on_the_same_host_only(redis_url, fake):
    """links.next is followed on the API host; a link to another host is not (the token stays home)."""
    page = {"data": [{"id": "a"}], "links": {"next": f"{API}/vehicles/v/signals?page=2"}}
    evil = {"data": [{"id": "b"}], "links": {"next": "https://evil.example.test/steal"}}
    fake.answers["/v3/vehicles/v/signals"] = [httpx.Response(200, json=page), httpx.Response(200, json=evil)]

    async def scenario(_tokens, client):
        signals = await client.get_signals("v", "u")
        return signals

    assert [s["id"] for s in using(redis_url, fake, scenario)] == ["a", "b"]
    assert all(r.url.host != "evil.example.test" for r in fake.requests)


def test_rate_limited_error_carries_retry_after():
    """SmartcarRateLimited keeps the Retry-After seconds."""
    assert SmartcarRateLimited("x", 3.0).retry_after == 3.0


def test_cached_token_is_sealed_in_redis(redis_url, fake, redis_client):
    """Whoever reads Redis (a web pod, a dump) sees no token: only workers' client secret opens it."""

    async def scenario(tokens, _client):
        return await tokens.get()

    token = using(redis_url, fake, scenario)
    raw = redis_client.get(TOKEN_KEY)
    assert token.encode() not in raw
    assert b"access_token" not in raw
    opened = TokenSeal("client_x", "secret-x").open(raw)
    assert opened is not None
    assert opened.access_token == token
    assert TokenSeal("client_x", "another-secret").open(raw) is None
    assert TokenSeal("client_y", "secret-x").open(raw) is None


def test_unsealed_or_tampered_cache_is_ignored_and_replaced(redis_url, fake, redis_client):
    """A plain-text token planted in Redis is never used: the provider fetches its own."""
    import time

    redis_client.set(TOKEN_KEY, json.dumps({"access_token": "planted", "expires_at": time.time() + 3600}))

    async def scenario(tokens, _client):
        return await tokens.get()

    assert using(redis_url, fake, scenario) == "tok-1"
    sealed = bytearray(redis_client.get(TOKEN_KEY))
    sealed[-3] ^= 1  # flip a bit of the ciphertext
    assert TokenSeal("client_x", "secret-x").open(bytes(sealed)) is None


@pytest.mark.parametrize(
    "vehicle_id", ["..", ".", "../../connections", "../connections", "a/b", "%2e%2e", "", "v?x=1", "v#x", "x" * 65]
)
def test_a_vehicle_id_that_could_leave_its_path_is_never_requested(redis_url, fake, no_waits, vehicle_id):
    """A vehicle id like '..' is refused (InvalidPayload) before any request is built: no call leaves /vehicles/<id>."""
    from core.errors import InvalidPayload

    async def scenario(_tokens, client):
        calls = (
            lambda: client.get_vehicle(vehicle_id, "u"),
            lambda: client.get_signals(vehicle_id, "u"),
            lambda: client.get_signal(vehicle_id, "u", "vehicleidentification-vin"),
        )
        for call in calls:
            with pytest.raises(InvalidPayload):
                await call()

    using(redis_url, fake, scenario)
    assert fake.requests == []


def test_every_vehicle_request_stays_under_its_vehicle_path(redis_url, fake, no_waits):
    """With a Smartcar vehicle id, every API request path is /v3/vehicles/<id> or below; a dot signal code is refused."""
    from core.errors import InvalidPayload

    vehicle_id = "5f0c1a2b-1111-4111-8111-111111111111"

    async def scenario(_tokens, client):
        await client.get_vehicle(vehicle_id, "u")
        await client.get_signals(vehicle_id, "u")
        await client.get_signal(vehicle_id, "u", "a/b")
        for code in ("..", "."):
            with pytest.raises(InvalidPayload):
                await client.get_signal(vehicle_id, "u", code)

    using(redis_url, fake, scenario)
    paths = [request.url.path for request in fake.requests if str(request.url) != TOKEN_URL]
    assert len(paths) == 3
    assert all(path == f"/v3/vehicles/{vehicle_id}" or path.startswith(f"/v3/vehicles/{vehicle_id}/") for path in paths)


# With a gate: the deployment's limiter (core.smartcar.limiter) in front of every request


def gated(redis_url, fake, scenario, **limits):
    """Run ``scenario(client, limiter, redis)`` with a client whose requests pass a real RequestLimiter."""

    async def run_it():
        redis, http, tokens, _ = await make(redis_url, fake)
        limiter = RequestLimiter(redis, **limits)
        try:
            return await scenario(SmartcarClient(http, API, tokens, gate=limiter), limiter, redis)
        finally:
            await http.aclose()
            await redis.aclose()

    return asyncio.run(run_it())


def rate_limited(code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    return httpx.Response(
        429, headers=headers, json={"errors": [{"status": "429", "type": "RATE_LIMIT", "code": code}]}
    )


def test_every_request_passes_the_gate_pages_and_401_retries_included(redis_url, fake, no_waits):
    """Two signal pages and a vehicle read that met a 401: four requests, each admitted and counted."""
    page = {"data": [{"id": "a"}], "links": {"next": f"{API}/vehicles/v/signals?page=2"}}
    fake.answers["/v3/vehicles/v/signals"] = [httpx.Response(200, json=page), httpx.Response(200, json={"data": []})]
    fake.answers["/v3/vehicles/v"] = [httpx.Response(401, json={})]

    async def scenario(client, limiter, _redis):
        admitted, admit = Counter(), limiter.admit

        async def counted(vehicle_id):
            await admit(vehicle_id)
            admitted["admitted"] += 1

        limiter.admit = counted
        await client.get_signals("v", "u")
        signals = admitted["admitted"]
        await client.get_vehicle("v", "u")
        return {"signals": signals, "vehicle": admitted["admitted"] - signals}

    assert gated(redis_url, fake, scenario) == {"signals": 2, "vehicle": 2}


def test_a_vehicle_429_pauses_the_vehicle_for_every_process_and_the_retry_waits_it_out(
    redis_url, fake, redis_client, no_waits
):
    """429 RATE_LIMIT:VEHICLE with Retry-After 0.3: the vehicle's pause is written to Redis for
    every process, and the retry goes only once it has passed (stamina's own wait is off here)."""
    fake.answers["/v3/vehicles/v"] = [rate_limited("VEHICLE", "0.3")]

    async def scenario(client, _limiter, _redis):
        started = time.monotonic()
        body = await client.get_vehicle("v", "u")
        return body, time.monotonic() - started

    body, elapsed = gated(redis_url, fake, scenario)
    assert body["id"] == "v"
    assert elapsed >= 0.25
    assert redis_client.hget(vehicle_pause_key("v"), "until") is not None
    assert redis_client.exists(APPLICATION_PAUSE_KEY) == 0
    assert len([r for r in fake.requests if r.url.path == "/v3/vehicles/v"]) == 2


def test_an_application_429_pauses_the_application(redis_url, fake, redis_client, no_waits):
    """429 RATE_LIMIT:SMARTCAR_API (no Retry-After, as Smartcar documents it) pauses every call."""
    fake.answers["/v3/vehicles/v"] = [rate_limited("SMARTCAR_API")]

    async def scenario(client, _limiter, _redis):
        with pytest.raises(OverBudget) as refused:
            await client.get_vehicle("v", "u")
        return refused.value.cause

    assert gated(redis_url, fake, scenario, wait_seconds=0.5) == "application"
    assert redis_client.hget(APPLICATION_PAUSE_KEY, "until") is not None


@pytest.mark.parametrize("header", ["30", "inf", "Infinity", "1" + "0" * 400, "nan", "-inf"])
def test_a_request_the_gate_cannot_admit_in_time_is_never_sent_nor_retried(redis_url, fake, no_waits, header):
    """Retry-After 30 s against a 1 s wait, or one that is not a finite number (inf, nan, 10^400:
    read as absent, so the no-header rule's 2 s pause): one request went out (the 429), the retry is
    refused by the gate at once as OverBudget (a SmartcarRateLimited), nothing more is sent, and
    never an OverflowError."""
    fake.answers["/v3/vehicles/v"] = [rate_limited("VEHICLE", header)]

    async def scenario(client, _limiter, _redis):
        with pytest.raises(SmartcarRateLimited) as refused:
            await client.get_vehicle("v", "u")
        return refused.value

    refused = gated(redis_url, fake, scenario, wait_seconds=1)
    assert isinstance(refused, OverBudget)
    assert refused.cause == "vehicle"
    assert len([r for r in fake.requests if r.url.path == "/v3/vehicles/v"]) == 1


def test_without_a_gate_429s_are_retried_by_the_client_alone(redis_url, fake, redis_client, no_waits):
    """The operator tools' client (no gate) keeps its own 429 handling and writes no pause."""
    fake.answers["/v3/vehicles/v"] = [rate_limited("VEHICLE", "0")]

    async def scenario(_tokens, client):
        return await client.get_vehicle("v", "u")

    assert using(redis_url, fake, scenario)["id"] == "v"
    assert redis_client.exists(vehicle_pause_key("v")) == 0


@pytest.mark.parametrize(("header", "requests"), [("0.3", 2), ("30", 1)])
def test_without_testing_mode_a_retry_after_is_waited_only_within_the_budget(redis_url, fake, header, requests):
    """With stamina's real waits: a 429's ``Retry-After`` of 0.3 s is waited out and the retry
    counted; one of 30 s cannot end within the call's 30 s, so the 429 is raised at once."""
    fake.answers["/v3/vehicles/v"] = [httpx.Response(429, headers={"retry-after": header}, json={})]
    retried = metrics.SMARTCAR_RETRIES.labels(endpoint="vehicle")
    before = retried._value.get()

    async def scenario(_tokens, client):
        started = time.monotonic()
        with contextlib.suppress(SmartcarRateLimited):
            await client.get_vehicle("v", "u")
        return time.monotonic() - started

    elapsed = using(redis_url, fake, scenario)
    assert len([r for r in fake.requests if r.url.path == "/v3/vehicles/v"]) == requests
    assert retried._value.get() - before == requests - 1
    assert (elapsed >= 0.3) == (requests == 2)
    assert elapsed < 5


def _token_with_lifetime(redis_url, expires_in):
    async def handler(request):
        return httpx.Response(200, json={"access_token": "t", "expires_in": expires_in})

    async def scenario():
        redis = Redis.from_url(redis_url)
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        try:
            return await AppTokenProvider(redis, http, TOKEN_URL, "c", "s").get()
        finally:
            await http.aclose()
            await redis.aclose()

    return run(scenario())


@pytest.mark.parametrize("expires_in", ["inf", "nan", "-5", 0])
def test_a_token_answer_with_a_hostile_lifetime_is_not_a_usable_token(redis_url, redis_client, expires_in):
    """``expires_in`` of inf, nan, a negative or zero seconds is not a token lifetime: the refresh
    ends in SmartcarUnavailable (the job is retried), never an OverflowError, and nothing is cached."""
    with pytest.raises(SmartcarUnavailable, match="without a usable token"):
        _token_with_lifetime(redis_url, expires_in)
    assert redis_client.exists(TOKEN_KEY) == 0


def test_a_token_lifetime_past_a_day_is_held_for_a_day(redis_url, redis_client):
    """A lifetime of 1e300 seconds is taken as a day (the token is asked for again then), never an
    expiry Redis refuses."""
    assert _token_with_lifetime(redis_url, 1e300) == "t"
    assert 0 < redis_client.ttl(TOKEN_KEY) <= 86_400
