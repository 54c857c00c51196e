"""Sample deliveries in Smartcar's shape, for ``send-test-event`` (which signs one and posts it) and the tests;
their user and vehicle are the emulator's seed, so a sample sent through ``make run`` is enriched end to end."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx

from core.config import DEV_MANAGEMENT_TOKEN, Settings
from core.errors import ConfigurationError, Unreachable
from core.signatures import answer_challenge, sign

SAMPLE_USER_ID = "9e8d7c6b-2222-4222-8222-222222222222"
SAMPLE_VEHICLE_ID = "5f0c1a2b-1111-4111-8111-111111111111"


def sample_event(
    event_type: str = "VEHICLE_STATE",
    event_id: str | None = None,
    user_id: str = SAMPLE_USER_ID,
    vehicle_id: str = SAMPLE_VEHICLE_ID,
    challenge: str | None = None,
) -> dict[str, Any]:
    """A delivery document of the given type with a fresh ``eventId`` unless one is given."""
    now_ms = int(time.time() * 1000)
    document: dict[str, Any] = {"eventId": event_id or str(uuid.uuid4()), "eventType": event_type}
    user = {"id": user_id}
    vehicle = {"id": vehicle_id, "make": "FORD", "model": "Mustang Mach-E", "year": 2023}
    if event_type == "VERIFY":
        document["data"] = {"challenge": challenge or uuid.uuid4().hex}
    elif event_type == "VEHICLE_ERROR":
        error = {
            "type": "VEHICLE_STATE",
            "code": "UNREACHABLE",
            "state": "ERROR",
            "description": "The vehicle could not be reached.",
            "resolution": {"type": "RETRY_LATER"},
            "signals": [{"code": "location-preciselocation", "name": "PreciseLocation", "group": "Location"}],
        }
        document["data"] = {"user": user, "vehicle": vehicle, "errors": [error]}
    else:
        signals = [
            {
                "code": code,
                "name": name,
                "group": group,
                "body": body,
                "meta": {"oemUpdatedAt": now_ms - 5000, "retrievedAt": now_ms - 200},
                "status": {"value": "SUCCESS"},
            }
            for code, name, group, body in (
                ("tractionbattery-stateofcharge", "StateOfCharge", "TractionBattery", {"value": 81, "unit": "percent"}),
                ("odometer-traveleddistance", "TraveledDistance", "Odometer", {"value": 30512.7, "unit": "km"}),
            )
        ]
        document["data"] = {"user": user, "vehicle": vehicle, "signals": signals}
        trigger = {k: signals[0][k] for k in ("code", "name", "group")}
        document["triggers"] = [{"type": "SIGNAL_UPDATED", "signal": trigger}]
    document["meta"] = {
        "version": "4.0",
        "deliveryId": str(uuid.uuid4()),
        "deliveredAt": now_ms,
        "webhookId": "b2b2b2b2-3333-4333-8333-333333333333",
        "webhookName": "smartcar-ingest-sample",
        "mode": "TEST",
        **({"signalCount": 2} if event_type == "VEHICLE_STATE" else {}),
    }
    return document


def encode(document: Any) -> bytes:
    """Compact UTF-8 JSON bytes, the way Smartcar sends them."""
    return json.dumps(document, separators=(",", ":")).encode()


def send_test_event(settings: Settings, url: str, event_type: str) -> int:
    """Post one signed sample event to ``url``; 0 when the service answered as the contract says, else 1."""
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
        raise Unreachable(f"could not reach {url} ({type(exc).__name__}); is the web process running?") from None
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
