"""Reading a delivery body, in one pass or step by step; both accept and refuse the same bodies.

* **One pass**, from the bytes: :func:`quick_vehicle_event` at the web edge (into plain dicts,
  :data:`~core.events.wire.EDGE_VALIDATOR`), :func:`parse_stored` in the worker (the wire model).
  Every well-formed vehicle event is read this way.
* **Step by step**, in the edge's order: :func:`load_json` (400 when it fails), :func:`classify`
  (event type, legacy or unknown), then :func:`parse_event` or :func:`parse_verify` (the schema).
  This tells a 400 from a parked payload and names the reason; a body the one pass does not accept
  goes through the steps, at the edge and in the worker, so every refusal carries their reason.

One difference no test can remove: a float where text belongs (a numeric make) is written by
pydantic-core as read from JSON (``1e5`` as ``"100000"``) or from a parsed document
(``"100000.0"``), so the worker always reads from bytes.
"""

from __future__ import annotations

import re
from typing import Any

import pydantic_core
from pydantic import ValidationError

from core.errors import InvalidPayload, LegacyPayload, MalformedBody, UnknownEventType
from core.events.model import QuickEvent, VehicleEvent
from core.events.normalise import clip, epoch_ms, normalise
from core.events.wire import (
    EDGE_VALIDATOR,
    VEHICLE_EVENT_TYPES,
    VERIFY,
    WireEnvelope,
    WireVerify,
    is_legacy,
)

_NOT_JSON = "The body is not valid UTF-8 JSON."
# Two literal searches: re's scan for a literal is about twice as fast as ``bytes in bytes``
# here, and one pattern with an alternative is ten times slower than both.
_NAN = re.compile(rb"NaN").search
_INFINITY = re.compile(rb"Infinity").search


# ---------------------------------------------------------------------------------------------
# One pass.


def _may_hold_non_finite_literal(body: bytes) -> bool:
    """True when ``body`` holds the bytes ``NaN`` or ``Infinity``, in a string or as a literal: the
    one-pass validators read such a literal as a number, load_json refuses it."""
    return _NAN(body) is not None or _INFINITY(body) is not None


def _one_pass(body: bytes) -> WireEnvelope | None:
    """The envelope of a well-formed VEHICLE_STATE / VEHICLE_ERROR, validated from bytes; else None."""
    if _may_hold_non_finite_literal(body):
        return None
    try:
        wire = WireEnvelope.model_validate_json(body)
    except ValidationError:
        return None
    legacy = is_legacy(wire.version, wire.eventName, wire.payload)
    if legacy or wire.eventType not in VEHICLE_EVENT_TYPES or wire.vehicle_id is None:
        return None
    return wire


def quick_vehicle_event(body: bytes) -> QuickEvent | None:
    """The edge's event of a well-formed VEHICLE_STATE / VEHICLE_ERROR, else None (the caller then
    takes the steps, which decide between 400 and parking)."""
    if _may_hold_non_finite_literal(body):
        return None
    try:
        envelope = EDGE_VALIDATOR.validate_json(body)
    except ValidationError:
        return None
    event_type = envelope["eventType"]
    if event_type not in VEHICLE_EVENT_TYPES:
        return None
    if is_legacy(envelope.get("version"), envelope.get("eventName"), envelope.get("payload")):
        return None
    # WireEnvelope.vehicle_id: data.vehicle.id, else the top-level vehicleId (both non-empty when given).
    vehicle = envelope["data"].get("vehicle")
    if not ((vehicle and vehicle.get("id")) or envelope.get("vehicleId")):
        return None
    meta = envelope.get("meta")
    if meta is None:
        return QuickEvent(envelope["eventId"], event_type, None, None)
    return QuickEvent(envelope["eventId"], event_type, meta.get("deliveryId"), epoch_ms(meta.get("deliveredAt")))


def parse_stored(body: bytes | str) -> VehicleEvent:
    """The worker's reading of a body as the edge stored it.

    Raises :class:`InvalidPayload`, :class:`LegacyPayload` or :class:`UnknownEventType` and nothing
    else, with the edge's reason, so a body that cannot be read is parked (and can be replayed)
    instead of failing its job.
    """
    try:
        raw = body.encode() if isinstance(body, str) else body
    except UnicodeEncodeError:
        # Text holding a lone surrogate has no UTF-8 form; no body the edge read can hold one.
        raise InvalidPayload(_NOT_JSON) from None
    try:
        wire = _one_pass(raw)
        if wire is None:
            _refuse_as_the_edge_does(raw)
            # The steps took it, so it holds the text NaN or Infinity but no such literal: the
            # one-pass validator reads it safely, as it reads every other event.
            wire = WireEnvelope.model_validate_json(raw)
        return normalise(wire)
    except (InvalidPayload, LegacyPayload, UnknownEventType):
        raise
    except Exception as exc:  # a parser gap is a permanent fault of this body: park it, never retry
        raise InvalidPayload(f"The payload could not be read ({type(exc).__name__}).") from None


def _refuse_as_the_edge_does(body: bytes) -> None:
    """Raise the reason the edge's steps refuse ``body`` for; return when they accept it."""
    try:
        document = load_json(body)
    except MalformedBody as exc:
        raise InvalidPayload(exc.message) from None
    if classify(document) == VERIFY:
        parse_verify(document)  # a VERIFY without a challenge: the edge's reason
        raise InvalidPayload("A VERIFY is answered by the web edge, never processed as an event.")
    parse_event(document)


# ---------------------------------------------------------------------------------------------
# Step by step, in the order the endpoint applies the steps.


def load_json(body: bytes) -> Any:
    """Parse a UTF-8 JSON body; raise :class:`MalformedBody` if it is not one. ``NaN`` and
    ``Infinity`` are refused: they are not JSON, and must never reach the output stream."""
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError:
        raise MalformedBody(_NOT_JSON) from None


def classify(document: Any) -> str:
    """The event type of a parsed delivery, or :class:`LegacyPayload`, :class:`UnknownEventType`,
    :class:`InvalidPayload` (no type at all)."""
    if not isinstance(document, dict):
        raise InvalidPayload("The body is JSON but not an object.")
    if is_legacy(document.get("version"), document.get("eventName"), document.get("payload")):
        raise LegacyPayload("This is a legacy v2.0 webhook; configure a v3 webhook in the Smartcar Dashboard.")
    event_type = document.get("eventType")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidPayload("The delivery has no eventType.")
    if event_type != VERIFY and event_type not in VEHICLE_EVENT_TYPES:
        raise UnknownEventType(f"The eventType {clip(event_type)!r} is not one this service handles.")
    return event_type


def parse_verify(document: Any) -> str:
    """Return the challenge of a VERIFY delivery; :class:`InvalidPayload` when it has none."""
    try:
        return WireVerify.model_validate(document).data.challenge
    except ValidationError as exc:
        raise InvalidPayload(_describe(exc)) from None


def parse_event(document: Any) -> VehicleEvent:
    """Validate and normalise a parsed VEHICLE_STATE or VEHICLE_ERROR document; :class:`InvalidPayload`
    names the failing fields, never their values."""
    try:
        wire = WireEnvelope.model_validate(document)
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


# ---------------------------------------------------------------------------------------------
# Lookups that never raise: what the edge and the logs need from a body that may not be an event.


def delivered_at_ms(document: Any) -> int | None:
    """``meta.deliveredAt`` of a parsed document as epoch ms, or None when absent or unreadable."""
    meta = document.get("meta") if isinstance(document, dict) else None
    return epoch_ms(meta.get("deliveredAt")) if isinstance(meta, dict) else None


def event_id_of(document: Any) -> str | None:
    """The ``eventId`` of a parsed document when it has a usable one, else None."""
    if isinstance(document, dict):
        value = document.get("eventId")
        if isinstance(value, str) and 0 < len(value) <= 255:
            return value
    return None


def delivery_id_of(body: bytes | str) -> str | None:
    """``meta.deliveryId`` of a body (at most 64 characters), for the logs; None when it has none."""
    try:
        document = load_json(body.encode() if isinstance(body, str) else body)
    except (MalformedBody, UnicodeEncodeError):
        return None
    meta = document.get("meta") if isinstance(document, dict) else None
    delivery_id = meta.get("deliveryId") if isinstance(meta, dict) else None
    return delivery_id[:64] if isinstance(delivery_id, str) else None


def verify_challenge_or_none(document: Any) -> str | None:
    """The challenge of a document that claims to be a VERIFY, without raising."""
    if isinstance(document, dict) and document.get("eventType") == VERIFY:
        data = document.get("data")
        if isinstance(data, dict) and isinstance(data.get("challenge"), str):
            return str(data["challenge"])
    return None
