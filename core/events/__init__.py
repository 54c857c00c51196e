"""Smartcar webhook payloads: tolerant wire models and one normalised internal form.

The package, one concept per module:

* :mod:`core.events.wire`: what Smartcar sends, read tolerantly (both VEHICLE_STATE shapes,
  either time field, missing parts), with ids held to strict strings;
* :mod:`core.events.model`: :class:`VehicleEvent`, the only form the rest of the code sees, and
  :class:`QuickEvent`, what the web edge needs to accept a delivery;
* :mod:`core.events.normalise`: wire → :class:`VehicleEvent`;
* :mod:`core.events.parse`: a body → the wire models, in one pass (the edge's well-formed
  deliveries, every body in the worker) or step by step (the edge's 400-or-park decision).

The web edge and the worker read one body the same way: ids are JSON strings only (a number is a
schema failure, never coerced into a different string), ``NaN`` and ``Infinity`` are not JSON, and
the time and year readers return None rather than raise, whatever they are given.
"""

from __future__ import annotations

from core.events.model import (
    DeliveryMeta,
    EventType,
    QuickEvent,
    Signal,
    SignalRef,
    Trigger,
    Vehicle,
    VehicleError,
    VehicleEvent,
)
from core.events.normalise import code_from_dotted, signal_status
from core.events.parse import (
    classify,
    delivered_at_ms,
    delivery_id_of,
    event_id_of,
    load_json,
    parse_event,
    parse_stored,
    parse_verify,
    parses_as_json,
    quick_vehicle_event,
    verify_challenge_or_none,
)
from core.events.wire import (
    VEHICLE_ERROR,
    VEHICLE_EVENT_TYPES,
    VEHICLE_ID_PATTERN,
    VEHICLE_STATE,
    VERIFY,
    SmartcarId,
    VehicleId,
)

__all__ = [
    "VEHICLE_ERROR",
    "VEHICLE_EVENT_TYPES",
    "VEHICLE_ID_PATTERN",
    "VEHICLE_STATE",
    "VERIFY",
    "DeliveryMeta",
    "EventType",
    "QuickEvent",
    "Signal",
    "SignalRef",
    "SmartcarId",
    "Trigger",
    "Vehicle",
    "VehicleError",
    "VehicleEvent",
    "VehicleId",
    "classify",
    "code_from_dotted",
    "delivered_at_ms",
    "delivery_id_of",
    "event_id_of",
    "load_json",
    "parse_event",
    "parse_stored",
    "parse_verify",
    "parses_as_json",
    "quick_vehicle_event",
    "signal_status",
    "verify_challenge_or_none",
]
