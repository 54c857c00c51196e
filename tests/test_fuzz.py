"""Property tests: whatever arrives, the edge never answers 5xx and every 4xx is a JSON error."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.signatures import sign
from tests.conftest import TOKEN
from tests.examples import examples

URL = "/webhooks/smartcar"
FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# No infinities: json.dumps writes them as Infinity, which is not JSON (the edge answers 400).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)

# Documents that look like deliveries, with each part possibly wrong.
delivery_like = st.fixed_dictionaries(
    {},
    optional={
        "eventId": st.one_of(st.text(max_size=300), st.integers(), st.none()),
        "eventType": st.sampled_from(["VERIFY", "VEHICLE_STATE", "VEHICLE_ERROR", "OTHER", ""]) | st.integers(),
        "data": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "user": st.one_of(json_values, st.fixed_dictionaries({"id": st.text(max_size=40)})),
                    "vehicle": st.one_of(json_values, st.fixed_dictionaries({"id": st.text(max_size=40)})),
                    "challenge": st.one_of(st.text(max_size=300), json_values),
                    "signals": json_values,
                    "triggers": json_values,
                    "errors": json_values,
                },
            ),
        ),
        "triggers": json_values,
        "meta": json_values,
        "version": st.just("2.0"),
    },
)

header_bytes = st.binary(max_size=100).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").strip())


def check(response):
    assert response.status_code < 500, response.text
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert isinstance(error["code"], str)
        assert isinstance(error["message"], str)
    else:
        response.json()


@FUZZ
@given(body=st.binary(max_size=2048), signature=header_bytes, content_type=header_bytes)
def test_arbitrary_bytes_and_headers_never_give_5xx(client, body, signature, content_type):
    """Random bytes with random headers: 4xx JSON errors at worst."""
    response = client.post(URL, content=body, headers={"sc-signature": signature, "content-type": content_type})
    check(response)
    assert response.status_code in {200, 400, 401, 413}


@FUZZ
@given(document=delivery_like, signed=st.booleans())
def test_delivery_like_documents_never_give_5xx(client, document, signed):
    """Near-miss deliveries, signed or not: handled, parked or refused, never a 5xx."""
    body = json.dumps(document).encode()
    headers = {"content-type": "application/json"}
    if signed:
        headers["sc-signature"] = sign(TOKEN.encode(), body)
    response = client.post(URL, content=body, headers=headers)
    check(response)
    if signed:
        assert response.status_code in {200, 202}
    else:
        assert response.status_code in {200, 401}


@FUZZ
@given(body=st.binary(max_size=512))
def test_signed_arbitrary_bytes_are_never_5xx(client, body):
    """Validly signed garbage is a 400, or parked when it happens to be JSON."""
    response = client.post(URL, content=body, headers={"sc-signature": sign(TOKEN.encode(), body)})
    check(response)
    assert response.status_code in {200, 202, 400}
