"""POST /webhooks/smartcar: every row of the contract's status table, over the real app and Redis.

The attacks of the security review (signing oracle with JSON scalars, numeric ids, non-finite
numbers, path-moving vehicle ids, replays of old signed deliveries) run over real HTTP against
the app served by uvicorn (:class:`tests.procs.LiveServer`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.testclient import TestClient

from cli.samples import encode, sample_event
from core.config import Settings
from core.errors import InvalidJob
from core.events.parse import parse_stored
from core.redis.dedupe import event_marks
from core.redis.inbox import Inbox
from core.redis.jobs import JobOptions, job_payload, spliced_job_data
from core.redis.keys import job_id_for
from core.signatures import answer_challenge
from service.app import WEBHOOK_PATH, IngestApp, create_admin_app, create_app
from service.responses import http_exception, unexpected_exception
from service.webhooks import UNSIGNED_VERIFY_MAX_BYTES, Deadlines, WebhookEndpoint
from tests.conftest import OLD_TOKEN, TOKEN, fixture_paths, load_fixture, signed_headers
from tests.contracts import check_parked_entry
from tests.examples import examples
from tests.marks import recall
from tests.procs import LiveServer
from workers.jobs import read_payload

URL = "/webhooks/smartcar"
#: Captures are historical: their meta.deliveredAt is months old, far past the dedupe window.
ARCHIVE_AGE_SECONDS = 20 * 365 * 24 * 3600
#: JSON scalars that fit the token-like character set; each would be a signable delivery body.
JSON_SCALARS = ["123", "-1", "0", "-0", "0.5", "1e5", "1E+2", "true", "false", "null", "9" * 256]


def post(client, document_or_body, token=TOKEN, headers=None):
    body = document_or_body if isinstance(document_or_body, bytes) else encode(document_or_body)
    return client.post(URL, content=body, headers=headers if headers is not None else signed_headers(body, token))


def queued_jobs(redis_client, name="smartcar-events"):
    queue = Queue(name, connection=redis_client, serializer=JSONSerializer)
    return queue.get_jobs()


def worker_body(job: Job) -> str:
    """The body the worker reads from a queued job: the delivery's own text, byte for byte."""
    return read_payload(job.args[0], job.data)["body"]


def parked(redis_client):
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in redis_client.xrange("smartcar:parked")]
    for entry in entries:
        check_parked_entry(entry)
    return entries


@pytest.fixture
def live(settings: Settings) -> Iterator[httpx.Client]:
    """The app over real HTTP (uvicorn on a free port), and a client pointed at it."""
    with LiveServer(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


def send(http: httpx.Client, body: bytes, signed: bool = True) -> httpx.Response:
    headers = signed_headers(body) if signed else {"content-type": "application/json"}
    return http.post(URL, content=body, headers=headers)


def with_raw(document: dict, **raw: str) -> bytes:
    """``document`` as JSON with each ``"@name@"`` string value replaced by the raw JSON text given."""
    body = encode(document).decode()
    for name, text in raw.items():
        body = body.replace(f'"@{name}@"', text)
    return body.encode()


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


def test_a_large_unsigned_body_is_never_parsed_for_a_verify(client):
    """An unsigned body larger than any VERIFY is refused unread (401): parsing 60 KB of nested arrays
    for a challenge cost an attacker nothing and the endpoint 22 times a junk body's CPU."""
    padding = ",".join(["[[[[[[[[[[1]]]]]]]]]]"] * 2_500)
    document = sample_event("VERIFY", challenge="3f1c9a-random-token") | {"padding": json.loads(f"[{padding}]")}
    body = encode(document)
    assert len(body) > UNSIGNED_VERIFY_MAX_BYTES
    response = client.post(URL, content=body, headers={"content-type": "application/json"})
    assert_error(response, 401, "invalid_signature")
    # The same VERIFY, small, is still answered.
    small = encode(sample_event("VERIFY", challenge="3f1c9a-random-token"))
    assert len(small) <= UNSIGNED_VERIFY_MAX_BYTES
    assert client.post(URL, content=small, headers={"content-type": "application/json"}).status_code == 200


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
def test_new_event_is_accepted_and_enqueued_as_a_json_rq_job(client, redis_client, settings, event_type):
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
    # RQ reads the embedded body as the JSON object it is; the worker reads its exact bytes.
    assert payload["body"] == document
    assert worker_body(job) == body.decode()
    assert isinstance(payload["receivedAt"], int)
    # The description shows type and id, never the body.
    assert document["data"]["vehicle"]["id"] not in job.description
    assert recall(redis_client, event_marks(settings.dedupe_ttl_seconds), document["eventId"]) == b"1"


def test_job_is_stored_with_the_json_serializer_not_pickle(client, redis_client):
    """The job's data field is JSON text naming the function and carrying the body verbatim, deflated
    as RQ deflates a job's data."""
    document = sample_event()
    document["data"]["vehicle"]["model"] = 'Mégane "E-Tech" \\ ✓'
    body = json.dumps(document, indent=1, ensure_ascii=False).encode()  # any spacing, non-ASCII kept
    assert post(client, body).status_code == 202
    raw = zlib.decompress(redis_client.hget(Job.key_for(document["eventId"]), "data"))
    decoded = json.loads(raw)
    assert decoded[0] == "workers.jobs.process_event"
    assert decoded[2][0]["body"] == document
    assert body in raw  # not escaped into a string: the delivery's own bytes
    [job] = queued_jobs(redis_client)
    assert worker_body(job).encode() == body


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
def test_every_captured_fixture_is_accepted(settings, redis_client, path):
    """Each real capture, signed, is accepted and queued (with a delivery age limit that spans its date)."""
    archive = settings.model_copy(update={"max_delivery_age_seconds": ARCHIVE_AGE_SECONDS})
    with TestClient(create_app(archive)) as client:
        response = post(client, path.read_bytes())
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "eventId": load_fixture(path)["eventId"]}
    [job] = queued_jobs(redis_client)
    # The job carries the capture as delivered (pretty-printed, newlines and all), not re-encoded.
    assert job.args[0]["body"] == load_fixture(path)
    assert worker_body(job).encode() == path.read_bytes()


@pytest.mark.process
def test_rq_reads_and_saves_a_job_with_an_embedded_body_without_changing_it(client, redis_client, redis_url):
    """RQ fetches the job (function, payload with the body as a JSON object), saves it again as it does on a
    retry or a requeue, and ``rq info`` counts it; the worker still reads the delivery byte for byte."""
    document = sample_event()
    body = json.dumps(document, indent=2).encode()
    assert post(client, body).status_code == 202
    job = Job.fetch(document["eventId"], connection=redis_client, serializer=JSONSerializer)
    assert job.func_name == "workers.jobs.process_event"
    [payload] = job.args
    assert payload == {
        "eventId": document["eventId"],
        "eventType": "VEHICLE_STATE",
        "receivedAt": payload["receivedAt"],
        "body": document,
    }
    job.retries_left = 1
    job.save()  # RQ compresses the data it writes back; it reads either form
    again = Job.fetch(document["eventId"], connection=redis_client, serializer=JSONSerializer)
    assert again.args == [payload]
    assert worker_body(again).encode() == body
    result = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", redis_url, "--only-queues", "--raw", "smartcar-events"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("queue smartcar-events 1,"), result.stdout


def test_the_worker_reads_bodies_written_as_text_too():
    """Jobs whose body is a JSON string (written by replay, the spool's drain or an older web) read as before,
    and a body RQ hands over parsed is taken from the job's data only when the data has the edge's form."""
    text = encode(sample_event()).decode()
    assert read_payload(job_payload("e", "VEHICLE_STATE", text, 1))["body"] == text
    spliced = spliced_job_data("e", "VEHICLE_STATE", text.encode(), 1)
    payload = json.loads(spliced)[2][0]
    assert read_payload(payload, spliced)["body"] == text
    # RQ's own serializer (json.dumps, with spaces) never writes the edge's layout: the body is not guessed at.
    by_rq = JSONSerializer.dumps(["workers.jobs.process_event", None, [payload], {}])
    with pytest.raises(InvalidJob, match="body is missing or not a string"):
        read_payload(payload, by_rq)
    with pytest.raises(InvalidJob, match="body is missing or not a string"):
        read_payload(payload)


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
    expected_id = document.get("eventId")
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


def test_a_legacy_delivery_posted_again_and_again_is_parked_once(client, redis_client):
    """A signed v2 delivery has neither an eventId nor a deliveredAt: its bytes' digest marks it, so
    thirty posts of one capture leave one entry (each up to MAX_BODY_BYTES for the retention)."""
    document = {"version": "2.0", "webhookId": "w", "eventName": "eventBased", "mode": "live", "payload": {"x": 1}}
    answers = [post(client, document).json() for _ in range(30)]
    assert answers[0] == {"status": "parked", "reason": "legacy_v2", "eventId": None}
    assert all(answer.get("duplicate") is True for answer in answers[1:])
    assert len(parked(redis_client)) == 1
    other = dict(document, webhookId="w2")
    assert "duplicate" not in post(client, other).json()
    assert len(parked(redis_client)) == 2


def test_an_event_id_shaped_like_another_ids_job_id_gets_its_own_job(client, redis_client):
    """An unsafe eventId becomes a digest job id; a second event whose literal eventId is that digest
    form must not be taken for a duplicate of the first and dropped."""
    first = sample_event(event_id="order/42")
    assert post(client, first).json()["status"] == "accepted"
    second = sample_event(event_id=job_id_for("order/42"))
    assert post(client, second).json() == {"status": "accepted", "eventId": job_id_for("order/42")}
    assert len(queued_jobs(redis_client)) == 2


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


class BrokenInbox(Inbox):
    """An inbox with a bug: every accept raises an error that is not Redis's."""

    async def accept(self, event_id: str, event_type: str, body: bytes | str, received_at_ms: int) -> bool:
        raise RuntimeError("a bug, not an outage")


@pytest.mark.parametrize("root_path", ["", "/behind-a-proxy"])
def test_an_error_of_the_endpoint_itself_is_a_503_never_a_500(settings, root_path, capsys, caplog):
    """A bug in the endpoint answers 503 internal_error with Retry-After (Smartcar retries it), on
    the direct dispatch of POST /webhooks/smartcar and through Starlette's router alike (a
    root_path sends the request the Starlette way), and logs the error."""
    endpoint = WebhookEndpoint(
        settings,
        BrokenInbox(redis.asyncio.Redis.from_url(settings.redis_url), JobOptions("q"), "parked", 60),
    )
    app = IngestApp(
        endpoint,
        routes=[Route(WEBHOOK_PATH, endpoint, methods=["POST"])],
        exception_handlers={HTTPException: http_exception, Exception: unexpected_exception},
    )
    document = sample_event()
    with TestClient(app, root_path=root_path, raise_server_exceptions=False) as test_client:
        response = post(test_client, document)
        assert_error(response, 503, "internal_error")
        assert response.headers["retry-after"].isdigit()
        assert_error(test_client.get(URL), 405, "method_not_allowed")
    # On stdout once the test process's logging is configured (create_app, in an earlier test of
    # this process), else through pytest's own handler: the line is looked for in both.
    logged = capsys.readouterr().out + caplog.text
    assert "unhandled error" in logged
    assert "RuntimeError" in logged


# --- health ------------------------------------------------------------------------------------


def test_healthz_and_readyz(client, settings):
    """/healthz (public app) and /readyz (admin app) are 200 while Redis answers."""
    assert client.get("/healthz").json() == {"status": "ok"}
    with TestClient(create_admin_app(settings)) as admin:
        assert admin.get("/readyz").json() == {"status": "ok", "checks": {"redis": "ok"}}


def test_metrics_count_outcomes(client, settings):
    """/metrics (admin app) exposes deliveries by outcome."""
    post(client, sample_event())
    with TestClient(create_admin_app(settings)) as admin:
        text = admin.get("/metrics").text
    assert 'smartcar_ingest_deliveries_total{outcome="accepted"}' in text
    assert "smartcar_ingest_webhook_request_seconds_bucket" in text


# --- security review: the attacks, over real HTTP -------------------------------------------------


@pytest.mark.parametrize("challenge", JSON_SCALARS)
def test_unsigned_verify_with_a_json_scalar_challenge_is_refused(live, redis_client, challenge):
    """An unsigned VERIFY whose challenge is a JSON scalar gets 401: its HMAC would sign a body."""
    response = send(live, encode(sample_event("VERIFY", challenge=challenge)), signed=False)
    assert_error(response, 401, "invalid_signature")
    assert answer_challenge(TOKEN.encode(), challenge) not in response.text


@pytest.mark.parametrize("body", [*JSON_SCALARS, '"text"', "[]", "[1, 2, 3]", '[{"eventId": "e-1"}]', " 123 "])
def test_signed_json_that_is_not_an_object_is_refused_and_never_parked(live, redis_client, body):
    """A validly signed scalar or array gets 400 not_an_object: nothing is parked or queued."""
    response = send(live, body.encode())
    assert_error(response, 400, "not_an_object")
    assert redis_client.xlen("smartcar:parked") == 0
    assert queued_jobs(redis_client) == []


def test_parked_stream_is_trimmed_by_age_when_the_web_parks(live, redis_client):
    """Parking over HTTP trims entries older than PARKED_RETENTION_SECONDS in the same XADD."""
    for i in range(1000):  # entries from 1970: far past any retention
        redis_client.xadd("smartcar:parked", {"event_id": f"old-{i}", "reason": "x"}, id=f"{1000 + i}-0")
    response = send(live, encode({"eventId": "e-new", "eventType": "SOMETHING_NEW", "data": {}}))
    assert response.json()["status"] == "parked"
    entries = parked(redis_client)
    assert entries[-1]["event_id"] == "e-new"
    # "~" trims whole stream nodes: at most one node of old entries (100 by default) may remain.
    assert len(entries) <= 101


@pytest.mark.parametrize("raw_id", ["7e0", "7", "7.0", "-1", "1e400", "true", '["e-1"]', '{"id": "e-1"}'])
def test_an_event_id_that_is_not_a_json_string_is_parked_without_an_id(live, redis_client, raw_id):
    """eventId 7e0 (or any non-string) is a schema failure: parked invalid_payload, never read as "7"."""
    document = sample_event(event_id="@id@")
    response = send(live, with_raw(document, id=raw_id))
    assert response.status_code == 202
    assert response.json() == {"status": "parked", "reason": "invalid_payload", "eventId": None}
    [entry] = parked(redis_client)
    assert entry["event_id"] == ""
    assert queued_jobs(redis_client) == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ["signal_value", "delivered_at", "year", "unknown_field", "event_id"])
def test_nan_and_infinity_are_not_json(live, redis_client, literal, where):
    """A NaN or Infinity literal anywhere in a signed body gets 400: never queued, parked or published."""
    document = sample_event()
    if where == "signal_value":
        document["data"]["signals"][0]["body"]["value"] = "@x@"
    elif where == "delivered_at":
        document["meta"]["deliveredAt"] = "@x@"
    elif where == "year":
        document["data"]["vehicle"]["year"] = "@x@"
    elif where == "unknown_field":
        document["future"] = {"score": "@x@"}
    else:
        document["eventId"] = "@x@"
    assert_error(send(live, with_raw(document, x=literal)), 400, "malformed_json")
    assert queued_jobs(redis_client) == []
    assert redis_client.xlen("smartcar:parked") == 0


HOSTILE_TIMES = [
    '"' + "1" * 4301 + '"',
    '"' + "9" * 5000 + '"',
    "1" * 4000,
    "1e400",
    "-1e400",
    "1e300",
    "true",
    "-5",
    '"NaN"',
    '"²⁰²⁶"',
    '"9999-12-31T23:59:59-01:00"',
    '"0001-01-01T00:00:00+01:00"',
    '"2026-01-05T10:00:00"',
    '{"ms": 1}',
]


@pytest.mark.parametrize("raw", HOSTILE_TIMES)
def test_unreadable_times_and_years_are_accepted_and_read_as_unknown(live, redis_client, raw):
    """Huge, non-finite, boolean or out-of-range times and years: accepted, and the worker reads None."""
    document = sample_event()
    document["data"]["signals"][0]["meta"]["oemUpdatedAt"] = "@t@"
    document["data"]["signals"][0]["meta"]["retrievedAt"] = "@t@"
    document["data"]["vehicle"]["year"] = "@t@"
    document["data"]["signals"][0]["body"]["value"] = "@t@"
    document["meta"]["deliveredAt"] = "@t@"
    response = send(live, with_raw(document, t=raw))
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "eventId": document["eventId"]}
    [job] = queued_jobs(redis_client)
    event = parse_stored(worker_body(job))  # the worker's own parse step
    assert event.event_id == document["eventId"]
    assert event.signals[0]["oemUpdatedAt"] is None
    assert event.signals[0]["retrievedAt"] is None
    assert event.vehicle.year is None
    assert event.meta.deliveredAt is None or isinstance(event.meta.deliveredAt, str)
    json.dumps(event.model_dump(mode="json"), allow_nan=False)  # no NaN or Infinity can reach the output


@pytest.mark.parametrize("vehicle_id", ["..", ".", "../../connections", "a/b", "%2e%2e", "", "x" * 65, "é"])
@pytest.mark.parametrize("field", ["data.vehicle.id", "vehicleId"])
def test_a_vehicle_id_that_could_move_the_url_path_is_parked(live, redis_client, vehicle_id, field):
    """A vehicle id like '..' or '../../connections' is parked invalid_payload and never queued."""
    document = sample_event()
    if field == "vehicleId":
        del document["data"]["vehicle"]
        document["vehicleId"] = vehicle_id
    else:
        document["data"]["vehicle"]["id"] = vehicle_id
    response = send(live, encode(document))
    assert response.status_code == 202
    assert response.json() == {"status": "parked", "reason": "invalid_payload", "eventId": document["eventId"]}
    assert queued_jobs(redis_client) == []


def _sent_ago(seconds: float) -> dict[str, int | str]:
    at = time.time() - seconds
    return {
        "ms": int(at * 1000),
        "s": int(at),
        "iso": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(at)),
    }


@pytest.mark.parametrize("form", ["ms", "s", "iso"])
def test_signed_delivery_older_than_the_dedupe_window_is_refused(live, settings, redis_client, form):
    """A properly signed delivery sent longer ago than DEDUPE_TTL_SECONDS gets 400 delivery_too_old."""
    old = _sent_ago(settings.delivery_max_age_seconds + 60)[form]
    document = sample_event()
    document["meta"]["deliveredAt"] = old
    broken = sample_event(event_id="e-broken")
    broken["meta"]["deliveredAt"] = old
    del broken["data"]["user"]  # would be parked if it were recent
    for body in (encode(document), encode(broken)):
        assert_error(send(live, body), 400, "delivery_too_old")
    assert queued_jobs(redis_client) == []
    assert redis_client.xlen("smartcar:parked") == 0


@pytest.mark.parametrize("delivered_at", ["recent", "missing", "unreadable"])
def test_recent_or_undated_signed_deliveries_are_accepted(live, settings, redis_client, delivered_at):
    """A delivery inside the window, without meta.deliveredAt, or with an unreadable one, is accepted."""
    document = sample_event()
    if delivered_at == "recent":
        document["meta"]["deliveredAt"] = _sent_ago(settings.delivery_max_age_seconds - 60)["ms"]
    elif delivered_at == "missing":
        del document["meta"]["deliveredAt"]
    else:
        document["meta"]["deliveredAt"] = "yesterday-ish"
    assert send(live, encode(document)).json() == {"status": "accepted", "eventId": document["eventId"]}


def test_replay_after_the_event_id_is_forgotten_is_refused(settings, redis_client):
    """Replaying a captured signed delivery once its dedupe mark has expired is refused, not queued again."""
    short = settings.model_copy(update={"dedupe_ttl_seconds": 2})
    body = encode(sample_event())
    with LiveServer(create_app(short)) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        assert send(http, body).json()["status"] == "accepted"
        redis_client.delete(Job.key_for(json.loads(body)["eventId"]))
        redis_client.delete("rq:queue:smartcar-events")
        # The dedupe mark expires (between the TTL and the TTL plus a slot); the signature stays valid forever.
        marks = event_marks(short.dedupe_ttl_seconds)
        deadline = time.monotonic() + 10
        while recall(redis_client, marks, json.loads(body)["eventId"]) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.25)
        assert_error(send(http, body), 400, "delivery_too_old")
    assert queued_jobs(redis_client) == []


@pytest.mark.hypothesis  # Hypothesis runs inside: make drills runs it at the full count
def test_what_the_edge_accepts_the_worker_parses_with_the_same_event_id(live, redis_client):
    """Property: for JSON-ish bodies, a 202 accepted at the edge means the worker parses the job to that eventId."""
    from hypothesis import HealthCheck, event, given, settings
    from hypothesis import strategies as st

    raw_numbers = ["7e0", "7", "-0", "1e400", "NaN", "Infinity", "1" * 400, "0.1", "1.5e3", "true", "null"]
    values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=12)
        | st.sampled_from(["..", "2026-01-05T10:00:00Z", "1767000000", "9" * 30]),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
        max_leaves=8,
    )
    paths = st.sampled_from(
        [
            ("eventId",),
            ("eventType",),
            ("vehicleId",),
            ("data", "user", "id"),
            ("data", "vehicle", "id"),
            ("data", "vehicle", "year"),
            ("data", "vehicle", "make"),
            ("data", "signals", 0, "body", "value"),
            ("data", "signals", 0, "meta", "oemUpdatedAt"),
            ("data", "signals", 0, "status"),
            ("data", "signals", 0, "code"),
            ("meta", "deliveredAt"),
            ("meta", "deliveryId"),
            ("triggers",),
        ]
    )
    mutation = st.tuples(paths, st.one_of(values, st.sampled_from(raw_numbers).map(lambda raw: ("raw", raw))))

    outcomes: Counter[str] = Counter()

    @settings(max_examples=examples(400), deadline=None, suppress_health_check=list(HealthCheck))
    @given(mutations=st.lists(mutation, max_size=3), event_id=st.text(min_size=1, max_size=20) | st.uuids().map(str))
    def check(mutations, event_id):
        document = sample_event(event_id=event_id)
        raw: dict[str, str] = {}
        for number, (path, value) in enumerate(mutations):
            target = document
            for key in path[:-1]:
                target = target[key]
            if isinstance(value, tuple):
                raw[f"r{number}"] = value[1]
                value = f"@r{number}@"
            target[path[-1]] = value
        response = send(live, with_raw(document, **raw))
        assert response.status_code < 500, response.text
        outcome = f"{response.status_code} {response.json().get('status') or response.json()['error']['code']}"
        event(outcome)
        outcomes[outcome] += 1
        if response.status_code == 202 and response.json()["status"] == "accepted":
            accepted_id = response.json()["eventId"]
            assert isinstance(accepted_id, str)
            job = Job.fetch(job_id_for(accepted_id), connection=redis_client, serializer=JSONSerializer)
            payload = job.args[0]
            assert payload["eventId"] == accepted_id
            parsed = parse_stored(worker_body(job))
            assert parsed.event_id == accepted_id
            json.dumps(parsed.model_dump(mode="json"), allow_nan=False)

    check()
    print("edge outcomes:", dict(outcomes))
    # At least 3 in 40 examples accepted (30 of the full 400), or the property is barely exercised.
    assert outcomes["202 accepted"] >= examples(400) * 3 // 40, "the property must be exercised by accepted deliveries"


# --- deadlines ---------------------------------------------------------------------------------


def test_a_deadline_ends_the_wait_it_was_given_and_nothing_else():
    """One timer for every request: a wait past its deadline is cancelled (within a tick before its time), a
    wait that ends in time is left alone afterwards, and any other cancellation still propagates."""

    async def scenario() -> None:
        deadlines = Deadlines(tick=0.02)
        started = time.monotonic()
        task = deadlines.start(0.2)
        try:
            await asyncio.sleep(5)
            raise AssertionError("the deadline did not fire")
        except asyncio.CancelledError:
            assert isinstance(deadlines.expired(task), TimeoutError)
        finally:
            deadlines.stop(task)
        # Never before its time less one tick; the upper bound only allows for a busy machine.
        assert 0.15 <= time.monotonic() - started <= 0.2 + 1.0
        assert task.cancelling() == 0  # withdrawn: the task goes on, as after asyncio.timeout

        task = deadlines.start(0.05)
        await asyncio.sleep(0)
        deadlines.stop(task)
        await asyncio.sleep(0.15)  # the sweep finds nothing of this task to cancel

        async def waiter() -> None:
            own = deadlines.start(5)
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                deadlines.expired(own)  # not the deadline's: re-raised
                raise AssertionError("a cancellation not the deadline's was taken for a timeout") from None
            finally:
                deadlines.stop(own)

        other = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        other.cancel()
        with pytest.raises(asyncio.CancelledError):
            await other

    asyncio.run(scenario())
