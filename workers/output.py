"""The enriched event published on ``OUTPUT_STREAM`` (schema version 2, docs/consumers.md): the
webhook, the internal user and what the v3 API answered."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from core.events.model import VehicleEvent
from core.events.normalise import epoch_ms, retrieved_at, signal_status
from core.jsontext import dumps
from core.store.users import UserRecord

#: 2: ``enrichment.reads`` (where each read came from) and ``staleSignals``.
SCHEMA_VERSION = 2


@dataclass
class Enrichment:
    """What the reads produced; ``reads``: call → ``{"source", "fetchedAt", "reason"}``."""

    vehicle: dict[str, Any] | None = None
    signals: list[dict[str, Any]] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    reads: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        skipped = any(read.get("source") == "skipped" for read in self.reads.values())
        return "partial" if self.errors or skipped else "complete"


def iso_ms(epoch_milliseconds: int) -> str:
    """``2026-11-28T17:00:00.123Z`` for an epoch in milliseconds."""
    moment = datetime.fromtimestamp(epoch_milliseconds / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_milliseconds % 1000:03d}Z"


def api_signal(resource: dict[str, Any]) -> dict[str, Any]:
    """A ``/signals`` resource (JSON:API form) in the same shape as a webhook signal."""
    attributes = _dict(resource.get("attributes"))
    meta = _dict(resource.get("meta"))
    status = _dict(attributes.get("status"))
    out: dict[str, Any] = {
        "code": attributes.get("code") or resource.get("id"),
        "name": attributes.get("name"),
        "group": attributes.get("group"),
        "body": attributes.get("body"),
        "status": signal_status(status.get("value"), attributes.get("body")),
    }
    if status.get("error"):
        out["error"] = status["error"]
    out["oemUpdatedAt"] = epoch_ms(meta.get("oemUpdatedAt"))
    out["retrievedAt"] = retrieved_at(meta.get("retrievedAt"), meta.get("fetchedAt"))
    return out


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _vehicle(event: VehicleEvent, resource: dict[str, Any] | None) -> dict[str, Any]:
    webhook = event.vehicle
    attributes = resource.get("attributes") if resource and isinstance(resource.get("attributes"), dict) else None
    if attributes is None:
        return webhook.model_dump(exclude_none=True)
    vehicle = {
        "id": str(resource.get("id") or webhook.id) if resource else webhook.id,
        "make": attributes.get("make", webhook.make),
        "model": attributes.get("model", webhook.model),
        "year": attributes.get("year", webhook.year),
    }
    for extra in ("mode", "powertrainType"):
        if attributes.get(extra) is not None:
            vehicle[extra] = attributes[extra]
    return vehicle


def build_document(
    event: VehicleEvent, user: UserRecord, enrichment: Enrichment, received_at_ms: int, published_at_ms: int
) -> dict[str, Any]:
    """The ``payload`` document of an output stream entry."""
    return {
        "schemaVersion": SCHEMA_VERSION,
        "eventId": event.event_id,
        "eventType": event.event_type,
        "receivedAt": iso_ms(received_at_ms),
        "publishedAt": iso_ms(published_at_ms),
        "user": {"id": user.id, "smartcarUserId": event.smartcar_user_id},
        "vehicle": _vehicle(event, enrichment.vehicle),
        "signals": list(event.signals),
        "latestSignals": [api_signal(r) for r in enrichment.signals or ()],
        "errors": [e.model_dump(mode="json") for e in event.errors],
        "triggers": [t.model_dump(exclude_none=True) for t in event.triggers],
        "enrichment": {"status": enrichment.status, "errors": enrichment.errors, "reads": enrichment.reads},
        "meta": {
            "deliveryId": event.meta.deliveryId,
            "deliveredAt": event.meta.deliveredAt,
            "webhookId": event.meta.webhookId,
            "mode": event.meta.mode,
        },
        "staleSignals": [],  # filled in as the document is merged into the vehicle's state
    }


def stream_fields(event: VehicleEvent, user: UserRecord, document: dict[str, Any]) -> dict[str, str]:
    """The contract's stream entry fields; ``payload`` is compact JSON (a NaN or infinity: ``null``)."""
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "user_id": str(user.id),
        "vehicle_id": event.vehicle.id,
        "payload": dumps(document).decode(),
    }
