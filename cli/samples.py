"""Sample deliveries in Smartcar's real shape, for ``send-test-event``, tests and benchmarks.

The user and vehicle match the emulator's seed (the example ids in Smartcar's docs), so a
sample sent through ``make run`` is routed and enriched end to end.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

SAMPLE_USER_ID = "9e8d7c6b-2222-4222-8222-222222222222"
SAMPLE_VEHICLE_ID = "5f0c1a2b-1111-4111-8111-111111111111"


def _meta(event_type: str) -> dict[str, Any]:
    return {
        "version": "4.0",
        "deliveryId": str(uuid.uuid4()),
        "deliveredAt": int(time.time() * 1000),
        "webhookId": "b2b2b2b2-3333-4333-8333-333333333333",
        "webhookName": "smartcar-ingest-sample",
        "mode": "TEST",
        **({"signalCount": 2} if event_type == "VEHICLE_STATE" else {}),
    }


def sample_event(
    event_type: str = "VEHICLE_STATE",
    event_id: str | None = None,
    user_id: str = SAMPLE_USER_ID,
    vehicle_id: str = SAMPLE_VEHICLE_ID,
    challenge: str | None = None,
) -> dict[str, Any]:
    """A delivery document of the given type with a fresh ``eventId`` unless one is given."""
    event_id = event_id or str(uuid.uuid4())
    now_ms = int(time.time() * 1000)
    if event_type == "VERIFY":
        return {
            "eventId": event_id,
            "eventType": "VERIFY",
            "data": {"challenge": challenge or uuid.uuid4().hex},
            "meta": _meta("VERIFY"),
        }
    user = {"id": user_id}
    vehicle = {"id": vehicle_id, "make": "FORD", "model": "Mustang Mach-E", "year": 2023}
    if event_type == "VEHICLE_ERROR":
        data: dict[str, Any] = {
            "user": user,
            "vehicle": vehicle,
            "errors": [
                {
                    "type": "VEHICLE_STATE",
                    "code": "UNREACHABLE",
                    "state": "ERROR",
                    "description": "The vehicle could not be reached.",
                    "resolution": {"type": "RETRY_LATER"},
                    "signals": [{"code": "location-preciselocation", "name": "PreciseLocation", "group": "Location"}],
                }
            ],
        }
        return {"eventId": event_id, "eventType": "VEHICLE_ERROR", "data": data, "meta": _meta(event_type)}
    signals = [
        {
            "code": "tractionbattery-stateofcharge",
            "name": "StateOfCharge",
            "group": "TractionBattery",
            "body": {"value": 81, "unit": "percent"},
            "meta": {"oemUpdatedAt": now_ms - 5000, "retrievedAt": now_ms - 200},
            "status": {"value": "SUCCESS"},
        },
        {
            "code": "odometer-traveleddistance",
            "name": "TraveledDistance",
            "group": "Odometer",
            "body": {"value": 30512.7, "unit": "km"},
            "meta": {"oemUpdatedAt": now_ms - 5000, "retrievedAt": now_ms - 200},
            "status": {"value": "SUCCESS"},
        },
    ]
    return {
        "eventId": event_id,
        "eventType": event_type,
        "data": {"user": user, "vehicle": vehicle, "signals": signals},
        "triggers": [
            {
                "type": "SIGNAL_UPDATED",
                "signal": {
                    "code": "tractionbattery-stateofcharge",
                    "name": "StateOfCharge",
                    "group": "TractionBattery",
                },
            }
        ],
        "meta": _meta(event_type),
    }


def encode(document: Any) -> bytes:
    """Compact UTF-8 JSON bytes, the way Smartcar sends them."""
    return json.dumps(document, separators=(",", ":")).encode()
