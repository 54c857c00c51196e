"""The Smartcar emulator, exercised over real HTTP against a uvicorn server in a thread."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from emulator.app import EmulatorConfig
from emulator.catalog import Catalog
from emulator.seed import VIN_CODE, SeedUser, default_seed, seed_fleet
from emulator.server import running_emulator

TESLA = "5f0c1a2b-1111-4111-8111-111111111111"
TESLA_USER = "9e8d7c6b-2222-4222-8222-222222222222"
VW = "a1d50709-3502-4faa-ba43-a5c7565e6a09"
IONIQ = "70076e4a-d774-464c-8241-60de654ccb24"
VW_USER = "2fbd0033-83e7-43b8-a367-776d6dff1134"
JAGUAR = "27192cce-8920-4ba9-b6c6-4f280a86fe39"  # 17 signals + VIN: two default pages
JAGUAR_USER = "XXXXXX"

# (data.user.id, data.vehicle.id) of every delivery in fixtures/captured/, plus smartcar.md's example.
CAPTURED_PAIRS = {
    (VW_USER, VW),
    (VW_USER, IONIQ),
    ("da4ef0df-73b9-4ad7-8c59-1b15ff646f0b", "b3014ded-85db-4f12-8923-7a231354d8d0"),
    (JAGUAR_USER, JAGUAR),
    ("9c9cde56-7d04-468b-a80a-a398bec0ce1e", "db745230-7f7c-4791-bcaa-185facf371be"),
    ("9c9cde56-3333-5555-6666-7e50207e6e64", "875d9333-bbbb-4444-aaaa-17be22ebe970"),
    (TESLA_USER, TESLA),
}
CREDENTIALS = {"grant_type": "client_credentials", "client_id": "client_emulator", "client_secret": "emulator-secret"}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running_emulator() as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url) as client:
        client.post("/_emulator/reset").raise_for_status()
        yield client


def get_token(client: httpx.Client) -> str:
    response = client.post("/oauth2/token", data=CREDENTIALS)
    response.raise_for_status()
    return str(response.json()["access_token"])


def auth(client: httpx.Client, user: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {get_token(client)}"}
    if user is not None:
        headers["sc-user-id"] = user
    return headers


def only_error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"errors"}
    assert len(body["errors"]) == 1
    error: dict[str, object] = body["errors"][0]
    assert error["status"] == str(response.status_code)
    assert error["meta"] == {"debug": {"requestId": response.headers["sc-request-id"]}}
    return error


# Seed


def test_default_seed_holds_every_captured_user_vehicle_pair():
    """Every (user, vehicle) pair from the captured fixtures and smartcar.md is in the default seed."""
    pairs = {(user.id, vehicle.id) for user in default_seed() for vehicle in user.vehicles}
    assert pairs == CAPTURED_PAIRS


def test_seed_vins_are_fake_and_17_characters():
    """Every seeded VIN is a 17-character fake and unique across the default seed and a fleet."""
    vins = [v.vin for user in default_seed() + seed_fleet(50, 2) for v in user.vehicles]
    assert all(len(vin) == 17 and vin.startswith("1FAKEVIN") for vin in vins)
    assert len(set(vins)) == len(vins)


def test_seed_fleet_is_deterministic_and_never_clashes_with_the_default_seed():
    """seed_fleet gives equal data for equal arguments and ids disjoint from the default seed."""
    assert seed_fleet(20, 3) == seed_fleet(20, 3)
    fleet_ids = {u.id for u in seed_fleet(20, 3)} | {v.id for u in seed_fleet(20, 3) for v in u.vehicles}
    default_ids = {u.id for u in default_seed()} | {v.id for u in default_seed() for v in u.vehicles}
    assert len(fleet_ids) == 20 + 60
    assert not fleet_ids & default_ids


def test_catalog_refuses_a_user_listed_twice():
    """A seed that lists one user id twice is rejected when the app builds its catalog."""
    user = default_seed()[0]
    with pytest.raises(ValueError, match="twice"):
        Catalog([user, SeedUser(user.id, ())])


# Token endpoint


def test_token_is_issued_for_the_configured_client_credentials(client):
    """Form-encoded client credentials get an opaque Bearer token valid for 3600 s."""
    response = client.post("/oauth2/token", data=CREDENTIALS)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert len(body["access_token"]) >= 32
    assert response.headers["cache-control"] == "no-store"
    assert get_token(client) != body["access_token"]


def test_token_endpoint_also_accepts_a_json_body(client):
    """The same fields as a JSON body also get a token."""
    assert client.post("/oauth2/token", json=CREDENTIALS).status_code == 200


@pytest.mark.parametrize(
    "form",
    [
        {**CREDENTIALS, "grant_type": "authorization_code"},
        {"client_id": "client_emulator", "client_secret": "emulator-secret"},
        {"grant_type": "client_credentials", "client_id": "client_emulator"},
    ],
)
def test_token_request_with_a_wrong_grant_or_missing_field_is_400_invalid_request(client, form):
    """A wrong grant_type or a missing field answers 400 invalid_request."""
    response = client.post("/oauth2/token", data=form)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "error_description" in response.json()


@pytest.mark.parametrize("field", ["client_id", "client_secret"])
def test_token_request_with_wrong_credentials_is_401_invalid_client(client, field):
    """A wrong client id or secret answers 401 invalid_client."""
    response = client.post("/oauth2/token", data={**CREDENTIALS, field: "wrong"})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_token_requests_are_counted_whether_or_not_they_succeed(client):
    """stats.token_requests counts every token request, tokens_issued only the successful ones."""
    get_token(client)
    client.post("/oauth2/token", data={**CREDENTIALS, "client_secret": "wrong"})
    stats = client.get("/_emulator/stats").json()
    assert (stats["token_requests"], stats["tokens_issued"]) == (2, 1)


# GET /v3/vehicles/{id}


def test_vehicle_is_a_top_level_resource(client):
    """GET /v3/vehicles/{id} answers the resource itself, not wrapped in data, with a request id."""
    response = client.get(f"/v3/vehicles/{TESLA}", headers=auth(client))
    assert response.status_code == 200
    assert response.json() == {
        "id": TESLA,
        "type": "vehicle",
        "attributes": {"make": "TESLA", "model": "Model Y", "year": 2022},
        "links": {"self": f"/vehicles/{TESLA}"},
    }
    assert response.headers["content-type"] == "application/json"
    assert response.headers["sc-request-id"]


@pytest.mark.parametrize(
    ("header", "code"),
    [(None, "MISSING_TOKEN"), ("Bearer not-a-token", "INVALID_TOKEN"), ("Basic Zm9vOmJhcg==", "INVALID_TOKEN")],
)
def test_vehicle_without_a_valid_bearer_is_401_authentication(client, header, code):
    """A missing, unknown or non-Bearer Authorization answers 401 AUTHENTICATION in the v3 shape."""
    headers = {} if header is None else {"Authorization": header}
    response = client.get(f"/v3/vehicles/{TESLA}", headers=headers)
    assert response.status_code == 401
    error = only_error(response)
    assert (error["type"], error["code"]) == ("AUTHENTICATION", code)


def test_vehicle_accepts_its_owner_as_sc_user_id(client):
    """sc-user-id naming the owning user is accepted on the vehicle endpoint."""
    assert client.get(f"/v3/vehicles/{VW}", headers=auth(client, VW_USER)).status_code == 200


@pytest.mark.parametrize(
    ("vehicle", "user"), [(VW, TESLA_USER), (VW, "no-such-user"), ("00000000-0000-0000-0000-000000000000", None)]
)
def test_vehicle_of_another_user_or_unknown_is_404_vehicle_not_found(client, vehicle, user):
    """A vehicle the sc-user-id user has not connected, or no vehicle at all, answers 404."""
    response = client.get(f"/v3/vehicles/{vehicle}", headers=auth(client, user))
    assert response.status_code == 404
    error = only_error(response)
    assert (error["type"], error["code"]) == ("RESOURCE_NOT_FOUND", "VEHICLE_NOT_FOUND")


# GET /v3/vehicles/{id}/signals and /signals/{code}


def test_signals_list_has_the_json_api_shape(client):
    """The signal list carries data[], paging meta and links, and included.vehicle."""
    response = client.get(f"/v3/vehicles/{TESLA}/signals", headers=auth(client, TESLA_USER))
    assert response.status_code == 200
    body = response.json()
    assert body["meta"] == {"page": 1, "pageSize": 10, "totalCount": 4}
    assert body["included"] == {
        "vehicle": {"id": TESLA, "type": "vehicle", "attributes": {"make": "TESLA", "model": "Model Y", "year": 2022}}
    }
    assert body["links"]["previous"] is None
    assert body["links"]["next"] is None
    odometer = body["data"][0]
    assert odometer == {
        "id": "odometer-traveleddistance",
        "type": "signal",
        "attributes": {
            "code": "odometer-traveleddistance",
            "name": "TraveledDistance",
            "group": "Odometer",
            "status": {"value": "SUCCESS"},
            "body": {"unit": "kilometers", "value": 48211.4},
        },
        "meta": {"retrievedAt": 1767000200000, "oemUpdatedAt": 1767000100000},
        "links": {"self": f"/vehicles/{TESLA}/signals/odometer-traveleddistance"},
    }
    assert body["data"][-1]["attributes"]["body"] == {"value": "1FAKEVIN00TEST007"}


def test_failed_signal_has_an_error_status_and_no_body(client):
    """A signal the vehicle cannot report has status ERROR with its error and neither body nor meta."""
    body = client.get(f"/v3/vehicles/{VW}/signals", headers=auth(client, VW_USER)).json()
    online = next(item for item in body["data"] if item["id"] == "connectivitystatus-isonline")
    assert online["attributes"]["status"] == {
        "value": "ERROR",
        "error": {"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"},
    }
    assert "body" not in online["attributes"]
    assert "meta" not in online


def test_signals_page_through_every_signal(client):
    """Following page numbers until links.next is null yields every signal exactly once."""
    headers = auth(client, JAGUAR_USER)
    codes: list[str] = []
    url: str | None = f"/v3/vehicles/{JAGUAR}/signals"
    pages = 0
    while url is not None:
        body = client.get(url, headers=headers).json()
        codes += [item["id"] for item in body["data"]]
        url = body["links"]["next"]
        pages += 1
    assert pages == 2
    assert len(codes) == len(set(codes)) == body["meta"]["totalCount"] == 18
    assert VIN_CODE in codes


def test_signals_page_size_is_chosen_by_the_client(client):
    """pageSize and page choose the slice; the meta echoes them."""
    response = client.get(f"/v3/vehicles/{JAGUAR}/signals?page=2&pageSize=5", headers=auth(client, JAGUAR_USER))
    body = response.json()
    assert body["meta"] == {"page": 2, "pageSize": 5, "totalCount": 18}
    assert len(body["data"]) == 5
    assert urlsplit(body["links"]["last"]).query == "page=4&pageSize=5"


@pytest.mark.parametrize("query", ["page=0", "pageSize=101", "pageSize=abc", "page=%C2%B2"])
def test_signals_with_bad_paging_are_400_validation(client, query):
    """An out-of-range or non-numeric page or pageSize answers 400 VALIDATION."""
    response = client.get(f"/v3/vehicles/{JAGUAR}/signals?{query}", headers=auth(client, JAGUAR_USER))
    assert response.status_code == 400
    assert only_error(response)["type"] == "VALIDATION"


@pytest.mark.parametrize("path", [f"/v3/vehicles/{VW}/signals", f"/v3/vehicles/{VW}/signals/{VIN_CODE}"])
def test_signal_reads_without_sc_user_id_are_400_missing_parameter(client, path):
    """Signal reads without sc-user-id answer 400 VALIDATION / MISSING_PARAMETER, "missing userId"."""
    response = client.get(path, headers=auth(client))
    assert response.status_code == 400
    error = only_error(response)
    assert (error["type"], error["code"], error["detail"]) == ("VALIDATION", "MISSING_PARAMETER", "missing userId")


@pytest.mark.parametrize("path", [f"/v3/vehicles/{VW}/signals", f"/v3/vehicles/{VW}/signals/{VIN_CODE}"])
def test_signal_reads_for_another_users_vehicle_are_404(client, path):
    """Signal reads for a vehicle the sc-user-id user has not connected answer 404 VEHICLE_NOT_FOUND."""
    response = client.get(path, headers=auth(client, TESLA_USER))
    assert response.status_code == 404
    assert only_error(response)["code"] == "VEHICLE_NOT_FOUND"


@pytest.mark.parametrize("path", [f"/v3/vehicles/{VW}/signals", f"/v3/vehicles/{VW}/signals/{VIN_CODE}"])
def test_signal_reads_without_a_bearer_are_401(client, path):
    """Signal reads need a valid bearer token before anything else is checked."""
    response = client.get(path, headers={"sc-user-id": VW_USER})
    assert response.status_code == 401


def test_vin_signal_carries_the_seeded_vin(client):
    """GET .../signals/vehicleidentification-vin answers one signal resource with body {value: VIN}."""
    response = client.get(f"/v3/vehicles/{VW}/signals/{VIN_CODE}", headers=auth(client, VW_USER))
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["type"]) == (VIN_CODE, "signal")
    assert body["attributes"]["body"] == {"value": "1FAKEVIN00TEST001"}
    assert body["attributes"]["group"] == "VehicleIdentification"


def test_unknown_signal_code_is_404(client):
    """A signal code the vehicle does not report answers 404 RESOURCE_NOT_FOUND."""
    response = client.get(f"/v3/vehicles/{VW}/signals/hvac-iscabinhvacactive", headers=auth(client, VW_USER))
    assert response.status_code == 404
    assert only_error(response)["type"] == "RESOURCE_NOT_FOUND"


# GET /v3/connections


def test_connections_filter_by_user_puts_the_vehicle_id_in_relationships(client):
    """filter[userId] lists that user's connections, each vehicle id in relationships.vehicle.data.id."""
    response = client.get("/v3/connections", params={"filter[userId]": VW_USER}, headers=auth(client))
    body = response.json()
    assert [c["relationships"]["vehicle"]["data"]["id"] for c in body["data"]] == [VW, IONIQ]
    assert {c["attributes"]["user"]["id"] for c in body["data"]} == {VW_USER}
    assert body["data"][0]["attributes"]["vehicle"] == {
        "make": "VOLKSWAGEN",
        "model": "ID.4",
        "year": 2021,
        "mode": "live",
        "powertrainType": "BEV",
    }
    assert body["data"][0]["relationships"]["vehicle"]["links"]["related"].endswith(f"/v3/vehicles/{VW}")
    assert body["meta"] == {"pageNumber": 1, "pageSize": 10, "totalCount": 2}
    assert body["links"]["next"] is None
    assert body["links"]["prev"] is None


def test_connections_filter_by_vehicle(client):
    """filter[vehicleId] lists only that vehicle's connection."""
    body = client.get("/v3/connections", params={"filter[vehicleId]": TESLA}, headers=auth(client)).json()
    assert [c["attributes"]["user"]["id"] for c in body["data"]] == [TESLA_USER]


def test_connections_sc_user_id_header_filters_like_filter_user_id(client):
    """Without filter[userId], the sc-user-id header filters the connections."""
    body = client.get("/v3/connections", headers=auth(client, JAGUAR_USER)).json()
    assert [c["relationships"]["vehicle"]["data"]["id"] for c in body["data"]] == [JAGUAR]


def test_connections_of_an_unknown_user_are_an_empty_last_page(client):
    """An unknown user id gives no data, totalCount 0 and a null next link."""
    body = client.get("/v3/connections", params={"filter[userId]": "nobody"}, headers=auth(client)).json()
    assert body["data"] == []
    assert body["meta"]["totalCount"] == 0
    assert body["links"]["next"] is None


def test_connections_page_by_number_until_next_is_null(client):
    """page[number]/page[size] walk every connection once; the last page has next null."""
    headers = auth(client)
    seen: list[str] = []
    page = 1
    while True:
        body = client.get("/v3/connections", params={"page[number]": page, "page[size]": 3}, headers=headers).json()
        seen += [c["id"] for c in body["data"]]
        assert body["meta"]["pageNumber"] == page
        assert body["meta"]["pageSize"] == 3
        if body["links"]["next"] is None:
            break
        assert httpx.URL(body["links"]["next"]).params["page[number]"] == str(page + 1)
        page += 1
    assert page == 3
    assert len(seen) == len(set(seen)) == body["meta"]["totalCount"] == len(CAPTURED_PAIRS)


@pytest.mark.parametrize("params", [{"page[size]": 101}, {"page[number]": 0}, {"filter[vehicle.mode]": "demo"}])
def test_connections_with_bad_parameters_are_400(client, params):
    """page[size] over 100, page[number] under 1 or an unknown mode answer 400 VALIDATION."""
    response = client.get("/v3/connections", params=params, headers=auth(client))
    assert response.status_code == 400
    assert only_error(response)["type"] == "VALIDATION"


def test_connections_require_a_bearer(client):
    """GET /v3/connections without a token answers 401."""
    assert client.get("/v3/connections").status_code == 401


# Token lifecycle


def test_expired_token_is_401_until_a_new_one_is_fetched():
    """A token is refused once its lifetime has passed on the emulator's clock; a fresh one works."""
    clock = FakeClock()
    with (
        running_emulator(EmulatorConfig(clock=clock, token_lifetime_seconds=60)) as url,
        httpx.Client(base_url=url) as client,
    ):
        headers = auth(client)
        assert client.get(f"/v3/vehicles/{TESLA}", headers=headers).status_code == 200
        clock.now += 60
        response = client.get(f"/v3/vehicles/{TESLA}", headers=headers)
        assert response.status_code == 401
        assert only_error(response)["code"] == "TOKEN_EXPIRED"
        assert client.get(f"/v3/vehicles/{TESLA}", headers=auth(client)).status_code == 200


def test_revoke_refuses_every_issued_token(client):
    """After /_emulator/revoke, earlier tokens answer 401 TOKEN_REVOKED and new tokens work."""
    old = auth(client)
    assert client.post("/_emulator/revoke").json() == {"revoked": 1}
    response = client.get(f"/v3/vehicles/{TESLA}", headers=old)
    assert response.status_code == 401
    assert only_error(response)["code"] == "TOKEN_REVOKED"
    assert client.get(f"/v3/vehicles/{TESLA}", headers=auth(client)).status_code == 200


def test_expire_endpoint_expires_every_issued_token(client):
    """After /_emulator/expire, earlier tokens answer 401 TOKEN_EXPIRED."""
    old = auth(client)
    assert client.post("/_emulator/expire").json() == {"expired": 1}
    assert only_error(client.get(f"/v3/vehicles/{TESLA}", headers=old))["code"] == "TOKEN_EXPIRED"


# Failure injection


def test_injected_429_answers_count_calls_with_retry_after_then_recovers(client):
    """A 429 rule with count 2 and retry_after fails the next two matching calls, then stops."""
    headers = auth(client, VW_USER)
    rule = {"path": "/v3/vehicles/{id}/signals", "status": 429, "count": 2, "retry_after": 1}
    created = client.post("/_emulator/failures", json=rule)
    assert created.status_code == 201
    assert created.json()["remaining"] == 2
    for _ in range(2):
        response = client.get(f"/v3/vehicles/{VW}/signals", headers=headers)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        error = only_error(response)
        assert (error["type"], error["code"], error["resolution"]) == ("RATE_LIMIT", "VEHICLE", {"type": "RETRY_LATER"})
    assert client.get(f"/v3/vehicles/{VW}/signals", headers=headers).status_code == 200
    assert client.get("/_emulator/failures").json() == {"failures": []}


def test_template_rule_leaves_other_routes_alone(client):
    """A rule on the signals template does not fail the vehicle or single-signal routes."""
    headers = auth(client, VW_USER)
    client.post("/_emulator/failures", json={"path": "/v3/vehicles/{id}/signals", "status": 500, "count": 5})
    assert client.get(f"/v3/vehicles/{VW}", headers=headers).status_code == 200
    assert client.get(f"/v3/vehicles/{VW}/signals/{VIN_CODE}", headers=headers).status_code == 200
    assert client.get(f"/v3/vehicles/{VW}/signals", headers=headers).status_code == 500


def test_prefix_rule_fails_every_path_under_it(client):
    """A concrete path prefix fails every route below it, and only for that vehicle."""
    headers = auth(client, VW_USER)
    client.post("/_emulator/failures", json={"path": f"/v3/vehicles/{VW}", "status": 503, "count": 2})
    assert client.get(f"/v3/vehicles/{IONIQ}", headers=headers).status_code == 200
    assert client.get(f"/v3/vehicles/{VW}", headers=headers).status_code == 503
    assert client.get(f"/v3/vehicles/{VW}/signals/{VIN_CODE}", headers=headers).status_code == 503


@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [
        (401, "AUTHENTICATION", "INVALID_TOKEN"),
        (404, "RESOURCE_NOT_FOUND", "VEHICLE_NOT_FOUND"),
        (409, "VEHICLE_STATE", "ASLEEP"),
        (500, "SERVER", "INTERNAL"),
        (502, "UPSTREAM", "UNKNOWN_ISSUE"),
        (503, "SERVER", "SERVICE_UNAVAILABLE"),
    ],
)
def test_injected_status_answers_a_realistic_v3_error(client, status, error_type, code):
    """Each injected status answers the v3 error type and code Smartcar uses for it."""
    client.post("/_emulator/failures", json={"path": "/v3/vehicles/{id}", "status": status})
    response = client.get(f"/v3/vehicles/{TESLA}", headers=auth(client))
    assert response.status_code == status
    error = only_error(response)
    assert (error["type"], error["code"]) == (error_type, code)
    assert client.get(f"/v3/vehicles/{TESLA}", headers=auth(client)).status_code == 200


def test_injected_rule_may_name_its_own_type_code_and_detail(client):
    """type, code (null included) and detail in the rule replace the defaults."""
    rule = {"path": "*", "status": 429, "type": "RATE_LIMIT", "code": None, "detail": "slow down"}
    client.post("/_emulator/failures", json=rule)
    error = only_error(client.get(f"/v3/vehicles/{TESLA}"))
    assert (error["type"], error["code"], error["detail"]) == ("RATE_LIMIT", None, "slow down")


def test_wildcard_rule_fails_the_token_endpoint_with_an_oauth_body(client):
    """A "*" rule also fails the token endpoint, which answers in the RFC 6749 shape."""
    client.post("/_emulator/failures", json={"path": "*", "status": 503, "retry_after": 0.5})
    response = client.post("/oauth2/token", data=CREDENTIALS)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "0.5"
    assert response.json()["error"] == "temporarily_unavailable"
    assert client.get("/_emulator/stats").json()["token_requests"] == 1


def test_rate_rule_fails_a_seeded_repeatable_fraction(client):
    """A rate-only rule fails about that fraction of calls, in the same pattern after a reset."""
    rule = {"path": "/v3/vehicles/{id}", "status": 500, "rate": 0.3}

    def pattern() -> list[int]:
        client.post("/_emulator/failures", json=rule)
        headers = auth(client)
        return [client.get(f"/v3/vehicles/{TESLA}", headers=headers).status_code for _ in range(100)]

    first = pattern()
    client.post("/_emulator/reset")
    assert pattern() == first
    assert 15 <= first.count(500) <= 45
    assert set(first) == {200, 500}


def test_delete_failures_clears_every_rule(client):
    """DELETE /_emulator/failures drops every rule and calls succeed again."""
    client.post("/_emulator/failures", json={"path": "*", "status": 500, "rate": 1})
    client.post("/_emulator/failures", json={"path": "/v3/connections", "status": 502})
    assert client.delete("/_emulator/failures").json() == {"cleared": 2}
    assert client.post("/oauth2/token", data=CREDENTIALS).status_code == 200


@pytest.mark.parametrize(
    "rule", [{"path": "*"}, {"status": 200}, {"status": 500, "rate": 2}, {"status": 500, "colour": "red"}]
)
def test_invalid_failure_rule_is_400(client, rule):
    """A rule without a 4xx/5xx status, with a rate over 1 or with an unknown key is refused."""
    response = client.post("/_emulator/failures", json=rule)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


# Rate limits and the call log


def test_a_vehicle_rate_limit_answers_429_with_the_seconds_left_until_it_passes():
    """A per-vehicle limit answers 429 RATE_LIMIT:VEHICLE with Retry-After (time left) for that vehicle
    only, on every route under it, until its seconds have passed on the emulator's clock."""
    clock = FakeClock()
    with running_emulator(EmulatorConfig(clock=clock)) as url, httpx.Client(base_url=url) as client:
        headers = auth(client, VW_USER)
        created = client.post("/_emulator/rate-limits", json={"vehicleId": VW, "seconds": 5})
        assert created.status_code == 201
        assert created.json() == {"vehicleId": VW, "secondsLeft": 5.0, "retryAfter": True}
        clock.now += 1.5
        for path in (f"/v3/vehicles/{VW}", f"/v3/vehicles/{VW}/signals", f"/v3/vehicles/{VW}/signals/{VIN_CODE}"):
            response = client.get(path, headers=headers)
            assert response.status_code == 429, path
            assert response.headers["retry-after"] == "3.5"
            error = only_error(response)
            assert (error["type"], error["code"], error["resolution"]) == (
                "RATE_LIMIT",
                "VEHICLE",
                {"type": "RETRY_LATER"},
            )
        assert client.get(f"/v3/vehicles/{IONIQ}/signals", headers=headers).status_code == 200
        assert client.post("/oauth2/token", data=CREDENTIALS).status_code == 200
        assert client.get("/_emulator/rate-limits").json() == {
            "limits": [{"vehicleId": VW, "secondsLeft": 3.5, "retryAfter": True}]
        }
        clock.now += 3.5
        assert client.get(f"/v3/vehicles/{VW}", headers=headers).status_code == 200
        assert client.get("/_emulator/rate-limits").json() == {"limits": []}


@pytest.mark.parametrize(("retry_after", "header"), [(None, None), (True, "2")])
def test_an_application_rate_limit_answers_429_smartcar_api_on_every_api_call(retry_after, header):
    """The application limit answers 429 RATE_LIMIT:SMARTCAR_API on every API call but the token
    endpoint; Retry-After only when asked for (Smartcar promises none for this limit)."""
    clock = FakeClock()
    with running_emulator(EmulatorConfig(clock=clock)) as url, httpx.Client(base_url=url) as client:
        headers = auth(client, TESLA_USER)
        body = {"seconds": 2} | ({} if retry_after is None else {"retryAfter": retry_after})
        assert client.post("/_emulator/rate-limits", json=body).status_code == 201
        for path in (f"/v3/vehicles/{TESLA}", f"/v3/vehicles/{VW}/signals", "/v3/connections"):
            response = client.get(path, headers=headers)
            assert response.status_code == 429, path
            assert response.headers.get("retry-after") == header
            assert only_error(response)["code"] == "SMARTCAR_API"
        assert client.post("/oauth2/token", data=CREDENTIALS).status_code == 200
        clock.now += 2
        assert client.get(f"/v3/vehicles/{TESLA}", headers=headers).status_code == 200


def test_rate_limits_are_lifted_by_delete_and_by_reset(client):
    """DELETE /_emulator/rate-limits lifts every limit; so does a reset."""
    headers = auth(client, VW_USER)
    client.post("/_emulator/rate-limits", json={"vehicleId": VW, "seconds": 60})
    client.post("/_emulator/rate-limits", json={"seconds": 60})
    assert [limit["vehicleId"] for limit in client.get("/_emulator/rate-limits").json()["limits"]] == [None, VW]
    assert client.delete("/_emulator/rate-limits").json() == {"lifted": 2}
    assert client.get(f"/v3/vehicles/{VW}", headers=headers).status_code == 200
    client.post("/_emulator/rate-limits", json={"vehicleId": VW, "seconds": 60})
    client.post("/_emulator/reset")
    assert client.get(f"/v3/vehicles/{VW}", headers=auth(client, VW_USER)).status_code == 200


@pytest.mark.parametrize("body", [{}, {"seconds": 0}, {"seconds": 1, "vehicleId": ""}, {"seconds": 1, "scope": "x"}])
def test_invalid_rate_limit_is_400(client, body):
    """A limit without positive seconds, with an empty vehicle id or an unknown key is refused."""
    response = client.post("/_emulator/rate-limits", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


def test_call_log_names_each_api_call_its_vehicle_and_status(client):
    """GET /_emulator/calls lists API calls oldest first with route, vehicle and status; not the
    token endpoint, not control calls; a reset empties it."""
    headers = auth(client, VW_USER)
    client.post("/_emulator/rate-limits", json={"vehicleId": IONIQ, "seconds": 60})
    before = time.time() * 1000
    client.get(f"/v3/vehicles/{VW}", headers=headers)
    client.get(f"/v3/vehicles/{IONIQ}/signals", headers=headers)
    client.get("/v3/connections", headers=headers)
    calls = client.get("/_emulator/calls").json()["calls"]
    assert [(c["route"], c["vehicleId"], c["status"]) for c in calls] == [
        ("/v3/vehicles/{id}", VW, 200),
        ("/v3/vehicles/{id}/signals", IONIQ, 429),
        ("/v3/connections", None, 200),
    ]
    assert before - 1 <= calls[0]["at"] <= calls[1]["at"] <= calls[2]["at"] <= time.time() * 1000 + 1
    client.post("/_emulator/reset")
    assert client.get("/_emulator/calls").json() == {"calls": []}


# Latency, stats, reset


def test_latency_delays_api_calls_but_not_control_calls(client):
    """POST /_emulator/latency delays every API call by that many seconds; control calls stay fast."""
    headers = auth(client)
    assert client.post("/_emulator/latency", json={"seconds": 0.2}).json() == {"seconds": 0.2}
    started = time.monotonic()
    client.get(f"/v3/vehicles/{TESLA}", headers=headers)
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    client.get("/_emulator/stats")
    assert time.monotonic() - started < 0.2


def test_latency_is_concurrent_not_serialised():
    """Delayed calls overlap: 50 concurrent calls at 0.2 s latency take far less than 50 x 0.2 s."""

    async def burst(url: str) -> tuple[list[int], float]:
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=50)) as client:
            token = (await client.post("/oauth2/token", data=CREDENTIALS)).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}", "sc-user-id": TESLA_USER}
            started = time.monotonic()
            responses = await asyncio.gather(
                *(client.get(f"/v3/vehicles/{TESLA}/signals", headers=headers) for _ in range(50))
            )
            return [r.status_code for r in responses], time.monotonic() - started

    with running_emulator(EmulatorConfig(latency_seconds=0.2)) as url:
        statuses, elapsed = asyncio.run(burst(url))
    assert statuses == [200] * 50
    # Serialised sleeps would take 10 s; the margin absorbs a slow CI machine.
    assert elapsed < 3


def test_stats_count_calls_per_route_template_and_status(client):
    """Stats count calls by route template and answers by status, overall and per route."""
    headers = auth(client, VW_USER)
    client.get(f"/v3/vehicles/{VW}", headers=headers)
    client.get(f"/v3/vehicles/{IONIQ}/signals", headers=headers)
    client.get(f"/v3/vehicles/{VW}/signals", headers={"Authorization": headers["Authorization"]})
    stats = client.get("/_emulator/stats").json()
    assert stats["calls"] == {"/oauth2/token": 1, "/v3/vehicles/{id}": 1, "/v3/vehicles/{id}/signals": 2}
    assert stats["statuses"] == {"200": 3, "400": 1}
    assert stats["statuses_by_route"]["/v3/vehicles/{id}/signals"] == {"200": 1, "400": 1}
    assert (stats["live_tokens"], stats["active_failures"], stats["latency_seconds"]) == (1, 0, 0.0)


def test_unknown_path_is_a_v3_404_counted_as_unmatched(client):
    """A path no route serves answers 404 INVALID_PATH in the v3 shape and is counted as <unmatched>."""
    response = client.get("/v3/vehicles/x/charge")
    assert response.status_code == 404
    assert only_error(response)["code"] == "INVALID_PATH"
    assert client.get("/_emulator/stats").json()["calls"] == {"<unmatched>": 1}


def test_reset_forgets_tokens_rules_counts_and_latency(client):
    """POST /_emulator/reset clears tokens, failure rules and stats, and restores the configured latency."""
    headers = auth(client)
    client.post("/_emulator/failures", json={"path": "/v3/connections", "status": 500})
    client.post("/_emulator/latency", json={"seconds": 0.5})
    assert client.post("/_emulator/reset").json() == {"reset": True}
    stats = client.get("/_emulator/stats").json()
    assert (stats["token_requests"], stats["calls"], stats["active_failures"], stats["latency_seconds"]) == (
        0,
        {},
        0,
        0.0,
    )
    assert only_error(client.get("/v3/connections", headers=headers))["code"] == "INVALID_TOKEN"
    assert client.get("/v3/connections", headers=auth(client)).status_code == 200


# Server helper and custom seeds


def test_fleet_seed_is_served_next_to_the_default_seed():
    """A config seeded with default_seed() + seed_fleet(n) serves the fleet's users and vehicles."""
    fleet = seed_fleet(30)
    with running_emulator(EmulatorConfig(seed=default_seed() + fleet)) as url, httpx.Client(base_url=url) as client:
        user = fleet[-1]
        vehicle = user.vehicles[0]
        response = client.get(f"/v3/vehicles/{vehicle.id}/signals/{VIN_CODE}", headers=auth(client, user.id))
        assert response.json()["attributes"]["body"] == {"value": vehicle.vin}
        total = client.get("/v3/connections", headers=auth(client)).json()["meta"]["totalCount"]
        assert total == len(CAPTURED_PAIRS) + 30


def test_running_emulator_stops_listening_on_exit():
    """Leaving running_emulator stops the server: its port refuses connections afterwards."""
    with running_emulator() as url:
        assert httpx.get(f"{url}/_emulator/healthz").json() == {"status": "ok"}
    address = urlsplit(url)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((address.hostname, address.port), timeout=1):
        pass
