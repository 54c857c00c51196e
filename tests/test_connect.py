"""Connect capture: signed expiring state, `GET /connect/callback`, `/connect/start` and `connect-url`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from core import db
from core.config import Settings
from core.connect import connect_link, issue_state, state_keys, verify_state
from core.errors import ConfigurationError, ExpiredConnectState, InvalidConnectState
from core.users import UserStore
from service.app import create_app
from service.cli import main
from tests.conftest import OLD_TOKEN

SMARTCAR_ALICE = "0d8f2f5e-6a41-4c1e-9a52-6a3c6b1f2d01"
SMARTCAR_BOB = "7b3e9c10-2f4d-4e8a-b1c2-9d8e7f6a5b02"
APPLICATION_ID = "8a1c4f2e-1b2c-4d3e-9f00-0123456789ab"
REDIRECT = "https://ingest.example.test/connect/callback"


@pytest.fixture
def store(settings: Settings) -> Iterator[UserStore]:
    """A migrated database with Alice (unlinked) and Bob (linked)."""
    db.upgrade(settings.database_url)
    users = UserStore(settings.database_url)
    users.add_user(1, "alice@example.test", "Alice")
    users.add_user(2, "bob@example.test", "Bob", smartcar_user_id=SMARTCAR_BOB)
    yield users
    users.dispose()


@pytest.fixture
def web(settings: Settings, store: UserStore) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def state_for(settings: Settings, user_id: int, now: float | None = None) -> str:
    return issue_state(state_keys(settings), user_id, settings.connect_state_ttl_seconds, now)


def smartcar_id_of(store: UserStore, user_id: int) -> str | None:
    user = store.get_user(user_id)
    assert user is not None
    return user.smartcar_user_id


def test_callback_stores_the_user_id_for_the_user_the_state_names(web, settings, store):
    """A valid state and user_id link the user (200 linked); the same redirect again is already_linked."""
    params = {"user_id": SMARTCAR_ALICE, "state": state_for(settings, 1), "code": "ignored"}
    response = web.get("/connect/callback", params=params)
    assert response.status_code == 200
    assert response.json() == {"status": "linked", "userId": 1, "smartcarUserId": SMARTCAR_ALICE}
    assert response.headers["cache-control"] == "no-store"
    assert smartcar_id_of(store, 1) == SMARTCAR_ALICE
    again = web.get("/connect/callback", params=params)
    assert again.status_code == 200
    assert again.json()["status"] == "already_linked"


def test_callback_accepts_the_camel_case_user_id(web, settings, store):
    """`userId` (one mirror of the migration guide spells it so) works like `user_id`."""
    response = web.get("/connect/callback", params={"userId": SMARTCAR_ALICE, "state": state_for(settings, 1)})
    assert response.status_code == 200
    assert smartcar_id_of(store, 1) == SMARTCAR_ALICE


def test_expired_state_is_400_and_changes_nothing(web, settings, store):
    """A genuine state past CONNECT_STATE_TTL_SECONDS is refused with expired_state."""
    state = state_for(settings, 1, now=time.time() - settings.connect_state_ttl_seconds - 1)
    response = web.get("/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "expired_state"
    assert smartcar_id_of(store, 1) is None


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda s: s.replace("v1.1.", "v1.3.", 1), id="other-user"),
        pytest.param(lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"), id="mac"),
        pytest.param(lambda s: s.rsplit(".", 3)[0] + ".99999999999." + ".".join(s.rsplit(".", 2)[1:]), id="expiry"),
        pytest.param(lambda s: "garbage", id="garbage"),
        pytest.param(lambda s: s + "." + "x" * 200, id="long"),
    ],
)
def test_tampered_state_is_400_and_changes_nothing(web, settings, store, tamper):
    """A state whose user, expiry or MAC was altered, or that is not a state at all, is invalid_state."""
    response = web.get("/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": tamper(state_for(settings, 1))})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_state"
    assert smartcar_id_of(store, 1) is None


def test_state_signed_with_another_key_is_refused(web, settings, store):
    """A well-formed state signed with a key this service does not hold is invalid_state."""
    foreign = settings.model_copy(update={"connect_state_secret": SecretStr("somebody-else")})
    response = web.get("/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state_for(foreign, 1)})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_state"


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
def test_missing_state_or_user_id_is_400_and_changes_nothing(web, settings, store, params, code):
    """No state, or no usable user_id next to a valid one, is a 400 naming what is wrong."""
    params = {key: value if value is not None else state_for(settings, 1) for key, value in params.items()}
    response = web.get("/connect/callback", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert smartcar_id_of(store, 1) is None


def test_connect_error_parameters_are_shown_plainly(web, settings, store):
    """Connect's error and error_description come back in a 400 message; nothing is stored."""
    params = {
        "error": "vehicle_incompatible",
        "error_description": "The vehicle is not compatible.\n",
        "state": state_for(settings, 1),
        "make": "TESLA",
        "model": "Roadster",
        "year": "2008",
    }
    response = web.get("/connect/callback", params=params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "connect_failed"
    assert error["message"] == (
        "Smartcar Connect did not finish: vehicle_incompatible (The vehicle is not compatible); "
        "vehicle: 2008 TESLA Roadster. Nothing was changed."
    )
    assert smartcar_id_of(store, 1) is None


def test_link_conflict_is_409_and_keeps_the_existing_link(web, settings, store):
    """A user already linked to another Smartcar user, or an id held by another user, answers 409."""
    mine = web.get("/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state_for(settings, 2)})
    assert mine.status_code == 409
    assert mine.json()["error"]["code"] == "link_conflict"
    theirs = web.get("/connect/callback", params={"user_id": SMARTCAR_BOB, "state": state_for(settings, 1)})
    assert theirs.status_code == 409
    assert smartcar_id_of(store, 2) == SMARTCAR_BOB
    assert smartcar_id_of(store, 1) is None


def test_state_for_a_user_that_no_longer_exists_is_404(web, settings):
    """A genuine state naming a user who is gone answers 404 user_not_found."""
    response = web.get("/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state_for(settings, 99)})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "user_not_found"


def test_state_signed_before_a_management_token_rotation_still_verifies(settings, store):
    """Without CONNECT_STATE_SECRET every management token's key verifies, so rotation keeps links working."""
    old_only = settings.model_copy(update={"smartcar_management_token": SecretStr(OLD_TOKEN)})
    with TestClient(create_app(settings)) as client:
        response = client.get("/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state_for(old_only, 1)})
    assert response.status_code == 200


def test_web_starts_without_a_database_and_the_callback_answers_503(settings, tmp_path):
    """The store is made on first use: webhooks need no database, and a callback without one is a 503."""
    no_database = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'missing' / 'x.db'}"})
    with TestClient(create_app(no_database)) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/connect/callback", params={"user_id": SMARTCAR_ALICE, "state": state_for(settings, 1)})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    assert response.headers["retry-after"] == "5"


def connect_settings(settings: Settings, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "smartcar_application_id": APPLICATION_ID,
        "connect_redirect_uri": REDIRECT,
        "connect_state_secret": SecretStr("state-secret"),
    }
    values.update(overrides)
    return settings.model_copy(update=values)


def test_start_is_absent_unless_enabled(web):
    """`/connect/start` signs states for anyone, so by default it does not exist."""
    assert web.get("/connect/start", params={"user": "1"}).status_code == 404


def test_start_redirects_to_connect_with_a_state_for_the_user(settings, store):
    """Enabled, `/connect/start?user=ID` redirects to Connect with a state that names ID."""
    enabled = connect_settings(settings, connect_start_enabled=True)
    with TestClient(create_app(enabled), follow_redirects=False) as client:
        response = client.get("/connect/start", params={"user": "1"})
        assert client.get("/connect/start", params={"user": "one"}).status_code == 400
    assert response.status_code == 302
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert verify_state(state_keys(enabled), query["state"][0]) == 1


def test_start_enabled_without_connect_settings_refuses_to_start(settings):
    """CONNECT_START_ENABLED without CONNECT_REDIRECT_URI stops the web at startup with one line."""
    enabled = settings.model_copy(update={"connect_start_enabled": True, "smartcar_client_id": "client_x"})
    with pytest.raises(ConfigurationError, match="CONNECT_REDIRECT_URI"):
        create_app(enabled)


def test_connect_link_has_the_documented_parameters(settings):
    """The URL goes to Connect with response_type, client_id, redirect_uri, scope, mode and a verifiable state."""
    configured = connect_settings(settings, connect_mode="simulated")
    link = connect_link(configured, 42, now=1_800_000_000)
    parts = urlsplit(link.url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "connect.smartcar.com", "/oauth/authorize")
    assert "scope=read_vehicle_info%20read_battery" in parts.query
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    assert query["response_type"] == "code"
    assert query["client_id"] == APPLICATION_ID
    assert query["redirect_uri"] == REDIRECT
    assert query["scope"] == configured.connect_scope
    assert query["mode"] == "simulated"
    assert link.expires_at == 1_800_000_000 + 3600
    assert link.note is None
    assert verify_state(state_keys(configured), query["state"], now=1_800_000_000) == 42
    with pytest.raises(ExpiredConnectState):
        verify_state(state_keys(configured), query["state"], now=1_800_003_600)
    with pytest.raises(InvalidConnectState):
        verify_state(state_keys(settings), query["state"], now=1_800_000_000)  # another key


def test_connect_link_falls_back_to_the_client_id_with_a_note(settings):
    """Without SMARTCAR_APPLICATION_ID the client id stands in, and the note says why that may fail."""
    link = connect_link(connect_settings(settings, smartcar_application_id=None, smartcar_client_id="client_abc"), 1)
    assert "client_id=client_abc" in link.url
    assert link.note is not None
    assert "SMARTCAR_APPLICATION_ID" in link.note


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


def test_cli_connect_url_prints_the_url(monkeypatch, tmp_path, capsys):
    """`connect-url --user-id 7` prints one URL on stdout whose state names user 7."""
    cli_environment(
        monkeypatch,
        tmp_path,
        SMARTCAR_APPLICATION_ID=APPLICATION_ID,
        CONNECT_REDIRECT_URI=REDIRECT,
        SMARTCAR_MANAGEMENT_TOKEN="amt",
    )
    assert main(["connect-url", "--user-id", "7", "--mode", "test"]) == 0
    captured = capsys.readouterr()
    [url] = captured.out.splitlines()
    query = {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}
    assert query["mode"] == "test"
    keys = state_keys(Settings(_env_file=None, smartcar_management_token=SecretStr("amt")))  # type: ignore[call-arg]
    assert verify_state(keys, query["state"]) == 7
    assert "valid until" in captured.err


def test_cli_connect_url_names_every_missing_setting_in_one_line(monkeypatch, tmp_path, capsys):
    """Without an application id and a redirect URI `connect-url` exits 2 with one line naming both."""
    cli_environment(monkeypatch, tmp_path, SMARTCAR_MANAGEMENT_TOKEN="amt")
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
