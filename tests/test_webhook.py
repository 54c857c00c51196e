"""POST /webhooks/smartcar: every row of the contract's status table, over the real app and Redis."""

from __future__ import annotations

import json

import pytest
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from core.inbox import dedupe_key, job_id_for
from core.samples import encode, sample_event
from core.signatures import answer_challenge
from tests.conftest import OLD_TOKEN, TOKEN, fixture_paths, load_fixture, signed_headers

URL = "/webhooks/smartcar"


def post(client, document_or_body, token=TOKEN, headers=None):
    body = document_or_body if isinstance(document_or_body, bytes) else encode(document_or_body)
    return client.post(URL, content=body, headers=headers if headers is not None else signed_headers(body, token))


def queued_jobs(redis_client, name="smartcar-events"):
    queue = Queue(name, connection=redis_client, serializer=JSONSerializer)
    return queue.get_jobs()


def parked(redis_client):
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in redis_client.xrange("smartcar:parked")]


def assert_error(response, status, code=None):
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    if code:
        assert error["code"] == code


# --- VERIFY -------------------------------------------------------------------------------------


def test_signed_verify_is_answered_with_the_first_token(client):
    """A signed VERIFY gets 200 and HMAC(first token, challenge)."""
    document = sample_event("VERIFY", challenge="3f1c9a-random-token")
    response = post(client, document)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"challenge": answer_challenge(TOKEN.encode(), "3f1c9a-random-token")}


def test_verify_signed_with_the_previous_token_is_answered_with_the_first(client):
    """Rotation: a VERIFY signed with the second token is answered with the first."""
    response = post(client, sample_event("VERIFY", challenge="abc"), token=OLD_TOKEN)
    assert response.json() == {"challenge": answer_challenge(TOKEN.encode(), "abc")}


def test_unsigned_verify_with_token_like_challenge_is_answered(client):
    """An unsigned VERIFY with a token-like challenge gets 200 (Smartcar may not sign VERIFY)."""
    body = encode(sample_event("VERIFY", challenge="3f1c9a-random-token"))
    response = client.post(URL, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.json()["challenge"] == answer_challenge(TOKEN.encode(), "3f1c9a-random-token")


def test_signing_oracle_attempt_is_refused(client, redis_client):
    """An unsigned VERIFY whose challenge is a forged delivery body gets 401, and nothing is signed."""
    forged = encode(sample_event())
    body = encode(sample_event("VERIFY", challenge=forged.decode()))
    response = client.post(URL, content=body, headers={"content-type": "application/json"})
    assert_error(response, 401, "invalid_signature")
    assert answer_challenge(TOKEN.encode(), forged.decode()) not in response.text
    assert queued_jobs(redis_client) == []


def test_wrongly_signed_verify_with_json_challenge_is_refused(client):
    """A VERIFY with a wrong signature and a non-token challenge gets 401."""
    body = encode(sample_event("VERIFY", challenge='{"a": 1}'))
    response = client.post(URL, content=body, headers=signed_headers(body, "wrong-token"))
    assert_error(response, 401)


def test_signed_verify_with_any_challenge_is_answered(client):
    """A validly signed VERIFY is answered whatever its challenge, since Smartcar vouched for it."""
    response = post(client, sample_event("VERIFY", challenge="not token like {}"))
    assert response.json() == {"challenge": answer_challenge(TOKEN.encode(), "not token like {}")}


# --- vehicle events ----------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", ["VEHICLE_STATE", "VEHICLE_ERROR"])
def test_new_event_is_accepted_and_enqueued_as_a_json_rq_job(client, redis_client, event_type):
    """A new signed event gets 202 accepted and exactly one RQ job with the raw body."""
    document = sample_event(event_type)
    body = encode(document)
    response = post(client, body)
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "eventId": document["eventId"]}
    [job] = queued_jobs(redis_client)
    assert job.id == document["eventId"]
    assert job.func_name == "workers.jobs.process_event"
    assert job.origin == "smartcar-events"
    assert job.get_status() == "queued"
    [payload] = job.args
    assert payload["eventId"] == document["eventId"]
    assert payload["eventType"] == event_type
    assert payload["body"] == body.decode()
    assert isinstance(payload["receivedAt"], int)
    # The description shows type and id, never the body.
    assert document["data"]["vehicle"]["id"] not in job.description
    assert redis_client.ttl(dedupe_key(document["eventId"])) > 0


def test_job_is_stored_with_the_json_serializer_not_pickle(client, redis_client):
    """The job's data field is JSON text naming the function and carrying the body."""
    document = sample_event()
    post(client, document)
    raw = redis_client.hget(Job.key_for(document["eventId"]), "data")
    decoded = json.loads(raw)
    assert decoded[0] == "workers.jobs.process_event"
    assert decoded[2][0]["body"] == encode(document).decode()


def test_duplicate_event_is_acknowledged_without_a_second_job(client, redis_client):
    """The same eventId again gets 202 duplicate and no second job, even with a new deliveryId."""
    document = sample_event()
    assert post(client, document).json()["status"] == "accepted"
    document["meta"]["deliveryId"] = "another-attempt"
    response = post(client, document)
    assert response.status_code == 202
    assert response.json() == {"status": "duplicate", "eventId": document["eventId"]}
    assert len(queued_jobs(redis_client)) == 1


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.name)
def test_every_captured_fixture_is_accepted(client, redis_client, path):
    """Each real capture, signed, is accepted and queued."""
    body = path.read_bytes()
    response = post(client, body)
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "eventId": load_fixture(path)["eventId"]}
    assert len(queued_jobs(redis_client)) == 1


def test_event_id_that_rq_would_refuse_gets_a_derived_job_id(client, redis_client):
    """An eventId with characters RQ forbids still gets one job, under a stable derived id."""
    document = sample_event(event_id="evt:with/odd chars")
    assert post(client, document).json() == {"status": "accepted", "eventId": "evt:with/odd chars"}
    [job] = queued_jobs(redis_client)
    assert job.id == job_id_for("evt:with/odd chars") != "evt:with/odd chars"
    assert post(client, document).json()["status"] == "duplicate"


# --- parked ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"eventId": "e-schema", "eventType": "VEHICLE_STATE", "data": {"vehicle": {"id": "v"}}}, "invalid_payload"),
        ({"eventId": "e-type", "eventType": "VEHICLE_CONNECTION_STATUS", "data": {}}, "unknown_event_type"),
        (
            {"version": "2.0", "webhookId": "w", "eventName": "eventBased", "mode": "live", "payload": {}},
            "legacy_v2",
        ),
        ({"eventType": "VEHICLE_STATE"}, "invalid_payload"),
        ([1, 2, 3], "invalid_payload"),
        ({"eventId": "e-verify", "eventType": "VERIFY", "data": {}}, "invalid_payload"),
    ],
)
def test_signed_but_unprocessable_deliveries_are_parked(client, redis_client, document, reason):
    """Schema failures, unknown types and legacy payloads get 202 parked and are kept, not queued."""
    body = encode(document)
    response = post(client, body)
    assert response.status_code == 202
    content = response.json()
    assert content["status"] == "parked"
    assert content["reason"] == reason
    expected_id = document.get("eventId") if isinstance(document, dict) else None
    assert content["eventId"] == expected_id
    [entry] = parked(redis_client)
    assert entry["reason"] == reason
    assert entry["payload"] == body.decode()
    assert entry["event_id"] == (expected_id or "")
    assert entry["detail"]
    assert queued_jobs(redis_client) == []


def test_parked_redelivery_is_not_parked_twice(client, redis_client):
    """The same unprocessable eventId again is acknowledged as parked without a second entry."""
    document = {"eventId": "e-twice", "eventType": "SOMETHING_NEW", "data": {}}
    post(client, document)
    response = post(client, document)
    assert response.json() == {
        "status": "parked",
        "reason": "unknown_event_type",
        "eventId": "e-twice",
        "duplicate": True,
    }
    assert len(parked(redis_client)) == 1


def test_parking_an_event_id_does_not_block_a_valid_delivery_of_it(client, redis_client):
    """A later valid delivery with a parked eventId is still accepted."""
    document = sample_event()
    broken = json.loads(json.dumps(document))
    del broken["data"]["user"]
    assert post(client, broken).json()["status"] == "parked"
    assert post(client, document).json()["status"] == "accepted"


# --- rejected ----------------------------------------------------------------------------------


def test_missing_signature_is_401(client, redis_client):
    """A vehicle event without SC-Signature gets 401 and nothing is stored."""
    response = client.post(URL, content=encode(sample_event()), headers={"content-type": "application/json"})
    assert_error(response, 401, "invalid_signature")
    assert queued_jobs(redis_client) == []
    assert parked(redis_client) == []


def test_wrong_signature_is_401(client):
    """A signature under another key gets 401."""
    body = encode(sample_event())
    assert_error(client.post(URL, content=body, headers=signed_headers(body, "attacker")), 401, "invalid_signature")


def test_signature_over_other_bytes_is_401(client):
    """A signature of a re-serialised body does not verify the bytes actually sent."""
    document = sample_event()
    body = json.dumps(document, indent=2).encode()
    response = client.post(URL, content=body, headers=signed_headers(encode(document)))
    assert_error(response, 401)


def test_signed_non_json_is_400(client):
    """A validly signed body that is not JSON gets 400."""
    for body in (b"not json", b"{", b"\xff\xfe{}"):
        assert_error(post(client, body), 400, "malformed_json")


def test_body_over_the_limit_is_413(client, settings, redis_client):
    """A body over MAX_BODY_BYTES gets 413, before the signature is even checked."""
    body = b"x" * (settings.max_body_bytes + 1)
    assert_error(post(client, body), 413, "body_too_large")


def test_streamed_body_over_the_limit_is_413_without_content_length(client, settings):
    """A chunked body without Content-Length is cut off once past the limit."""

    def chunks():
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b"x" * 1024

    response = client.post(URL, content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "body_too_large")


def test_body_at_the_limit_is_read(client, settings):
    """A body of exactly MAX_BODY_BYTES is read (and here, unsigned, refused as 401 not 413)."""
    response = client.post(URL, content=b" " * settings.max_body_bytes)
    assert_error(response, 401)


def test_other_methods_and_paths_get_json_errors(client):
    """GET on the webhook and unknown paths answer in the error shape."""
    assert_error(client.get(URL), 405, "method_not_allowed")
    assert_error(client.get("/nope"), 404, "not_found")


# --- health ------------------------------------------------------------------------------------


def test_healthz_and_readyz(client):
    """/healthz and /readyz are 200 while Redis answers."""
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok", "checks": {"redis": "ok"}}


def test_metrics_count_outcomes(client):
    """/metrics exposes deliveries by outcome."""
    post(client, sample_event())
    text = client.get("/metrics").text
    assert 'smartcar_ingest_deliveries_total{outcome="accepted"}' in text
    assert "smartcar_ingest_webhook_request_seconds_bucket" in text
