"""Connect capture: signed single-use states, `/connect/callback`, `/connect/start` and `connect-url`.

Callback tests serve the app with uvicorn and talk to it over real HTTP, with a real Redis and the
project's emulator standing in for Smartcar. "Going through Connect" is the emulator's control API
making a connection, which is what Smartcar's Connections API then lists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr

from cli.main import main
from core.config import Settings
from core.errors import ConfigurationError, InvalidConnectState
from core.redis.keys import TOKEN_KEY, TOKEN_LOCK_KEY
from core.smartcar.connections import connection_created_at
from core.store import db
from core.store.users import UserStore
from service.app import create_app
from service.connect import (
    BINDING_COOKIE,
    HOST_BINDING_COOKIE,
    connect_link,
    issue_state,
    state_keys,
    verify_state,
)
from tests.conftest import OLD_TOKEN
from tests.pipeline import CLIENT_ID, CLIENT_SECRET, inject
from tests.procs import LiveServer, role_user

# Alice connected her Tesla long ago: the emulator's seed lists that connection with an old createdAt.
SMARTCAR_ALICE = "9e8d7c6b-2222-4222-8222-222222222222"
TESLA = "5f0c1a2b-1111-4111-8111-111111111111"
SMARTCAR_BOB = "7b3e9c10-2f4d-4e8a-b1c2-9d8e7f6a5b02"
SMARTCAR_MALLORY = "4c1d2e3f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
ALICE, BOB, MALLORY = 1, 2, 7
APPLICATION_ID = "8a1c4f2e-1b2c-4d3e-9f00-0123456789ab"
REDIRECT = "https://ingest.example.test/connect/callback"


@pytest.fixture
def store(settings: Settings) -> Iterator[UserStore]:
    """A migrated database: Alice and Mallory unlinked, Bob linked."""
    db.upgrade(settings.database_url)
    users = UserStore(settings.database_url)
    users.add_user(ALICE, "alice@example.test", "Alice")
    users.add_user(BOB, "bob@example.test", "Bob", smartcar_user_id=SMARTCAR_BOB)
    users.add_user(MALLORY, "mallory@example.test", "Mallory")
    yield users
    users.dispose()


def smartcar_settings(settings: Settings, emulator_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "smartcar_client_id": CLIENT_ID,
        "smartcar_client_secret": SecretStr(CLIENT_SECRET),
        "smartcar_api_url": f"{emulator_url}/v3",
        "smartcar_token_url": f"{emulator_url}/oauth2/token",
        "smartcar_application_id": APPLICATION_ID,
        # Plain http like the test server, so the binding cookie is not Secure and httpx sends it.
        "connect_redirect_uri": "http://127.0.0.1/connect/callback",
        "connect_state_secret": SecretStr("state-secret-for-tests"),
        "connect_start_enabled": True,
    }
    values.update(overrides)
    return settings.model_copy(update=values)


@dataclass
class Web:
    """The app under uvicorn, the emulator behind it, and helpers that play browser and Smartcar."""

    url: str
    settings: Settings
    emulator: str

    def browser(self) -> httpx.Client:
        """A browser of its own: it keeps the cookies the app sets and follows no redirect."""
        return httpx.Client(base_url=self.url, follow_redirects=False)

    def start(self, browser: httpx.Client, user_id: int) -> str:
        """`/connect/start` in ``browser``; the state of the Connect URL it redirects to."""
        response = browser.get("/connect/start", params={"user": str(user_id)})
        assert response.status_code == 302, response.text
        return parse_qs(urlsplit(response.headers["location"]).query)["state"][0]

    def connect(self, smartcar_user_id: str, **fields: Any) -> None:
        """Smartcar's side of Connect: the user connects a vehicle, so a connection is made now."""
        body = {"userId": smartcar_user_id, "vehicleId": TESLA, **fields}
        httpx.post(f"{self.emulator}/_emulator/connections", json=body).raise_for_status()

    @staticmethod
    def callback(browser: httpx.Client, smartcar_user_id: str, state: str) -> httpx.Response:
        """Connect's redirect back to us, as ``browser`` follows it."""
        return browser.get("/connect/callback", params={"user_id": smartcar_user_id, "state": state, "code": "x"})

    def unbound_state(self, user_id: int, ttl_seconds: int | None = None) -> str:
        """A state as `connect-url` makes it: bound to no browser."""
        ttl = self.settings.connect_state_ttl_seconds if ttl_seconds is None else ttl_seconds
        return issue_state(state_keys(self.settings), user_id, ttl)


@pytest.fixture
def web(settings: Settings, emulator: str, store: UserStore) -> Iterator[Web]:
    configured = smartcar_settings(settings, emulator)
    with LiveServer(create_app(configured)) as server:
        yield Web(server.url, configured, emulator)


def smartcar_id_of(store: UserStore, user_id: int) -> str | None:
    """The Smartcar user id stored for ``user_id``, found by the workers' own lookup.

    These tests only ever send the three Smartcar user ids below (anything else is refused before
    it reaches the store), so a user holding none of them holds none at all.
    """
    linked = [
        smartcar_id
        for smartcar_id in (SMARTCAR_ALICE, SMARTCAR_BOB, SMARTCAR_MALLORY)
        if (user := store.find_by_smartcar_user_id(smartcar_id)) is not None and user.id == user_id
    ]
    assert len(linked) <= 1, linked
    return linked[0] if linked else None


def error_of(response: httpx.Response) -> dict[str, str]:
    return dict(response.json()["error"])


# The audit's attacks, each over real HTTP


def test_happy_path_links_the_user_once_smartcar_lists_the_new_connection(web, store):
    """Start, Connect, callback in one browser: 200 linked, the binding cookie is cleared, the id is stored."""
    with web.browser() as alice:
        state = web.start(alice, ALICE)
        web.connect(SMARTCAR_ALICE)
        response = web.callback(alice, SMARTCAR_ALICE, state)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "linked", "userId": ALICE, "smartcarUserId": SMARTCAR_ALICE}
    assert response.headers["cache-control"] == "no-store"
    cleared = response.headers["set-cookie"]
    assert cleared.startswith(f"{BINDING_COOKIE}=")
    assert "Max-Age=0" in cleared
    assert smartcar_id_of(store, ALICE) == SMARTCAR_ALICE


def test_someone_elses_smartcar_user_id_is_refused_and_the_owner_links_later(web, store):
    """Mallory's valid state with Alice's Smartcar id is refused, burns the state, changes nothing; Alice then links."""
    with web.browser() as mallory:
        state = web.start(mallory, MALLORY)
        attack = web.callback(mallory, SMARTCAR_ALICE, state)
        assert attack.status_code == 403, attack.text
        assert error_of(attack)["code"] == "unverified_user"
        assert SMARTCAR_ALICE not in attack.text
        assert smartcar_id_of(store, MALLORY) is None
        assert store.find_by_smartcar_user_id(SMARTCAR_ALICE) is None
        # The forged attempt spent the state: not even Mallory's own, genuine connection can use it now.
        web.connect(SMARTCAR_MALLORY)
        assert error_of(web.callback(mallory, SMARTCAR_MALLORY, state))["code"] == "state_used"
        assert smartcar_id_of(store, MALLORY) is None
    with web.browser() as alice:
        state = web.start(alice, ALICE)
        web.connect(SMARTCAR_ALICE)
        genuine = web.callback(alice, SMARTCAR_ALICE, state)
    assert genuine.status_code == 200, genuine.text
    owner = store.find_by_smartcar_user_id(SMARTCAR_ALICE)
    assert owner is not None
    assert owner.id == ALICE


def test_a_state_is_single_use(web, store):
    """Replaying a redeemed state with its cookie, with the same or another Smartcar id, is 400 state_used."""
    with web.browser() as alice:
        state = web.start(alice, ALICE)
        binding = alice.cookies[BINDING_COOKIE]
        web.connect(SMARTCAR_ALICE)
        assert web.callback(alice, SMARTCAR_ALICE, state).status_code == 200
        assert BINDING_COOKIE not in alice.cookies  # the success cleared it
    web.connect(SMARTCAR_MALLORY)
    # Whoever copied both the URL and the cookie (or a browser that kept the cookie) replays it.
    with web.browser() as copy:
        copy.cookies.set(BINDING_COOKIE, binding)
        for smartcar_user_id in (SMARTCAR_ALICE, SMARTCAR_MALLORY):
            replay = web.callback(copy, smartcar_user_id, state)
            assert replay.status_code == 400
            assert error_of(replay)["code"] == "state_used"
    assert smartcar_id_of(store, ALICE) == SMARTCAR_ALICE
    assert store.find_by_smartcar_user_id(SMARTCAR_MALLORY) is None


def test_an_unbound_state_is_single_use_even_when_redeemed_concurrently(web, store):
    """Two redemptions of one `connect-url` state racing each other: exactly one links, the other is state_used."""
    state = web.unbound_state(ALICE)
    web.connect(SMARTCAR_ALICE)
    httpx.post(f"{web.emulator}/_emulator/latency", json={"seconds": 0.3}).raise_for_status()

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=web.url) as client:
            params = {"user_id": SMARTCAR_ALICE, "state": state}
            return list(await asyncio.gather(*(client.get("/connect/callback", params=params) for _ in range(2))))

    responses = asyncio.run(race())
    assert sorted(r.status_code for r in responses) == [200, 400]
    assert [error_of(r)["code"] for r in responses if r.status_code == 400] == ["state_used"]
    assert smartcar_id_of(store, ALICE) == SMARTCAR_ALICE


def test_a_state_from_start_needs_the_cookie_of_the_browser_that_asked_for_it(web, store):
    """Mallory's state redeemed in Alice's browser, with no cookie or with Alice's own, is refused and not spent."""
    with web.browser() as mallory:
        state = web.start(mallory, MALLORY)
        web.connect(SMARTCAR_ALICE)
        with web.browser() as no_cookie:
            refused = web.callback(no_cookie, SMARTCAR_ALICE, state)
        assert refused.status_code == 400
        assert error_of(refused)["code"] == "browser_mismatch"
        with web.browser() as alice:
            web.start(alice, ALICE)  # Alice's browser now holds a binding cookie of its own
            assert BINDING_COOKIE in alice.cookies
            refused = web.callback(alice, SMARTCAR_ALICE, state)
        assert refused.status_code == 400
        assert error_of(refused)["code"] == "browser_mismatch"
        assert store.find_by_smartcar_user_id(SMARTCAR_ALICE) is None
        # Refusals before verification spend nothing: the browser that asked can still finish.
        web.connect(SMARTCAR_MALLORY)
        assert web.callback(mallory, SMARTCAR_MALLORY, state).status_code == 200
    assert smartcar_id_of(store, MALLORY) == SMARTCAR_MALLORY


def test_conflicts_answer_one_body_that_names_no_id(web, store):
    """Both kinds of link conflict answer the same 409 body, naming neither Smartcar ids nor internal users."""
    bodies = []
    with web.browser() as bob:  # Bob is already linked; he connects with a second Smartcar account
        state = web.start(bob, BOB)
        web.connect(SMARTCAR_MALLORY)
        bodies.append(web.callback(bob, SMARTCAR_MALLORY, state))
    with web.browser() as alice:  # Alice presents a Smartcar id that Bob holds, freshly connected
        state = web.start(alice, ALICE)
        web.connect(SMARTCAR_BOB)
        bodies.append(web.callback(alice, SMARTCAR_BOB, state))
    assert [r.status_code for r in bodies] == [409, 409]
    assert bodies[0].json() == bodies[1].json()
    assert error_of(bodies[0])["code"] == "link_conflict"
    for leak in (SMARTCAR_BOB, SMARTCAR_MALLORY, "user 1", "user 2"):
        assert leak not in bodies[0].text
    assert smartcar_id_of(store, BOB) == SMARTCAR_BOB
    assert smartcar_id_of(store, ALICE) is None


def test_without_a_creation_time_the_callback_fails_closed_and_points_at_backfill(web, store):
    """When Smartcar's connections carry no creation time, nothing is linked: 409 cannot_verify naming `backfill`."""
    with web.browser() as alice:
        state = web.start(alice, ALICE)
        web.connect(SMARTCAR_MALLORY, createdAt=None)
        response = web.callback(alice, SMARTCAR_MALLORY, state)
    assert response.status_code == 409, response.text
    error = error_of(response)
    assert error["code"] == "cannot_verify"
    assert "backfill" in error["message"]
    assert store.find_by_smartcar_user_id(SMARTCAR_MALLORY) is None


@pytest.mark.parametrize(
    ("rule", "retry_after"),
    [
        pytest.param({"path": "/v3/connections", "status": 502, "rate": 1.0}, "5", id="connections-5xx"),
        pytest.param({"path": "/v3/connections", "status": 429, "retry_after": 7, "rate": 1.0}, "7", id="rate-limited"),
        pytest.param({"path": "/oauth2/token", "status": 503, "rate": 1.0}, "5", id="token-5xx"),
        pytest.param({"path": "/oauth2/token", "status": 401, "rate": 1.0}, "5", id="token-refused"),
    ],
)
def test_upstream_trouble_is_503_and_the_state_still_works_afterwards(web, store, rule, retry_after):
    """While Smartcar fails, the callback answers 503 with Retry-After and spends nothing; once it recovers, it links."""
    with web.browser() as alice:
        state = web.start(alice, ALICE)
        web.connect(SMARTCAR_ALICE)
        inject(web.emulator, **rule)
        response = web.callback(alice, SMARTCAR_ALICE, state)
        assert response.status_code == 503, response.text
        assert error_of(response)["code"] == "unavailable"
        assert response.headers["retry-after"] == retry_after
        assert smartcar_id_of(store, ALICE) is None
        httpx.delete(f"{web.emulator}/_emulator/failures").raise_for_status()
        again = web.callback(alice, SMARTCAR_ALICE, state)
    assert again.status_code == 200, again.text
    assert smartcar_id_of(store, ALICE) == SMARTCAR_ALICE


def test_the_callback_runs_as_the_web_redis_user_made_for_connect(settings, emulator, store, redis_client):
    """`redis-acl web --connect`: as that restricted user the callback fetches and shares the token (past
    a planted lock), spends the state, gives it back after a failure, and links on the retry."""
    redis_client.set(TOKEN_LOCK_KEY, "never-expires")  # read as not a lock of ours, and refreshed past
    with role_user(settings.redis_url, settings, "web", connect=True) as url:
        configured = smartcar_settings(settings, emulator, redis_url=url)
        with LiveServer(create_app(configured)) as server, httpx.Client(base_url=server.url) as alice:
            web = Web(server.url, configured, emulator)
            state = web.start(alice, ALICE)
            web.connect(SMARTCAR_ALICE)
            inject(emulator, path="/v3/connections", status=502, rate=1.0)
            failed = web.callback(alice, SMARTCAR_ALICE, state)
            httpx.delete(f"{emulator}/_emulator/failures").raise_for_status()
            linked = web.callback(alice, SMARTCAR_ALICE, state)
    assert (failed.status_code, linked.status_code) == (503, 200), (failed.text, linked.text)
    assert smartcar_id_of(store, ALICE) == SMARTCAR_ALICE
    assert redis_client.get(TOKEN_KEY) is not None


def test_without_client_credentials_the_web_takes_webhooks_but_the_callback_is_503(settings, emulator, store):
    """No SMARTCAR_CLIENT_ID/SECRET: the web starts, /healthz answers, the callback is 503 naming both settings."""
    configured = smartcar_settings(settings, emulator, smartcar_client_id=None, smartcar_client_secret=None)
    with LiveServer(create_app(configured)) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/healthz").status_code == 200
        state = issue_state(state_keys(configured), ALICE, 3600)
        response = client.get("/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state})
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "unavailable"
    assert "SMARTCAR_CLIENT_ID" in error["message"]
    assert "SMARTCAR_CLIENT_SECRET" in error["message"]
    assert len(error["message"].splitlines()) == 1
    assert smartcar_id_of(store, ALICE) is None


def test_a_connection_made_before_the_state_does_not_count(web, store):
    """A connection older than the state (beyond the clock-skew allowance) does not verify: 403, nothing stored."""
    with web.browser() as alice:
        state = web.start(alice, ALICE)
        web.connect(SMARTCAR_MALLORY, createdAt=int((time.time() - 3600) * 1000))
        response = web.callback(alice, SMARTCAR_MALLORY, state)
    assert response.status_code == 403
    assert error_of(response)["code"] == "unverified_user"
    assert store.find_by_smartcar_user_id(SMARTCAR_MALLORY) is None


# The rest of the callback


def test_callback_accepts_the_camel_case_user_id(web, store):
    """`userId` (one mirror of the migration guide spells it so) works like `user_id`."""
    web.connect(SMARTCAR_ALICE)
    response = httpx.get(
        f"{web.url}/connect/callback", params={"userId": SMARTCAR_ALICE, "state": web.unbound_state(1)}
    )
    assert response.status_code == 200, response.text
    assert smartcar_id_of(store, ALICE) == SMARTCAR_ALICE


def test_expired_state_is_400_and_changes_nothing(web, store):
    """A genuine state whose expiry has come (here: issued with no time to live) is refused with expired_state."""
    state = web.unbound_state(ALICE, ttl_seconds=0)
    web.connect(SMARTCAR_ALICE)
    response = httpx.get(f"{web.url}/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state})
    assert response.status_code == 400
    assert error_of(response)["code"] == "expired_state"
    assert smartcar_id_of(store, ALICE) is None


def _field(index: int, value: str):
    def tamper(state: str) -> str:
        parts = state.split(".")
        parts[index] = value
        return ".".join(parts)

    return tamper


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(_field(1, "7"), id="other-user"),
        pytest.param(_field(2, "1000000000"), id="issued"),
        pytest.param(_field(3, "99999999999"), id="expiry"),
        pytest.param(_field(4, "b"), id="binding"),
        pytest.param(lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"), id="mac"),
        pytest.param(lambda s: "garbage", id="garbage"),
        pytest.param(lambda s: s + "." + "x" * 200, id="long"),
    ],
)
def test_tampered_state_is_400_and_changes_nothing(web, store, tamper):
    """A state whose user, times, binding or MAC was altered, or that is not a state at all, is refused."""
    web.connect(SMARTCAR_ALICE)
    state = tamper(web.unbound_state(ALICE))
    response = httpx.get(f"{web.url}/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state})
    assert response.status_code == 400
    assert error_of(response)["code"] in ("invalid_state", "browser_mismatch")
    assert store.find_by_smartcar_user_id(SMARTCAR_ALICE) is None


def test_state_signed_with_another_key_is_refused(web, store):
    """A well-formed state signed with a key this service does not hold is invalid_state."""
    foreign = web.settings.model_copy(update={"connect_state_secret": SecretStr("somebody-else")})
    state = issue_state(state_keys(foreign), ALICE, 3600)
    response = httpx.get(f"{web.url}/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state})
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_state"


def test_a_state_of_the_previous_version_is_refused_with_a_clear_message(web):
    """A v1 state (made before states became single-use) is refused, saying to ask for a new link."""
    response = httpx.get(
        f"{web.url}/connect/callback",
        params={"user_id": SMARTCAR_ALICE, "state": "v1.1.1800000000.AAAAAAAAAAA." + "A" * 43},
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_state"
    assert "new one" in error["message"]
    assert "earlier version" in error["message"]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"user_id": SMARTCAR_ALICE}, "invalid_state"),
        ({"state": None}, "missing_user_id"),
        ({"state": None, "user_id": "  "}, "missing_user_id"),
        ({"state": None, "user_id": "<script>"}, "invalid_user_id"),
        ({"state": None, "user_id": "x" * 37}, "invalid_user_id"),
    ],
)
def test_missing_state_or_user_id_is_400_and_spends_nothing(web, store, params, code):
    """No state, or no usable user_id next to a valid one, is a 400 naming what is wrong; the state stays usable."""
    state = web.unbound_state(ALICE)
    params = {key: value if value is not None else state for key, value in params.items()}
    response = httpx.get(f"{web.url}/connect/callback", params=params)
    assert response.status_code == 400
    assert error_of(response)["code"] == code
    web.connect(SMARTCAR_ALICE)
    after = httpx.get(f"{web.url}/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state})
    assert after.status_code == 200, after.text


def test_connect_error_parameters_are_shown_plainly(web, store):
    """Connect's error and error_description come back in a 400 message; nothing is stored."""
    params = {
        "error": "vehicle_incompatible",
        "error_description": "The vehicle is not compatible.\n",
        "state": web.unbound_state(ALICE),
        "make": "TESLA",
        "model": "Roadster",
        "year": "2008",
    }
    response = httpx.get(f"{web.url}/connect/callback", params=params)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "connect_failed"
    assert error["message"] == (
        "Smartcar Connect did not finish: vehicle_incompatible (The vehicle is not compatible); "
        "vehicle: 2008 TESLA Roadster. Nothing was changed."
    )
    assert smartcar_id_of(store, ALICE) is None


def test_state_for_a_user_that_no_longer_exists_is_404_without_naming_it(web):
    """A genuine, verified state naming a user who is gone answers 404 user_not_found, without the user id."""
    web.connect(SMARTCAR_ALICE)
    state = web.unbound_state(99)
    response = httpx.get(f"{web.url}/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state})
    assert response.status_code == 404
    assert error_of(response)["code"] == "user_not_found"
    assert "99" not in error_of(response)["message"]


def test_state_signed_before_a_management_token_rotation_still_verifies(settings, emulator, store):
    """Without CONNECT_STATE_SECRET every management token's key verifies, so rotation keeps links working."""
    configured = smartcar_settings(settings, emulator, connect_state_secret=None)
    old_only = configured.model_copy(update={"smartcar_management_token": SecretStr(OLD_TOKEN)})
    httpx.post(f"{emulator}/_emulator/connections", json={"userId": SMARTCAR_ALICE, "vehicleId": TESLA})
    with LiveServer(create_app(configured)) as server:
        state = issue_state(state_keys(old_only), ALICE, 3600)
        response = httpx.get(f"{server.url}/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state})
    assert response.status_code == 200, response.text


def test_without_a_database_the_callback_is_503_and_the_state_survives(settings, emulator, tmp_path):
    """The store is made on first use: a callback without a database is a 503 that spends nothing."""
    database = tmp_path / "later" / "users.db"
    configured = smartcar_settings(settings, emulator, database_url=f"sqlite:///{database}")
    httpx.post(f"{emulator}/_emulator/connections", json={"userId": SMARTCAR_ALICE, "vehicleId": TESLA})
    with LiveServer(create_app(configured)) as server:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        state = issue_state(state_keys(configured), ALICE, 3600)
        params = {"user_id": SMARTCAR_ALICE, "state": state}
        response = httpx.get(f"{server.url}/connect/callback", params=params)
        assert response.status_code == 503
        assert error_of(response)["code"] == "unavailable"
        assert response.headers["retry-after"] == "5"
        database.parent.mkdir()
        db.upgrade(configured.database_url)
        users = UserStore(configured.database_url)
        users.add_user(ALICE, "alice@example.test", "Alice")
        users.dispose()
        again = httpx.get(f"{server.url}/connect/callback", params=params)
    assert again.status_code == 200, again.text


# /connect/start


def test_start_is_absent_unless_enabled(settings, store):
    """`/connect/start` signs states for anyone, so by default it does not exist."""
    with LiveServer(create_app(settings)) as server:
        assert httpx.get(f"{server.url}/connect/start", params={"user": "1"}).status_code == 404


def test_start_redirects_to_connect_with_a_bound_state_and_a_strict_cookie(web):
    """Enabled, `/connect/start?user=ID` redirects to Connect with a state for ID bound to an HttpOnly, Lax cookie."""
    with web.browser() as browser:
        response = browser.get("/connect/start", params={"user": "1"})
        assert browser.get("/connect/start", params={"user": "one"}).status_code == 400
        binding = browser.cookies[BINDING_COOKIE]
        # Past int()'s 4,300 digits: too large, or (leading zeros read past, as the document says) user 1.
        assert browser.get("/connect/start", params={"user": "9" * 5000}).status_code == 400
        assert browser.get("/connect/start", params={"user": "0" * 5000 + "1"}).status_code == 302
        assert browser.get("/connect/start", params={"user": "0" * 5000}).status_code == 400
    assert response.status_code == 302
    assert response.headers["cache-control"] == "no-store"
    cookie = response.headers["set-cookie"]
    for attribute in ("HttpOnly", "Path=/connect", "SameSite=lax", f"Max-Age={web.settings.connect_state_ttl_seconds}"):
        assert attribute in cookie
    assert "Secure" not in cookie  # the redirect URI is plain http here
    state = parse_qs(urlsplit(response.headers["location"]).query)["state"][0]
    keys = state_keys(web.settings)
    assert verify_state(keys, state, binding).user_id == 1
    for wrong in (None, binding + "x"):
        with pytest.raises(InvalidConnectState) as caught:
            verify_state(keys, state, wrong)
        assert caught.value.code == "browser_mismatch"


def test_start_cookie_is_a_host_cookie_when_the_callback_is_https(settings, emulator, store):
    """With an https CONNECT_REDIRECT_URI the binding cookie is ``__Host-``: Secure, Path=/, no Domain, so
    no sibling subdomain or plain-http page can plant or overwrite it."""
    configured = smartcar_settings(
        settings, emulator, connect_redirect_uri="https://example.test/ingest/connect/callback"
    )
    with LiveServer(create_app(configured)) as server:
        response = httpx.get(f"{server.url}/connect/start", params={"user": "1"})
    assert response.status_code == 302
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{HOST_BINDING_COOKIE}=")
    assert HOST_BINDING_COOKIE.startswith("__Host-")
    assert "Secure" in cookie
    assert "Path=/;" in cookie or cookie.endswith("Path=/")
    assert "Domain" not in cookie


@pytest.mark.parametrize("path", ["/connect/callback/", "/healthz/", "/webhooks/smartcar/"])
def test_a_trailing_slash_is_never_redirected_to_the_host_the_request_named(web, path):
    """Starlette's slash redirect built its Location from the Host header: an open redirect to any host."""
    response = httpx.get(f"{web.url}{path}", params={"state": "x"}, headers={"Host": "evil.example"})
    assert "evil.example" not in response.headers.get("location", "")
    assert response.status_code == 404


def test_start_enabled_without_connect_settings_refuses_to_start(settings):
    """CONNECT_START_ENABLED without CONNECT_REDIRECT_URI stops the web at startup with one line."""
    enabled = settings.model_copy(update={"connect_start_enabled": True, "smartcar_client_id": "client_x"})
    with pytest.raises(ConfigurationError, match="CONNECT_REDIRECT_URI"):
        create_app(enabled)


# States and Connect URLs, without a server


def connect_settings(settings: Settings, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "smartcar_application_id": APPLICATION_ID,
        "connect_redirect_uri": REDIRECT,
        "connect_state_secret": SecretStr("state-secret"),
    }
    values.update(overrides)
    return settings.model_copy(update=values)


def test_connect_link_has_the_documented_parameters(settings):
    """The URL goes to Connect with response_type, client_id, redirect_uri, scope, mode and a verifiable state."""
    configured = connect_settings(settings, connect_mode="simulated")
    before = int(time.time())
    url, note = connect_link(configured, 42)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "connect.smartcar.com", "/oauth/authorize")
    assert "scope=read_vehicle_info%20read_battery" in parts.query
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    assert query["response_type"] == "code"
    assert query["client_id"] == APPLICATION_ID
    assert query["redirect_uri"] == REDIRECT
    assert query["scope"] == configured.connect_scope
    assert query["mode"] == "simulated"
    assert note is None
    state = verify_state(state_keys(configured), query["state"])
    assert before <= state.issued_at <= time.time()
    assert (state.user_id, state.expires_at, state.bound) == (42, state.issued_at + 3600, False)
    with pytest.raises(InvalidConnectState) as caught:
        verify_state(state_keys(settings), query["state"])  # another key
    assert caught.value.code == "invalid_state"
    # A state is refused from the second its expiry names on: with no time to live, at once.
    expiring = issue_state(state_keys(configured), 42, 0)
    with pytest.raises(InvalidConnectState) as caught:
        verify_state(state_keys(configured), expiring)
    assert caught.value.code == "expired_state"


def test_states_are_distinct_and_carry_their_nonce(settings):
    """Every state has its own nonce, so each one can be spent separately."""
    keys = state_keys(connect_settings(settings))
    states = {verify_state(keys, issue_state(keys, 1, 60)).nonce for _ in range(50)}
    assert len(states) == 50


def test_connect_link_falls_back_to_the_client_id_with_a_note(settings):
    """Without SMARTCAR_APPLICATION_ID the client id stands in, and the note says why that may fail."""
    url, note = connect_link(
        connect_settings(settings, smartcar_application_id=None, smartcar_client_id="client_abc"), 1
    )
    assert "client_id=client_abc" in url
    assert note is not None
    assert "SMARTCAR_APPLICATION_ID" in note


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        pytest.param({"attributes": {"createdAt": "2026-11-28T17:00:00.123Z"}}, 1795885200.123, id="iso-z"),
        pytest.param({"attributes": {"createdAt": "2026-11-28T18:00:00+01:00"}}, 1795885200.0, id="iso-offset"),
        pytest.param({"attributes": {"createdAt": "2026-11-28T17:00:00"}}, 1795885200.0, id="iso-naive-is-utc"),
        pytest.param({"attributes": {"connectedAt": 1795885200}}, 1795885200.0, id="epoch-seconds"),
        pytest.param({"attributes": {"connectedAt": 1795885200123}}, 1795885200.123, id="epoch-ms"),
        pytest.param({"createdAt": "1795885200"}, 1795885200.0, id="top-level-digits"),
        pytest.param({"connectedAt": "2026-11-28T17:00:00Z"}, 1795885200.0, id="top-level-connected"),
        pytest.param({"attributes": {"createdAt": "yesterday"}, "connectedAt": 1795885200}, 1795885200.0, id="next"),
        pytest.param({"attributes": {"createdAt": True}}, None, id="bool"),
        pytest.param({"attributes": {"createdAt": "soon"}}, None, id="text"),
        pytest.param({"attributes": {"createdAt": -5}}, None, id="negative"),
        pytest.param({"attributes": {}}, None, id="absent"),
        pytest.param("not an item", None, id="not-a-dict"),
        pytest.param({"createdAt": "9" * 5000}, None, id="5000-digits"),
        pytest.param({"createdAt": "9" * 5000, "connectedAt": 1795885200}, 1795885200.0, id="5000-digits-then-next"),
    ],
)
def test_connection_creation_time_is_read_from_the_likely_fields(item, expected):
    """createdAt/connectedAt, in attributes or at the top level, as ISO-8601 or epoch (s or ms); else None."""
    found = connection_created_at(item)
    assert found == pytest.approx(expected) if expected is not None else found is None


# connect-url


def cli_environment(monkeypatch, tmp_path, **values: str) -> None:
    monkeypatch.chdir(tmp_path)
    for name in (
        "SMARTCAR_APPLICATION_ID",
        "SMARTCAR_CLIENT_ID",
        "CONNECT_REDIRECT_URI",
        "CONNECT_STATE_SECRET",
        "CONNECT_MODE",
        "SMARTCAR_MANAGEMENT_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


MANAGEMENT_TOKEN = "amt-for-the-cli-tests"


def test_cli_connect_url_prints_an_unbound_single_use_url(monkeypatch, tmp_path, capsys):
    """`connect-url --user-id 7` prints one URL whose state names user 7, bound to no browser, and says so."""
    cli_environment(
        monkeypatch,
        tmp_path,
        SMARTCAR_APPLICATION_ID=APPLICATION_ID,
        CONNECT_REDIRECT_URI=REDIRECT,
        SMARTCAR_MANAGEMENT_TOKEN=MANAGEMENT_TOKEN,
    )
    assert main(["connect-url", "--user-id", "7", "--mode", "test"]) == 0
    captured = capsys.readouterr()
    [url] = captured.out.splitlines()
    query = {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}
    assert query["mode"] == "test"
    keys = state_keys(Settings(_env_file=None, smartcar_management_token=SecretStr(MANAGEMENT_TOKEN)))  # type: ignore[call-arg]
    state = verify_state(keys, query["state"])
    assert (state.user_id, state.bound) == (7, False)
    assert "valid until" in captured.err
    assert "usable once" in captured.err
    assert "only to that user" in captured.err


def test_cli_connect_url_names_every_missing_setting_in_one_line(monkeypatch, tmp_path, capsys):
    """Without an application id and a redirect URI `connect-url` exits 2 with one line naming both."""
    cli_environment(monkeypatch, tmp_path, SMARTCAR_MANAGEMENT_TOKEN=MANAGEMENT_TOKEN)
    assert main(["connect-url", "--user-id", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "SMARTCAR_APPLICATION_ID" in err
    assert "CONNECT_REDIRECT_URI" in err


def test_cli_connect_url_without_any_key_is_one_line(monkeypatch, tmp_path, capsys):
    """With neither CONNECT_STATE_SECRET nor a management token there is nothing to sign with: exit 2."""
    cli_environment(monkeypatch, tmp_path, SMARTCAR_APPLICATION_ID=APPLICATION_ID, CONNECT_REDIRECT_URI=REDIRECT)
    assert main(["connect-url", "--user-id", "7"]) == 2
    assert "CONNECT_STATE_SECRET" in capsys.readouterr().err


# The emulator's Connect stand-in


def test_emulator_lists_connections_made_at_run_time_with_their_creation_time(emulator):
    """A connection made through the control API is listed with createdAt (or without, when asked) and gone on reset."""
    httpx.post(
        f"{emulator}/_emulator/connections", json={"userId": SMARTCAR_BOB, "vehicleId": TESLA}
    ).raise_for_status()
    made = httpx.post(
        f"{emulator}/_emulator/connections", json={"userId": SMARTCAR_BOB, "vehicleId": TESLA, "createdAt": None}
    )
    assert made.status_code == 201
    token = httpx.post(
        f"{emulator}/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
    ).json()["access_token"]
    headers = {"authorization": f"Bearer {token}"}
    listed = httpx.get(f"{emulator}/v3/connections", params={"filter[userId]": SMARTCAR_BOB}, headers=headers).json()
    stamps = [item["attributes"].get("createdAt") for item in listed["data"]]
    assert len(stamps) == 2
    assert stamps[1] is None
    assert abs(connection_created_at(listed["data"][0]) - time.time()) < 60  # type: ignore[operator]
    vehicle = httpx.get(f"{emulator}/v3/vehicles/{TESLA}", headers={**headers, "sc-user-id": SMARTCAR_BOB})
    assert vehicle.status_code == 200
    seeded = httpx.get(f"{emulator}/v3/connections", params={"filter[userId]": SMARTCAR_ALICE}, headers=headers).json()
    assert seeded["data"][0]["attributes"]["createdAt"] == "2025-06-01T00:00:00.000Z"
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    token = httpx.post(
        f"{emulator}/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
    ).json()["access_token"]
    after = httpx.get(
        f"{emulator}/v3/connections",
        params={"filter[userId]": SMARTCAR_BOB},
        headers={"authorization": f"Bearer {token}"},
    ).json()
    assert after["data"] == []
