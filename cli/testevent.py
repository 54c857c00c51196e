"""``smartcar-ingest send-test-event``: sign a sample delivery and post it, as Smartcar would."""

from __future__ import annotations

import httpx

from cli.samples import encode, sample_event
from core.config import DEV_MANAGEMENT_TOKEN, Settings
from core.errors import ConfigurationError, EndpointUnavailable
from core.signatures import answer_challenge, sign


def send_test_event(settings: Settings, url: str, event_type: str) -> int:
    """Post one signed sample event to ``url``; 0 when the service answered as the contract says.

    1 when it answered otherwise; a ``url`` that does not answer is :class:`EndpointUnavailable`
    (exit 3), one that is not an http(s) URL a :class:`ConfigurationError` (exit 2).
    """
    tokens = settings.management_tokens
    if not tokens:
        # The same default `smartcar-ingest dev` uses, so the two work together out of the box.
        print("SMARTCAR_MANAGEMENT_TOKEN is not set: signing with the dev default.")
        tokens = (DEV_MANAGEMENT_TOKEN.encode(),)
    document = sample_event(event_type)
    body = encode(document)
    headers = {"content-type": "application/json", "sc-signature": sign(tokens[0], body)}
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=15.0)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise ConfigurationError(f"--url is not an http(s) URL ({type(exc).__name__}).") from None
    except httpx.HTTPError as exc:
        raise EndpointUnavailable(
            f"could not reach {url} ({type(exc).__name__}); is the web process running?"
        ) from None
    print(f"POST {url} {event_type} eventId={document['eventId']}")
    print(f"-> {response.status_code} {response.text}")
    if event_type == "VERIFY":
        expected = answer_challenge(tokens[0], document["data"]["challenge"])
        try:
            answered = response.status_code == 200 and response.json().get("challenge") == expected
        except ValueError:
            answered = False
        print("challenge answer matches" if answered else "challenge answer does NOT match")
        return 0 if answered else 1
    return 0 if response.status_code == 202 else 1
