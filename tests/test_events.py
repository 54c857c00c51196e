"""Payload parsing: every captured shape, both documented VEHICLE_STATE shapes, and one reading of a
body at the web edge and in the worker."""

from __future__ import annotations

import contextlib
import copy
import json
import re

import pytest

from cli.samples import encode, sample_event
from core.errors import InvalidPayload, MalformedBody
from core.events.model import DeliveryMeta, QuickEvent, Trigger
from core.events.normalise import delivered_at, epoch_ms, model_year, retrieved_at
from core.events.parse import load_json, parse_document, parse_stored, quick_vehicle_event
from core.events.wire import VEHICLE_EVENT_TYPES, VEHICLE_ID_PATTERN
from core.store.users import UserRecord
from tests.conftest import fixture_paths, load_fixture
from tests.examples import examples
from workers.output import Enrichment, api_signal, build_document, stream_fields

SHAPE_A = {
    "eventId": "0d6c0b7e-5555-4555-8555-555555555001",
    "eventType": "VEHICLE_STATE",
    "vehicleId": "5f0c1a2b-1111-4111-8111-111111111111",
    "data": {
        "user": {"id": "9e8d7c6b-2222-4222-8222-222222222222"},
        "vehicle": {
            "id": "5f0c1a2b-1111-4111-8111-111111111111",
            "make": "FORD",
            "model": "Mustang Mach-E",
            "year": 2023,
        },
        "triggers": [{"code": "tractionbattery-stateofcharge", "name": "StateOfCharge", "group": "TractionBattery"}],
        "signals": [
            {
                "code": "tractionbattery-stateofcharge",
                "name": "StateOfCharge",
                "group": "TractionBattery",
                "body": {"unit": "percent", "value": 64},
                "meta": {"oemUpdatedAt": 1767000000000, "fetchedAt": 1767000002500},
            }
        ],
    },
    "meta": {"version": "4.0", "deliveryId": "a1", "deliveredAt": 1767000003000, "mode": "LIVE", "signalCount": 1},
}


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.name)
def test_every_captured_delivery_parses(path):
    """Each real capture is a vehicle event with a user, a vehicle and normalised signals."""
    document = load_fixture(path)
    event = parse_document(document)
    assert event.event_type in VEHICLE_EVENT_TYPES
    assert event.event_id == document["eventId"]
    assert event.smartcar_user_id == document["data"]["user"]["id"]
    assert event.vehicle.id == document["data"]["vehicle"]["id"]
    assert len(event.signals) == len(document["data"].get("signals", []))
    for signal in event.signals:
        assert signal["code"]
        assert signal["code"] == signal["code"].lower()
        assert signal["status"] in {"SUCCESS", "ERROR", "UNAVAILABLE"}
    if event.event_type == "VEHICLE_ERROR":
        assert len(event.errors) == len(document["data"]["errors"])


def test_shape_a_triggers_in_data_and_fetched_at():
    """Shape A: data.triggers with codes, top-level vehicleId, fetchedAt as the retrieval time."""
    event = parse_document(SHAPE_A)
    assert event.triggers == (Trigger(type="SIGNAL_UPDATED", code="tractionbattery-stateofcharge"),)
    assert event.signals[0]["retrievedAt"] == 1767000002500
    assert event.signals[0]["status"] == "SUCCESS"


def test_shape_b_top_level_triggers_with_signal_objects():
    """Shape B: top-level triggers of {type, signal{…}} and retrievedAt."""
    event = parse_document(sample_event())
    assert event.triggers[0].type == "SIGNAL_UPDATED"
    assert event.triggers[0].code == "tractionbattery-stateofcharge"
    assert event.signals[0]["retrievedAt"] is not None


def test_string_triggers_and_first_delivery():
    """Triggers given as 'Group.Name' strings or FIRST_DELIVERY are normalised."""
    document = sample_event()
    document["triggers"] = [
        {"type": "SIGNAL_UPDATED", "signal": "Odometer.TraveledDistance"},
        "TractionBattery.StateOfCharge",
        {"type": "FIRST_DELIVERY"},
        "FIRST_DELIVERY",
    ]
    shape_a_first = copy.deepcopy(SHAPE_A)
    shape_a_first["data"]["triggers"] = [{"code": "FIRST_DELIVERY"}]
    assert [(t.type, t.code) for t in parse_document(document).triggers] == [
        ("SIGNAL_UPDATED", "odometer-traveleddistance"),
        ("SIGNAL_UPDATED", "tractionbattery-stateofcharge"),
        ("FIRST_DELIVERY", None),
        ("FIRST_DELIVERY", None),
    ]
    assert parse_document(shape_a_first).triggers == (Trigger(type="FIRST_DELIVERY"),)


def test_missing_meta_triggers_and_status_are_accepted():
    """A delivery without meta, triggers or per-signal status still parses."""
    document = sample_event()
    del document["meta"], document["triggers"]
    for signal in document["data"]["signals"]:
        del signal["status"]
    event = parse_document(document)
    assert event.triggers == ()
    assert event.meta == DeliveryMeta()
    assert all(s["status"] == "SUCCESS" for s in event.signals)


def test_error_signals_keep_their_error_and_have_no_body():
    """A signal with status ERROR keeps the error and no body."""
    document = sample_event()
    document["data"]["signals"].append(
        {
            "code": "location-isathome",
            "name": "IsAtHome",
            "group": "Location",
            "status": {"value": "ERROR", "error": {"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"}},
        }
    )
    signal = parse_document(document).signals[-1]
    assert signal["status"] == "ERROR"
    assert signal["body"] is None
    assert signal["error"] == {"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"}


def test_unknown_fields_are_ignored():
    """Extra fields anywhere do not fail validation."""
    document = sample_event()
    document["future"] = {"x": 1}
    document["data"]["vehicle"]["powertrainType"] = "BEV"
    document["data"]["user"]["externalId"] = None
    document["data"]["signals"][0]["meta"]["ingestedAt"] = 1
    assert parse_document(document).vehicle.powertrainType == "BEV"


def test_vehicle_id_from_top_level_when_data_has_none():
    """vehicleId at the top level is used when data.vehicle is absent."""
    document = copy.deepcopy(SHAPE_A)
    del document["data"]["vehicle"]
    assert parse_document(document).vehicle.id == SHAPE_A["vehicleId"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1767000000000, 1767000000000),
        (1767000000, 1767000000000),
        ("2026-01-05T10:00:00.000Z", 1767607200000),
        ("1767000000000", 1767000000000),
        ("not a time", None),
        (None, None),
    ],
)
def test_epoch_ms_reads_ms_seconds_and_iso(value, expected):
    """Times in ms, s or ISO-8601 all become epoch milliseconds."""
    assert epoch_ms(value) == expected


def test_iso_delivered_at_is_kept():
    """meta.deliveredAt given as an ISO string is converted to epoch ms."""
    document = sample_event()
    document["meta"]["deliveredAt"] = "2026-01-05T10:00:00.000Z"
    assert parse_document(document).meta.deliveredAt == 1767607200000


def test_not_json_raises_malformed_body():
    """Bytes that are not UTF-8 JSON are MalformedBody."""
    for body in (b"", b"{", b"\xff\xfe", b"not json"):
        with pytest.raises(MalformedBody):
            load_json(body)


def test_legacy_v2_is_recognised():
    """A top-level version (v2.0 webhook) is an InvalidPayload coded legacy_v2."""
    with pytest.raises(InvalidPayload) as caught:
        parse_document({"version": "2.0", "webhookId": "w", "eventName": "verify", "payload": {"challenge": "x"}})
    assert caught.value.code == "legacy_v2"


def test_unknown_event_type():
    """An eventType other than the three known ones is an InvalidPayload coded unknown_event_type."""
    with pytest.raises(InvalidPayload) as caught:
        parse_document({"eventId": "e", "eventType": "VEHICLE_CONNECTION_STATUS", "data": {}})
    assert caught.value.code == "unknown_event_type"


#: Changes that break the schema: missing ids, users, vehicles, malformed lists.
SCHEMA_BREAKERS = [
    lambda d: d.pop("eventId"),
    lambda d: d["data"].pop("user"),
    lambda d: d["data"]["user"].update(id=""),
    lambda d: d["data"].pop("vehicle"),
    lambda d: d["data"].update(signals="nope"),
    lambda d: d.update(data=[]),
]


@pytest.mark.parametrize("mutate", SCHEMA_BREAKERS)
def test_schema_failures_raise_invalid_payload(mutate):
    """Missing ids, users, vehicles or malformed lists are InvalidPayload."""
    document = sample_event()
    mutate(document)
    with pytest.raises(InvalidPayload):
        parse_document(document)


def test_invalid_payload_message_names_fields_not_values():
    """The parked reason names the failing field but never echoes its value."""
    document = sample_event()
    document["data"]["user"] = {"id": {"secret": "1FAKEVIN00TEST001"}}
    with pytest.raises(InvalidPayload) as info:
        parse_document(document)
    assert "data.user.id" in info.value.message
    assert "1FAKEVIN00TEST001" not in info.value.message


def test_non_object_json_is_invalid_payload():
    """JSON that is not an object fails classification as InvalidPayload."""
    for document in ([], 1, "x", None):
        with pytest.raises(InvalidPayload):
            parse_document(document)


def test_verify_challenge():
    """A VERIFY's challenge is read from data.challenge."""
    assert parse_document(sample_event("VERIFY", challenge="abc")) == "abc"
    with pytest.raises(InvalidPayload):
        parse_document({"eventType": "VERIFY", "data": {}})


def _slow_path_accepts(body: bytes) -> bool:
    try:
        return not isinstance(parse_document(load_json(body)), str)
    except (MalformedBody, InvalidPayload):
        return False


@pytest.mark.hypothesis  # Hypothesis runs inside: make drills runs it at the full count
def test_quick_path_agrees_with_the_step_by_step_path():
    """quick_vehicle_event accepts exactly what parse_document accepts as an event (fixtures and near misses)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tests.test_fuzz import delivery_like

    for path in fixture_paths():
        body = path.read_bytes()
        assert (quick_vehicle_event(body) is not None) is _slow_path_accepts(body) is True

    @settings(max_examples=examples(500), deadline=None)
    @given(document=delivery_like | st.builds(sample_event))
    def check(document):
        body = json.dumps(document).encode()
        assert (quick_vehicle_event(body) is not None) == _slow_path_accepts(body)

    check()


# --- one reading of one body: ids, non-finite numbers, times that never raise ------------------------

HOSTILE_VALUES = [
    float("nan"),
    float("inf"),
    float("-inf"),
    10**5000,
    -(10**400),
    1e308,
    True,
    False,
    "1" * 4301,
    "9" * 5000,
    "²⁰²⁶",
    "-1767000000000",
    "9999-12-31T23:59:59-01:00",
    "0001-01-01T00:00:00+01:00",
    "2026-01-05T10:00:00",
    "x" * 10_000,
    [],
    {"ms": 1},
    None,
]


@pytest.mark.hypothesis  # Hypothesis runs inside: make drills runs it at the full count
def test_time_and_year_readers_never_raise():
    """epoch_ms, the delivery time and the model year give None (or a short text) for any hostile value."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    def check(value):
        assert epoch_ms(value) is None or 0 <= epoch_ms(value) <= 253_402_300_799_999
        year = model_year(value)
        assert year is None or 1 <= year <= 9999
        delivered = delivered_at(value)
        assert delivered is None or isinstance(delivered, int) or len(delivered) <= 64

    for value in HOSTILE_VALUES:
        check(value)
        assert epoch_ms(value) is None
    assert model_year("9" * 5000) is None
    assert model_year(2023.0) == 2023

    @settings(max_examples=examples(500), deadline=None)
    @given(value=st.one_of(st.integers(), st.floats(), st.text(), st.booleans(), st.none(), st.binary().map(str)))
    def fuzz(value):
        check(value)

    fuzz()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(eventId=7),
        lambda d: d.update(eventId=7.0),
        lambda d: d["data"]["user"].update(id=42),
        lambda d: d["data"]["vehicle"].update(id=42),
        lambda d: d["meta"].update(deliveryId=1),
        lambda d: d.update(eventType=1),
    ],
)
def test_a_number_where_an_id_belongs_is_a_schema_failure(mutate):
    """Ids are JSON strings only: a number is never coerced into a (different) string."""
    document = sample_event()
    mutate(document)
    body = json.dumps(document).encode()
    assert not _slow_path_accepts(body)
    assert quick_vehicle_event(body) is None


def test_numbers_in_descriptive_text_are_still_read():
    """A numeric make or model is read as text: only ids are strict."""
    document = sample_event()
    document["data"]["vehicle"]["model"] = 3
    assert parse_document(document).vehicle.model == "3"
    assert parse_stored(json.dumps(document)).vehicle.model == "3"


@pytest.mark.parametrize("vehicle_id", ["..", ".", "../../connections", "a/b", "%2e%2e", "", "x" * 65, "é", "a b"])
def test_a_vehicle_id_that_could_move_a_url_path_is_a_schema_failure(vehicle_id):
    """Vehicle ids must look like Smartcar's (letters, digits, '-', '_'), in data.vehicle.id and vehicleId."""
    document = sample_event()
    document["data"]["vehicle"]["id"] = vehicle_id
    with pytest.raises(InvalidPayload):
        parse_document(document)
    document["data"]["vehicle"]["id"] = SHAPE_A["vehicleId"]
    document["vehicleId"] = vehicle_id
    with pytest.raises(InvalidPayload):
        parse_document(document)


def test_every_captured_vehicle_id_is_a_valid_vehicle_id():
    """The captures' vehicle ids (UUIDs) all fit the vehicle-id rule."""
    for path in fixture_paths():
        document = load_fixture(path)
        assert re.fullmatch(VEHICLE_ID_PATTERN, document["data"]["vehicle"]["id"])


@pytest.mark.parametrize("body", [b"NaN", b"[Infinity]", b'{"a": -Infinity}', b'{"a": [1, NaN]}'])
def test_nan_and_infinity_are_not_json(body):
    """load_json refuses NaN and Infinity literals (pydantic-core would accept them by default)."""
    with pytest.raises(MalformedBody):
        load_json(body)


def test_nan_in_text_is_fine_and_both_paths_agree():
    """'NaN' inside a string parses on both paths; as a literal, both refuse it."""
    document = sample_event()
    document["data"]["vehicle"]["model"] = "NaN Infinity"
    body = json.dumps(document).encode()
    assert quick_vehicle_event(body) is None  # the one-pass path leaves it to the step-by-step one
    assert _slow_path_accepts(body)
    literal = body.replace(b'"NaN Infinity"', b"NaN")
    assert quick_vehicle_event(literal) is None
    assert not _slow_path_accepts(literal)


def test_an_overflowing_number_in_a_signal_body_becomes_null():
    """1e400 parses as infinity; the normalised signal carries null instead, so the output stays valid JSON."""
    body = json.dumps(sample_event()).replace('"value": 81', '"value": 1e400').encode()
    for event in (parse_document(load_json(body)), parse_stored(body)):
        assert event.signals[0]["body"] == {"value": None, "unit": "percent"}
        json.dumps(event.model_dump(mode="json"), allow_nan=False)


@pytest.mark.parametrize(
    ("body", "error", "expected_body", "expected_error"),
    [
        ("1e400", "null", None, None),
        ('{"a": {"b": [1.5, [-1e400, 2]]}}', "null", {"a": {"b": [1.5, [None, 2]]}}, None),
        (
            '[{"x": 1e400}, "1e400", 3]',
            '{"d": {"e": [1e400]}, "f": 1.5}',
            [{"x": None}, "1e400", 3],
            {"d": {"e": [None]}, "f": 1.5},
        ),
        ('{"a": [1.5, {"b": 2.5}], "c": true}', '{"n": 0.5}', {"a": [1.5, {"b": 2.5}], "c": True}, {"n": 0.5}),
    ],
)
def test_every_overflowing_number_in_a_body_or_error_becomes_null_and_the_rest_is_kept(
    body, error, expected_body, expected_error
):
    """However deep it sits, in a body or a signal's error, on both paths; finite values as sent."""
    document = sample_event()
    document["data"]["signals"][0]["body"] = "BODY"
    document["data"]["signals"][0]["status"] = {"value": "ERROR", "error": "ERROR"}
    text = json.dumps(document).replace('"BODY"', body).replace('"error": "ERROR"', f'"error": {error}')
    for event in (parse_document(load_json(text.encode())), parse_stored(text.encode())):
        assert event.signals[0]["body"] == expected_body
        assert event.signals[0].get("error") == expected_error
        json.dumps(event.model_dump(mode="json"), allow_nan=False)


@pytest.mark.parametrize("body", ["{not json", "NaN", '{"eventId": "\ud800"}', "[]", '"x"', "\ud800"])
def test_the_worker_parse_step_raises_only_park_reasons(body):
    """The worker's parse step, parse_stored, turns anything it cannot read into InvalidPayload (parked, never failed)."""
    with pytest.raises(InvalidPayload):
        parse_stored(body)


# --- one reading: the edge's one-pass check and the worker's parse_stored ---------------------------


def _edge_reading(body: bytes) -> tuple[object, ...]:
    """What the web edge decides for a validly signed body, step for step as service.webhooks does
    (without the delivery-age check): accepted (with what it keeps), a VERIFY, refused, or parked."""
    quick = quick_vehicle_event(body)
    if quick is not None:
        return ("accepted", quick.event_id, quick.event_type, quick.delivery_id)
    try:
        document = load_json(body)
    except MalformedBody as exc:
        return ("refused", exc.message)
    if not isinstance(document, dict):
        return ("refused", "The body is JSON but not an object.")
    try:
        event = parse_document(document)
    except InvalidPayload as exc:
        return ("parked", exc.code, exc.message)
    if isinstance(event, str):
        return ("verify",)
    return ("accepted", event.event_id, event.event_type, event.meta.deliveryId)


def _worker_reading(stored: bytes | str) -> tuple[object, ...]:
    """What the worker's parse step makes of a stored body: the event, or the park reason and detail."""
    try:
        return ("accepted", parse_stored(stored))
    except InvalidPayload as exc:
        return ("parked", exc.code, exc.message)


def _assert_one_reading(body: bytes) -> None:
    """The worker accepts what the edge accepts, with the step-by-step normalisation, and refuses the
    rest with the edge's reason (a body the edge refuses or answers as a VERIFY is invalid_payload)."""
    edge = _edge_reading(body)
    texts: list[bytes | str] = [body]
    with contextlib.suppress(UnicodeDecodeError):
        texts.append(body.decode("utf-8"))  # what the queue carries
    for stored in texts:
        worker = _worker_reading(stored)
        if edge[0] == "accepted":
            assert worker[0] == "accepted", (body[:200], worker)
            event = worker[1]
            assert edge == ("accepted", event.event_id, event.event_type, event.meta.deliveryId)
            assert event == parse_document(load_json(body))
            json.dumps(event.model_dump(mode="json"), allow_nan=False)
        elif edge[0] == "parked":
            assert worker == edge, body[:200]
        elif edge[0] == "refused":
            assert worker == ("parked", "invalid_payload", edge[1]), body[:200]
        else:
            assert worker[:2] == ("parked", "invalid_payload"), body[:200]


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.name)
def test_the_edge_and_the_worker_read_every_capture_alike(path):
    """Each capture, as captured and compact: accepted by the one-pass check, and the worker's one-pass
    parse gives the event the step-by-step parse gives."""
    for body in (path.read_bytes(), encode(load_fixture(path))):
        quick = quick_vehicle_event(body)
        assert quick is not None
        event = parse_stored(body.decode())
        delivered = event.meta.deliveredAt if isinstance(event.meta.deliveredAt, int) else None
        assert (quick.event_id, quick.event_type, quick.delivery_id, quick.delivered_at_ms) == (
            event.event_id,
            event.event_type,
            event.meta.deliveryId,
            delivered,
        )
        _assert_one_reading(body)


def _with_raw(document: dict, path: tuple[str | int, ...], raw: str) -> bytes:
    """``document`` as JSON with the value at ``path`` replaced by the raw JSON text ``raw``."""
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "@raw@"
    return json.dumps(document, ensure_ascii=False).replace('"@raw@"', raw).encode()


#: Raw values that read the same whatever the field (numbers here are never read as text).
HOSTILE_RAW = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1" * 4000,
    "1e300",
    "-5",
    "0",
    "true",
    "null",
    "[]",
    '{"ms": 1}',
    '""',
    '"NaN"',
    '"²⁰²⁶"',
    '"2026-01-05T10:00:00"',
    '"9999-12-31T23:59:59-01:00"',
    '"' + "x" * 10_000 + '"',
    '"\\ud800"',
    '".."',
    '"a/b"',
]
#: Descriptive text: a float there reads as text, so only the non-float raws go in.
TEXT_RAW = [raw for raw in HOSTILE_RAW if raw not in {"1e400", "-1e400", "1e300"}]
PLACES = [
    ("eventId",),
    ("eventType",),
    ("vehicleId",),
    ("data",),
    ("data", "user", "id"),
    ("data", "vehicle"),
    ("data", "vehicle", "id"),
    ("data", "vehicle", "year"),
    ("data", "signals"),
    ("data", "signals", 0, "body", "value"),
    ("data", "signals", 0, "meta", "oemUpdatedAt"),
    ("data", "signals", 0, "meta", "retrievedAt"),
    ("meta",),
    ("meta", "deliveredAt"),
    ("meta", "deliveryId"),
    ("version",),
    ("payload",),
]
TEXT_PLACES = [
    ("data", "vehicle", "make"),
    ("data", "signals", 0, "name"),
    ("data", "signals", 0, "code"),
    ("data", "signals", 0, "status", "value"),
    ("meta", "webhookName"),
    ("triggers", 0),
]


@pytest.mark.parametrize("place", PLACES + TEXT_PLACES, ids=lambda place: ".".join(map(str, place)))
def test_the_edge_and_the_worker_agree_on_hostile_values(place):
    """A hostile raw value anywhere in a delivery: the worker accepts or parks it exactly as the edge does."""
    for raw in TEXT_RAW if place in TEXT_PLACES else HOSTILE_RAW:
        document = sample_event()
        document["data"]["signals"][0].setdefault("status", {"value": "SUCCESS"})
        _assert_one_reading(_with_raw(document, place, raw))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"not json",
        b"NaN",
        b"[1, NaN]",
        b"[]",
        b"1",
        b'"x"',
        b"null",
        b"\xef\xbb\xbf{}",
        b"{} x",
        b'{"eventId": "e", "junk": ' + b"[" * 300 + b"]" * 300 + b"}",
        b'{"eventType": "VEHICLE_STATE", "data": {"user": {"id": "\xed\xa0\x80"}}}',
        json.dumps({"version": "2.0", "webhookId": "w", "eventName": "verify", "payload": {"challenge": "x"}}).encode(),
        json.dumps({"eventId": "e", "eventType": "VEHICLE_CONNECTION_STATUS", "data": {}}).encode(),
        json.dumps({"eventId": "e", "data": {}}).encode(),
        json.dumps(sample_event("VERIFY", challenge="abc")).encode(),
        json.dumps({"eventType": "VERIFY", "data": {}}).encode(),
        json.dumps(sample_event("VEHICLE_ERROR")).encode(),
    ],
)
def test_the_edge_and_the_worker_agree_on_whole_bodies(body):
    """Not JSON, not an object, legacy, unknown or missing type, VERIFY: the worker refuses each for the edge's reason."""
    _assert_one_reading(body)


@pytest.mark.parametrize(
    "mutate",
    [
        *SCHEMA_BREAKERS,
        lambda d: d.update(eventId=7),
        lambda d: d["data"]["vehicle"].update(id=42),
        lambda d: d["meta"].update(deliveryId=1),
        lambda d: d["data"]["user"].update(id={"secret": "1FAKEVIN00TEST001"}),
        lambda d: d["data"]["vehicle"].update(model="NaN Infinity"),
        lambda d: (d["data"].pop("vehicle"), d.pop("vehicleId", None)),
    ],
)
def test_the_edge_and_the_worker_agree_on_schema_failures(mutate):
    """A schema failure is parked by the worker with the edge's field-path reason; 'NaN' text is accepted by both."""
    document = sample_event()
    mutate(document)
    _assert_one_reading(json.dumps(document).encode())


@pytest.mark.hypothesis  # Hypothesis runs inside: make drills runs it at the full count
def test_the_edge_and_the_worker_agree_on_near_miss_deliveries():
    """Near-miss deliveries (the fuzz strategy) and valid ones: one decision, one reason, one event."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tests.test_fuzz import delivery_like

    @settings(max_examples=examples(500), deadline=None)
    @given(document=delivery_like | st.builds(sample_event))
    def check(document):
        body = json.dumps(document).encode()
        edge, worker = _edge_reading(body), _worker_reading(body)
        if edge[0] == "accepted":
            assert worker[0] == "accepted", worker
            event = worker[1]
            assert edge == ("accepted", event.event_id, event.event_type, event.meta.deliveryId)
        elif edge[0] == "parked":
            assert worker == edge
        else:
            assert worker[:2] == ("parked", "invalid_payload")

    check()


def test_a_float_in_text_reads_the_same_in_every_worker_body():
    """The worker reads every body from its bytes: a float where text belongs gives one text, whether or not
    the body holds the text 'NaN' (which sends it through the edge's steps first)."""
    plain = sample_event()
    plain["data"]["vehicle"]["make"] = 1e5
    with_nan_text = copy.deepcopy(plain)
    with_nan_text["data"]["vehicle"]["model"] = "NaN"
    make = parse_stored(json.dumps(plain)).vehicle.make
    assert parse_stored(json.dumps(with_nan_text)).vehicle.make == make
    assert make is not None
    assert float(make) == 1e5


# --- one rule for a signal's time, one JSON library for the output ---------------------------------


@pytest.mark.parametrize("retrieved", [0, "", False, None, "not a time", 1767000002, "2026-01-05T10:00:00Z"])
def test_a_signal_time_is_read_by_one_rule_in_webhook_and_api_signals(retrieved):
    """retrievedAt when present and not null (0, "" and false included), else fetchedAt, on both paths."""
    fetched = 1767000009999
    expected = epoch_ms(fetched if retrieved is None else retrieved)
    document = sample_event()
    document["data"]["signals"][0]["meta"].update(retrievedAt=retrieved, fetchedAt=fetched)
    body = json.dumps(document)
    assert parse_stored(body).signals[0]["retrievedAt"] == expected
    assert parse_document(json.loads(body)).signals[0]["retrievedAt"] == expected
    resource = {"id": "odometer-traveleddistance", "attributes": {"body": {"value": 1}}}
    resource["meta"] = {"retrievedAt": retrieved, "fetchedAt": fetched}
    assert api_signal(resource)["retrievedAt"] == expected
    assert retrieved_at(retrieved, fetched) == expected


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        ({"value": "ERROR"}, None, "ERROR"),
        ({"value": ""}, {"value": 1}, "SUCCESS"),
        (None, {"value": 1}, "SUCCESS"),
        (None, None, "UNAVAILABLE"),
        ({"value": None}, None, "UNAVAILABLE"),
    ],
)
def test_a_signal_status_is_read_by_one_rule_in_webhook_and_api_signals(status, body, expected):
    """The carried status, else SUCCESS with a body and UNAVAILABLE without, on both paths."""
    document = sample_event()
    signal = document["data"]["signals"][0]
    signal.pop("status", None)
    signal.pop("body", None)
    if status is not None:
        signal["status"] = status
    if body is not None:
        signal["body"] = body
    assert parse_stored(json.dumps(document)).signals[0]["status"] == expected
    attributes = {"body": body, **({"status": status} if status is not None else {})}
    assert api_signal({"id": "odometer-traveleddistance", "attributes": attributes})["status"] == expected


def test_the_stream_payload_is_compact_utf8_json_without_nan():
    """The output payload: compact, non-ASCII kept as UTF-8, and a NaN or infinity from the API written as null."""
    document = sample_event()
    document["data"]["vehicle"]["model"] = "Mégane E-Tech ✓"
    event = parse_stored(json.dumps(document))
    user = UserRecord(id=7, email=None, name=None, smartcar_user_id=event.smartcar_user_id)
    api = {"id": "x", "attributes": {"body": {"value": float("nan"), "top": float("inf"), "big": 10**400}}, "meta": {}}
    output = build_document(event, user, Enrichment(signals=[api]), 1767000000000, 1767000000100)
    fields = stream_fields(event, user, output)
    payload = fields["payload"]
    assert "Mégane E-Tech ✓" in payload
    assert ", " not in payload
    assert '": ' not in payload
    assert "NaN" not in payload
    assert "Infinity" not in payload
    decoded = json.loads(payload)
    assert decoded["latestSignals"][0]["body"] == {"value": None, "top": None, "big": 10**400}
    assert decoded["vehicle"]["model"] == "Mégane E-Tech ✓"
    assert fields["user_id"] == "7"


# --- the edge's reading: the worker's checks, without what the edge never reads -------------------

#: A delivery with every field of the wire schema present, so that a value can be put anywhere.
EVERY_FIELD = {
    "eventId": "0d6c0b7e-5555-4555-8555-555555555009",
    "eventType": "VEHICLE_STATE",
    "vehicleId": "5f0c1a2b-1111-4111-8111-111111111111",
    "data": {
        "user": {"id": "9e8d7c6b-2222-4222-8222-222222222222"},
        "vehicle": {
            "id": "5f0c1a2b-1111-4111-8111-111111111111",
            "make": "FORD",
            "model": "Mustang Mach-E",
            "year": 2023,
            "mode": "LIVE",
            "powertrainType": "BEV",
        },
        "signals": [
            {
                "code": "tractionbattery-stateofcharge",
                "name": "StateOfCharge",
                "group": "TractionBattery",
                "body": {"value": 64, "unit": "percent"},
                "meta": {"oemUpdatedAt": 1767000000000, "retrievedAt": 1767000002500, "fetchedAt": 1767000002500},
                "status": {"value": "ERROR", "error": {"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"}},
            }
        ],
        "triggers": [
            {"type": "SIGNAL_UPDATED", "code": "c", "name": "n", "group": "g", "signal": {"code": "c"}},
            "Odometer.TraveledDistance",
        ],
        "errors": [
            {
                "type": "VEHICLE_STATE",
                "code": "UNREACHABLE",
                "state": "ERROR",
                "description": "The vehicle could not be reached.",
                "suggestedUserMessage": "Try later.",
                "docURL": "https://example.invalid/doc",
                "resolution": {"type": "RETRY_LATER"},
                "signals": [
                    {"code": "location-preciselocation", "name": "PreciseLocation", "group": "Location"},
                    "A.B",
                ],
            }
        ],
    },
    "triggers": [{"type": "SIGNAL_UPDATED", "signal": "Odometer.TraveledDistance"}, "FIRST_DELIVERY"],
    "meta": {
        "version": "4.0",
        "deliveryId": "a1",
        "deliveredAt": 1767000003000,
        "webhookId": "w1",
        "webhookName": "fleet",
        "mode": "LIVE",
    },
}

#: Raw JSON values of every kind (numbers that fit and do not fit text, strings, containers, null).
EVERY_KIND = ["null", "true", "0", "-5", "1.5", "1e300", '""', '"x"', '"5f0c1a2b"', "[]", '["x"]', "{}", '{"code": 1}']


def _paths(value: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every path into ``value``, containers and leaves alike."""
    found: list[tuple[str | int, ...]] = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _accepted_by(validate, body: bytes) -> bool:
    try:
        validate(body)
    except ValueError:  # pydantic's ValidationError is a ValueError
        return False
    return True


@pytest.mark.parametrize("path", _paths(EVERY_FIELD), ids=lambda path: ".".join(map(str, path)))
def test_the_edge_validator_accepts_exactly_what_the_wire_validator_accepts(path):
    """Any kind of value anywhere in a delivery with every field: the edge's reading and the worker's agree."""
    from core.events.wire import EDGE_VALIDATOR, WIRE_VALIDATOR

    for raw in EVERY_KIND + HOSTILE_RAW:
        if raw in {"NaN", "Infinity", "-Infinity"}:
            continue  # not JSON: both paths send such bodies to load_json, which refuses them
        body = _with_raw(copy.deepcopy(EVERY_FIELD), path, raw)
        edge = _accepted_by(EDGE_VALIDATOR.validate_json, body)
        assert edge == _accepted_by(WIRE_VALIDATOR.validate_json, body), (path, raw)
        _assert_quick_agrees(body)


def _assert_quick_agrees(body: bytes) -> None:
    """The one-pass check accepts what the steps accept; it leaves a body holding the text NaN or
    Infinity to the steps."""
    quick = quick_vehicle_event(body) is not None
    if b"NaN" in body or b"Infinity" in body:
        assert not quick
    else:
        assert quick == _slow_path_accepts(body), body[:300]


@pytest.mark.hypothesis  # Hypothesis runs inside: make drills runs it at the full count
def test_the_edge_validator_and_the_wire_validator_agree_on_generated_deliveries():
    """Generated deliveries (the fuzz strategy, valid ones, and any JSON value at any path of a full one)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from core.events.wire import EDGE_VALIDATOR, WIRE_VALIDATOR
    from tests.test_fuzz import delivery_like, json_values

    paths = _paths(EVERY_FIELD)

    @st.composite
    def with_a_value_anywhere(draw):
        document = copy.deepcopy(EVERY_FIELD)
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            target = document
            try:
                for key in path[:-1]:
                    target = target[key]
                target[path[-1]] = draw(json_values)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier change replaced a container on this path
        return document

    @settings(max_examples=examples(600), deadline=None)
    @given(document=delivery_like | st.builds(sample_event) | with_a_value_anywhere())
    def check(document):
        body = json.dumps(document).encode()
        edge = _accepted_by(EDGE_VALIDATOR.validate_json, body)
        assert edge == _accepted_by(WIRE_VALIDATOR.validate_json, body)
        _assert_quick_agrees(body)

    check()


def test_the_edge_reading_has_every_field_of_the_wire_schema_but_the_unread_ones():
    """The edge's signal has the wire's keys, less a signal's body, and the same required keys (the
    rest of the schema is shared, a signal's meta and error only read as unread objects)."""
    from core.events import wire

    assert wire.EdgeSignal.__required_keys__ == wire.WireSignal.__required_keys__
    assert wire.EdgeSignal.__optional_keys__ == wire.WireSignal.__optional_keys__ - {"body"}


def test_the_edge_validator_reads_only_what_the_edge_needs():
    """The edge's reading holds the envelope and the checked texts, but no signal body, time or error content."""
    from core.events.wire import EDGE_VALIDATOR

    envelope = EDGE_VALIDATOR.validate_json(encode(EVERY_FIELD))
    assert envelope["eventId"] == EVERY_FIELD["eventId"]
    assert envelope["meta"]["deliveredAt"] == 1767000003000
    [signal] = envelope["data"]["signals"]
    assert "body" not in signal
    assert signal["meta"] == {}  # an object, checked as one, its times never read
    assert signal["status"] == {"value": "ERROR", "error": {}}
    quick = quick_vehicle_event(encode(EVERY_FIELD))
    assert quick == QuickEvent(EVERY_FIELD["eventId"], "VEHICLE_STATE", "a1", 1767000003000)


@pytest.mark.hypothesis  # Hypothesis runs inside: make drills runs it at the full count
def test_a_body_the_edge_accepts_is_read_alike_by_pythons_json():
    """What the edge accepts, pydantic-core and Python's json (RQ's serializer) read as one document: a
    body embedded in a job verbatim reads back as the delivery it is."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tests.test_fuzz import delivery_like

    def check(body: bytes) -> None:
        if _edge_reading(body)[0] != "accepted":
            return
        assert json.loads(body) == load_json(body)

    for path in fixture_paths():
        check(path.read_bytes())
    escapes_and_numbers = ['"tab\\there"', '"raw\tcontrol"', '"\\u00e9\\ud83d\\ude97"', '"é 🚗"', "-0", "1E+2", "1e-7"]
    for place in PLACES + TEXT_PLACES:
        for raw in [*HOSTILE_RAW, *escapes_and_numbers]:
            check(_with_raw(sample_event(), place, raw))

    @settings(max_examples=examples(300), deadline=None)
    @given(document=delivery_like | st.builds(sample_event))
    def generated(document):
        check(json.dumps(document, ensure_ascii=False).encode())

    generated()
