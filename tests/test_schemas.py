"""The published JSON Schemas (schemas/): valid draft 2020-12 documents; what the service really
writes (every captured fixture through web, RQ and a worker; a parked entry of every reason; the
vehicle state and its report) passes them; and they refuse what the service must not write."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from starlette.testclient import TestClient

from cli.samples import SAMPLE_VEHICLE_ID, encode, sample_event
from cli.vehicle_state import state_report
from core.errors import PARK_REASONS
from core.redis.keys import text, vehicle_state_key
from core.schemas import NAMES, SUFFIX, load_schema, schema_folder
from service.app import create_app
from tests.conftest import TOKEN, fixture_paths, load_fixture, signed_headers
from tests.contracts import (
    REGISTRY,
    SCHEMAS,
    check_output_entry,
    check_parked_entry,
    check_vehicle_state,
    check_vehicle_state_report,
    violations,
)
from tests.pipeline import inject, outputs, run_worker_burst, stream_entries

ROOT = Path(__file__).resolve().parent.parent
UNKNOWN_USER = "11111111-2222-4333-8444-555555555555"
READ_EVERY_EVENT = {"vehicle_info_ttl_seconds": 0, "signals_max_age_seconds": 0}


# --- the files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_schema_is_a_valid_2020_12_schema(name):
    """Each file passes the 2020-12 metaschema, declares that dialect and is named by its $id."""
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://smartcar-ingest.invalid/schemas/{name}{SUFFIX}"
    assert schema["title"]
    assert schema["description"]


def test_the_loader_reads_the_source_folder_and_knows_every_file():
    """In a checkout, core.schemas reads schemas/; NAMES lists every file there, no more."""
    assert Path(str(schema_folder())) == ROOT / "schemas"
    assert sorted(p.name for p in (ROOT / "schemas").iterdir()) == sorted(f"{n}{SUFFIX}" for n in NAMES)
    with pytest.raises(KeyError, match="output-payload"):
        load_schema("output_payload")


def _references(node: Any) -> list[str]:
    """Every ``$ref`` under ``node``."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                found.append(value)
            else:
                found += _references(value)
    elif isinstance(node, list):
        for item in node:
            found += _references(item)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_every_reference_resolves_to_a_shipped_schema(name):
    """Each $ref (contentSchema's included) resolves among the shipped files: nothing is fetched."""
    schema = SCHEMAS[name]
    resolver = REGISTRY.resolver(base_uri=schema["$id"])
    references = _references(schema)
    assert bool(references) == (name not in {"vehicle", "parked-entry"})  # the two stand alone
    for reference in references:
        assert resolver.lookup(reference).contents is not None, reference


def test_the_parked_reasons_are_the_contracts_closed_list():
    """The reason enum is core.errors.PARK_REASONS, the only reasons web and worker park with."""
    assert SCHEMAS["parked-entry"]["properties"]["reason"]["enum"] == list(PARK_REASONS)


# --- what the service writes ------------------------------------------------------------------------


def deliver(settings, *items: dict[str, Any] | bytes) -> list[dict[str, Any]]:
    """Post each document or body, signed, to the web app; returns the answers."""
    answers = []
    with TestClient(create_app(settings)) as client:
        for item in items:
            body = item if isinstance(item, bytes) else encode(item)
            response = client.post("/webhooks/smartcar", content=body, headers=signed_headers(body, TOKEN))
            assert response.status_code == 202, response.text
            answers.append(response.json())
    return answers


def entries(redis_client, stream: str) -> list[dict[str, str]]:
    """The stream's entries, read directly (not through tests.pipeline, which checks them too)."""
    return [{text(k): text(v) for k, v in fields.items()} for _, fields in redis_client.xrange(stream)]


def published(redis_client) -> list[dict[str, Any]]:
    """Every output entry, checked; their payloads decoded."""
    found = entries(redis_client, "smartcar:vehicle-events")
    for entry in found:
        check_output_entry(entry)
    return [json.loads(entry["payload"]) for entry in found]


def checked_state(settings, redis_client, vehicle_id: str) -> dict[str, str]:
    """The vehicle's state hash and the vehicle-state report of it, both checked."""
    key = vehicle_state_key(settings.vehicle_state_prefix, vehicle_id)
    state = {text(k): text(v) for k, v in redis_client.hgetall(key).items()}
    check_vehicle_state(state)
    report = state_report(redis_client, settings.vehicle_state_prefix, vehicle_id, 1_800_000_000_000)
    assert report is not None
    check_vehicle_state_report(json.loads(json.dumps(report)))
    return state


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.name)
def test_every_captured_fixture_is_published_and_stored_as_the_schemas_say(pipeline, redis_client, path):
    """Each real capture, delivered to the web, queued and worked: its output entry, its payload
    (schema version 2), its vehicle's state hash and the vehicle-state report all pass."""
    document = load_fixture(path)
    # Captures are historical: let the edge take a meta.deliveredAt that is months old.
    deliver(pipeline.model_copy(update={"max_delivery_age_seconds": 20 * 365 * 24 * 3600}), path.read_bytes())
    run_worker_burst(pipeline)
    [payload] = published(redis_client)
    assert payload["schemaVersion"] == 2
    assert payload["eventId"] == document["eventId"]
    state = checked_state(pipeline, redis_client, document["data"]["vehicle"]["id"])
    assert state["_eventId"] == document["eventId"]
    assert entries(redis_client, "smartcar:parked") == []


def test_every_kind_of_read_is_published_as_the_schema_says(pipeline, redis_client, emulator):
    """Reads fetched, cached (or shared, for events in flight together), refused for good (rejected,
    partial) and skipped by the budget (rate_limited, partial), a VEHICLE_ERROR among them: every
    payload passes, and each kind but the timing-dependent shared one was met."""
    deliver(pipeline, sample_event(), sample_event())  # the second reads what the first read
    run_worker_burst(pipeline, concurrency=1)
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0.2}).raise_for_status()
    deliver(pipeline, *[sample_event(event_type=kind) for kind in ("VEHICLE_ERROR", "VEHICLE_STATE", "VEHICLE_STATE")])
    run_worker_burst(pipeline, concurrency=4)
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0}).raise_for_status()
    every_read = pipeline.model_copy(update=READ_EVERY_EVENT)
    inject(emulator, path="/v3/vehicles/{id}", status=404, count=1, code="VEHICLE_NOT_FOUND")
    deliver(every_read, sample_event())
    run_worker_burst(every_read)
    budget = every_read.model_copy(
        update={"smartcar_requests_per_minute": 6, "smartcar_burst": 2, "enrich_wait_seconds": 0.5}
    )
    deliver(budget, sample_event(), sample_event())
    run_worker_burst(budget, concurrency=1)

    payloads = published(redis_client)
    assert len(payloads) == 8
    met = {(read["source"], read["reason"]) for p in payloads for read in p["enrichment"]["reads"].values()}
    assert {("fetched", None), ("cached", None), ("fetched", "rejected"), ("skipped", "rate_limited")} <= met
    assert {p["enrichment"]["status"] for p in payloads} == {"complete", "partial"}
    assert any(p["errors"] for p in payloads)  # the VEHICLE_ERROR
    checked_state(pipeline, redis_client, SAMPLE_VEHICLE_ID)


def _web_parks() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("invalid_payload", {"eventId": "e-schema", "eventType": "VEHICLE_STATE", "data": {"vehicle": {"id": "v"}}}),
        ("invalid_payload", {"eventType": "VEHICLE_STATE", "data": {}}),  # no eventId: parked with ""
        ("invalid_payload", sample_event(vehicle_id="..")),
        ("unknown_event_type", {"eventId": "e-type", "eventType": "VEHICLE_CONNECTION_STATUS", "data": {}}),
        ("legacy_v2", {"version": "2.0", "webhookId": "w", "eventName": "eventBased", "mode": "live", "payload": {}}),
    ]


@pytest.mark.parametrize(
    ("reason", "document"), _web_parks(), ids=[f"{r}-{n}" for n, (r, _) in enumerate(_web_parks())]
)
def test_what_the_web_parks_is_a_parked_entry(pipeline, redis_client, reason, document):
    """Signed deliveries the edge cannot queue: one parked entry each, of the contract's shape, with
    the body as received (a JSON object's text)."""
    body = encode(document)
    [answer] = deliver(pipeline, body)
    assert answer["status"] == "parked"
    [entry] = entries(redis_client, "smartcar:parked")
    check_parked_entry(entry)
    assert entry["reason"] == reason
    assert entry["event_id"] == (document.get("eventId") or "")
    assert entry["payload"] == body.decode()
    assert isinstance(json.loads(entry["payload"]), dict)


@pytest.mark.parametrize("reason", ["unknown_user", "upstream_rejected", "retries_exhausted"])
def test_what_a_worker_parks_is_a_parked_entry(pipeline, redis_client, emulator, reason):
    """An event no user is linked to, one Smartcar refuses with 401 after a token refresh, and one
    whose reads keep failing on the last attempt: parked by the worker, of the contract's shape."""
    event = sample_event(user_id=UNKNOWN_USER) if reason == "unknown_user" else sample_event()
    if reason == "upstream_rejected":
        inject(emulator, path=f"/v3/vehicles/{SAMPLE_VEHICLE_ID}", status=401, rate=1.0)
    if reason == "retries_exhausted":
        inject(emulator, path="/v3/vehicles/{id}/signals", status=503, rate=1.0)
    deliver(pipeline, event)
    run_worker_burst(pipeline)
    assert entries(redis_client, "smartcar:vehicle-events") == []
    [entry] = entries(redis_client, "smartcar:parked")
    check_parked_entry(entry)
    assert (entry["reason"], entry["event_id"]) == (reason, event["eventId"])
    assert json.loads(entry["payload"]) == event


# --- what they refuse ----------------------------------------------------------------------------------


def golden_payload() -> dict[str, Any]:
    """A schema version 2 payload in the documented form (docs/consumers.md)."""
    signal = {
        "code": "tractionbattery-stateofcharge",
        "name": "StateOfCharge",
        "group": "TractionBattery",
        "body": {"value": 81, "unit": "percent"},
        "status": "SUCCESS",
        "oemUpdatedAt": 1767000000000,
        "retrievedAt": 1767000002500,
    }
    failed = {**signal, "code": "charge-ischarging", "body": None, "status": "ERROR", "error": {"type": "X"}}
    return {
        "schemaVersion": 2,
        "eventId": "evt-1",
        "eventType": "VEHICLE_STATE",
        "receivedAt": "2026-11-28T17:00:00.123Z",
        "publishedAt": "2026-11-28T17:00:00.456Z",
        "user": {"id": 42, "smartcarUserId": "5a7f2b10-0000-4000-8000-000000000001"},
        "vehicle": {"id": "veh-1", "make": "TESLA", "model": "Model Y", "year": 2024, "mode": "LIVE"},
        "signals": [signal],
        "latestSignals": [signal, failed],
        "errors": [],
        "triggers": [{"type": "SIGNAL_UPDATED", "code": "tractionbattery-stateofcharge"}, {"type": "FIRST_DELIVERY"}],
        "enrichment": {
            "status": "complete",
            "errors": [],
            "reads": {
                "vehicle": {"source": "cached", "fetchedAt": 1766990000000, "reason": None},
                "signals": {"source": "fetched", "fetchedAt": 1767000003200, "reason": None},
            },
        },
        "meta": {"deliveryId": "d-1", "deliveredAt": 1767000003000, "webhookId": "w-1", "mode": "LIVE"},
        "staleSignals": [],
    }


def version_1(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` as the workers before schema version 2 wrote it."""
    older = copy.deepcopy(payload)
    older["schemaVersion"] = 1
    del older["staleSignals"], older["enrichment"]["reads"]
    return older


DROP = object()


def changed(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``document`` with the value at ``path`` replaced by ``value`` (removed for DROP)."""
    result = copy.deepcopy(document)
    *parents, last = path
    node: Any = result
    for step in parents:
        node = node[step]
    if value is DROP:
        del node[last]
    else:
        node[last] = value
    return result


PAYLOAD_MUTATIONS = {
    "missing eventId": (("eventId",), DROP),
    "missing schemaVersion": (("schemaVersion",), DROP),
    "version 2 without staleSignals": (("staleSignals",), DROP),
    "version 2 without enrichment.reads": (("enrichment", "reads"), DROP),
    "a signal without status": (("signals", 0, "status"), DROP),
    "unknown schemaVersion": (("schemaVersion",), 3),
    "schemaVersion as text": (("schemaVersion",), "2"),
    "user id as text": (("user", "id"), "42"),
    "signals as an object": (("signals",), {}),
    "oemUpdatedAt as text": (("signals", 0, "oemUpdatedAt"), "2026-01-01T00:00:00Z"),
    "a negative retrievedAt": (("latestSignals", 1, "retrievedAt"), -1),
    "year as text": (("vehicle", "year"), "2024"),
    "receivedAt as epoch ms": (("receivedAt",), 1767000000123),
    "receivedAt not a date": (("receivedAt",), "2026-13-45T25:61:00.000Z"),
    "eventType VERIFY": (("eventType",), "VERIFY"),
    "an unknown top-level field": (("extra",), 1),
    "an unknown vehicle field": (("vehicle", "vin"), "WVW"),
    "an unknown signal field": (("latestSignals", 0, "value"), 81),
    "complete with a refused read": (
        ("enrichment", "errors"),
        [{"call": "vehicle", "status": 404, "type": None, "code": None}],
    ),
    "partial with nothing refused or skipped": (("enrichment", "status"), "partial"),
    "an unknown read source": (("enrichment", "reads", "signals", "source"), "guessed"),
    "a cached read that was rate limited": (("enrichment", "reads", "vehicle", "reason"), "rate_limited"),
    "a read with data but no fetchedAt": (("enrichment", "reads", "vehicle", "fetchedAt"), None),
    "meta.mode as a number": (("meta", "mode"), 1),
    "staleSignals twice the same code": (("staleSignals",), ["a", "a"]),
}


def test_the_golden_documents_pass():
    """The documents the refusals below start from are valid, so each refusal is the mutation's."""
    payload = golden_payload()
    assert violations("output-payload", payload) == []
    assert violations("output-payload", version_1(payload)) == []
    check_output_entry(golden_entry())
    check_parked_entry(golden_parked())
    check_vehicle_state(golden_state())


@pytest.mark.parametrize(("path", "value"), PAYLOAD_MUTATIONS.values(), ids=PAYLOAD_MUTATIONS.keys())
def test_the_payload_schema_refuses(path, value):
    """A payload missing a required field, with a wrong type or value, or an unknown version: refused."""
    assert violations("output-payload", changed(golden_payload(), path, value))


def test_version_1_is_told_apart_by_schemaVersion():
    """schemaVersion chooses: version 1 refuses version 2's fields, version 2 requires them."""
    payload = golden_payload()
    assert violations("output-payload", {**version_1(payload), "staleSignals": []})
    assert violations("output-payload", {**payload, "schemaVersion": 1})
    assert violations("output-payload", {**version_1(payload), "schemaVersion": 2})


def golden_entry() -> dict[str, str]:
    payload = golden_payload()
    return {
        "event_id": payload["eventId"],
        "event_type": payload["eventType"],
        "user_id": "42",
        "vehicle_id": "veh-1",
        "payload": json.dumps(payload, separators=(",", ":")),
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("payload", DROP),
        ("user_id", "forty-two"),
        ("vehicle_id", "veh/1"),
        ("event_type", "VERIFY"),
        ("schemaVersion", "2"),
        ("payload", json.dumps({**golden_payload(), "schemaVersion": 3})),
        ("event_id", "another-event"),
    ],
    ids=[
        "no payload",
        "user_id not digits",
        "vehicle_id with a slash",
        "event_type VERIFY",
        "an unknown field",
        "a payload of an unknown version",
        "an event_id that is not the payload's",
    ],
)
def test_the_output_entry_check_refuses(field, value):
    """An entry missing its payload, with a wrong field, a payload of an unknown version, or fields
    that disagree with the payload: refused."""
    with pytest.raises(AssertionError):
        check_output_entry(changed(golden_entry(), (field,), value))


def golden_parked() -> dict[str, str]:
    return {"event_id": "evt-1", "reason": "unknown_user", "detail": "No internal user.", "payload": "{}"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("reason", "rate_limited"), ("detail", DROP), ("event_id", "e" * 256), ("retries", "3")],
    ids=["an unknown reason", "no detail", "an event_id too long", "an unknown field"],
)
def test_the_parked_entry_schema_refuses(field, value):
    """A parked entry with a reason outside the contract's list, missing a field, or with an extra one: refused."""
    assert violations("parked-entry", changed(golden_parked(), (field,), value))


def golden_state() -> dict[str, str]:
    payload = golden_payload()
    state = {"_vehicle": json.dumps(payload["vehicle"]), "_updatedAt": "1767000004000", "_eventId": "evt-1"}
    return state | {signal["code"]: json.dumps(signal) for signal in payload["latestSignals"]}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("_eventId", DROP),
        ("_vehicle", DROP),
        ("_updatedAt", "soon"),
        ("_version", "1"),
        ("tractionbattery-stateofcharge", json.dumps({"code": "tractionbattery-stateofcharge", "body": 1})),
        ("odometer-traveleddistance", golden_state()["tractionbattery-stateofcharge"]),
        ("_vehicle", json.dumps({"id": "veh-1", "colour": "red"})),
    ],
    ids=[
        "no _eventId",
        "no _vehicle",
        "_updatedAt not ms",
        "an unknown _ field",
        "a signal without status",
        "a field not named after its signal's code",
        "a vehicle with an unknown field",
    ],
)
def test_the_vehicle_state_check_refuses(field, value):
    """A state hash missing its own fields, with one it does not define, or a JSON value that is not
    a signal (or vehicle) of the schema: refused."""
    with pytest.raises(AssertionError):
        check_vehicle_state(changed(golden_state(), (field,), value))


def test_the_report_schema_refuses_a_signal_without_its_ages():
    """The vehicle-state report's signals carry both ages; an expiry is never negative."""
    signal = json.loads(golden_state()["tractionbattery-stateofcharge"])
    report = {
        "vehicleId": "veh-1",
        "key": "smartcar:vehicle-state:veh-1",
        "generatedAt": "2026-11-28T17:00:00.000Z",
        "vehicle": {"id": "veh-1"},
        "updatedAt": None,
        "updatedAgeSeconds": None,
        "eventId": None,
        "expiresInSeconds": 60,
        "signals": {signal["code"]: signal | {"oemAgeSeconds": 1.5, "retrievedAgeSeconds": None}},
    }
    assert violations("vehicle-state-report", report) == []
    assert violations("vehicle-state-report", changed(report, ("signals", signal["code"], "oemAgeSeconds"), DROP))
    assert violations("vehicle-state-report", changed(report, ("expiresInSeconds",), -1))


def test_the_shared_readers_of_the_e2e_tests_check_what_they_read(redis_client):
    """tests.pipeline's stream readers, which every end-to-end test reads through, refuse an entry
    the schemas refuse: the e2e checks cannot pass vacuously."""
    redis_client.xadd("smartcar:vehicle-events", golden_entry())
    assert [entry["event_id"] for entry in outputs(redis_client)] == ["evt-1"]
    redis_client.xadd("smartcar:vehicle-events", changed(golden_entry(), ("user_id",), "x"))
    with pytest.raises(AssertionError, match="user_id"):
        outputs(redis_client)
    redis_client.xadd("smartcar:parked", changed(golden_parked(), ("reason",), "x"))
    with pytest.raises(AssertionError, match="reason"):
        stream_entries(redis_client, "smartcar:parked")
