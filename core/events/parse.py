"""A delivery body → the event: in one pass from the bytes, else in the edge's two steps, which tell a
400 from a parked payload (docs/architecture.md, "Reading a delivery")."""

from __future__ import annotations

import re
from typing import Any

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from core.errors import InvalidPayload, MalformedBody
from core.events.model import QuickEvent, VehicleEvent
from core.events.normalise import epoch_ms, normalise
from core.events.wire import (
    EDGE_VALIDATOR,
    VEHICLE_EVENT_TYPES,
    VERIFY,
    WIRE_VALIDATOR,
    WireEnvelope,
    is_legacy,
    vehicle_id,
)

_NOT_JSON = "The body is not valid UTF-8 JSON."
# Two literal searches: faster here than ``bytes in bytes``, or one pattern with an alternative.
_NAN = re.compile(rb"NaN").search
_INFINITY = re.compile(rb"Infinity").search


def _one_pass(body: bytes, validator: TypeAdapter[WireEnvelope[Any]]) -> WireEnvelope[Any] | None:
    """The envelope of a well-formed vehicle event without the bytes NaN or Infinity; else None (the steps)."""
    if _NAN(body) is not None or _INFINITY(body) is not None:
        return None
    try:
        envelope = validator.validate_json(body)
    except ValidationError:
        return None
    if envelope["eventType"] not in VEHICLE_EVENT_TYPES or is_legacy(envelope) or vehicle_id(envelope) is None:
        return None
    return envelope


def quick_vehicle_event(body: bytes) -> QuickEvent | None:
    """What the edge needs of a well-formed VEHICLE_STATE / VEHICLE_ERROR, else None."""
    envelope = _one_pass(body, EDGE_VALIDATOR)
    if envelope is None:
        return None
    meta = envelope.get("meta") or {}
    return QuickEvent(
        envelope["eventId"], envelope["eventType"], meta.get("deliveryId"), epoch_ms(meta.get("deliveredAt"))
    )


def parse_stored(body: bytes | str) -> VehicleEvent:
    """The worker's reading of a stored body. Raises only InvalidPayload, with the edge's reason (parked)."""
    try:
        raw = body.encode() if isinstance(body, str) else body
        wire = _one_pass(raw, WIRE_VALIDATOR)
        if wire is None:
            if isinstance(parse_document(load_json(raw)), str):
                raise InvalidPayload("A VERIFY is answered by the web edge, never processed as an event.")
            # The steps took it: it holds the text NaN or Infinity, but no such literal.
            wire = WIRE_VALIDATOR.validate_json(raw)
        return normalise(wire)
    except (MalformedBody, UnicodeEncodeError):  # a text with a lone surrogate has no UTF-8 form
        raise InvalidPayload(_NOT_JSON) from None
    except InvalidPayload:
        raise
    except Exception as exc:  # a parser gap is a permanent fault of this body: park it, never retry
        raise InvalidPayload(f"The payload could not be read ({type(exc).__name__}).") from None


def load_json(body: bytes) -> Any:
    """A UTF-8 JSON body, else MalformedBody; ``NaN`` and ``Infinity`` are not JSON (nor in the output)."""
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError:
        raise MalformedBody(_NOT_JSON) from None


def parse_document(document: Any) -> VehicleEvent | str:
    """The event of a parsed delivery, or a VERIFY's challenge; InvalidPayload names failing fields, not values."""
    if not isinstance(document, dict):
        raise InvalidPayload("The body is JSON but not an object.")
    if is_legacy(document):
        raise InvalidPayload(
            "This is a legacy v2.0 webhook; configure a v3 webhook in the Smartcar Dashboard.", "legacy_v2"
        )
    event_type = document.get("eventType")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidPayload("The delivery has no eventType.")
    if event_type != VERIFY and event_type not in VEHICLE_EVENT_TYPES:
        shown = event_type if len(event_type) <= 60 else event_type[:60] + "…"
        raise InvalidPayload(f"The eventType {shown!r} is not one this service handles.", "unknown_event_type")
    if event_type == VERIFY:
        if not (challenge := verify_challenge_or_none(document)):
            raise InvalidPayload("The VERIFY carries no data.challenge text.")
        return challenge
    try:
        wire = WIRE_VALIDATOR.validate_python(document)
    except ValidationError as exc:
        raise InvalidPayload(_describe(exc)) from None
    return normalise(wire)


def _describe(exc: ValidationError) -> str:
    """One sentence naming the first few failing fields, without echoing their values."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:3]:
        location = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{location}: {error['msg'].rstrip('.')}")
    more = "" if exc.error_count() <= 3 else f" (and {exc.error_count() - 3} more)"
    return "The payload does not match the event schema: " + "; ".join(parts) + more + "."


# Lookups that never raise: what the edge and the logs need from a body that may not be an event.


def _inner(document: Any, outer: str, key: str) -> Any:
    inner = document.get(outer) if isinstance(document, dict) else None
    return inner.get(key) if isinstance(inner, dict) else None


def delivered_at_ms(document: Any) -> int | None:
    return epoch_ms(_inner(document, "meta", "deliveredAt"))


def event_id_of(document: Any) -> str | None:
    value = document.get("eventId") if isinstance(document, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= 255 else None


def delivery_id_of(body: bytes | str) -> str | None:
    """``meta.deliveryId`` of a body (at most 64 characters), for the logs; None when it has none."""
    try:
        document = load_json(body.encode() if isinstance(body, str) else body)
    except (MalformedBody, UnicodeEncodeError):
        return None
    delivery_id = _inner(document, "meta", "deliveryId")
    return delivery_id[:64] if isinstance(delivery_id, str) else None


def verify_challenge_or_none(document: Any) -> str | None:
    """A VERIFY's challenge if a JSON string (a number is no challenge: ``1e400`` is not the text "inf")."""
    challenge = _inner(document, "data", "challenge")
    return challenge if isinstance(challenge, str) and document.get("eventType") == VERIFY else None
