"""Smartcar's values → ours: the wire schema → :class:`~core.events.model.VehicleEvent` (every
shape :mod:`core.events.wire` tolerates, in one form), and the time, year and status readers the
worker's ``/signals`` resources share. The readers never raise: anything unreadable is None, so a
hostile value neither crashes the worker nor reaches the output as invalid JSON.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from core.errors import InvalidPayload
from core.events.model import (
    DeliveryMeta,
    Signal,
    SignalRef,
    Trigger,
    Vehicle,
    VehicleError,
    VehicleEvent,
)
from core.events.wire import (
    VEHICLE_EVENT_TYPES,
    VEHICLE_STATE,
    Envelope,
    WireSignal,
    WireSignalRef,
    WireTrigger,
    WireVehicleError,
    vehicle_id,
)

# Epoch values below this are taken as seconds (10 digits), above it as milliseconds (13 digits).
_SECONDS_CUTOFF = 100_000_000_000
# 9999-12-31T23:59:59.999Z: later (or negative) times are unreadable, not errors.
_MAX_EPOCH_MS = 253_402_300_799_999
# ASCII digits only: str.isdigit() also admits "²" and other digits that int() refuses.
_EPOCH_DIGITS = re.compile(r"[0-9]{1,19}")
_YEAR_DIGITS = re.compile(r"[0-9]{1,4}")
_LONGEST_TIME_TEXT = 64


def normalise(wire: Envelope) -> VehicleEvent:
    """The event of a validated envelope; :class:`InvalidPayload` for the two rules the schema
    cannot state (a vehicle event type, a vehicle id)."""
    if wire["eventType"] not in VEHICLE_EVENT_TYPES:
        raise InvalidPayload(f"The eventType {clip(wire['eventType'])!r} is not a vehicle event.")
    vehicle = vehicle_id(wire)
    if vehicle is None:
        raise InvalidPayload("The delivery names no vehicle (data.vehicle.id or vehicleId).")
    data = wire["data"]
    wire_vehicle = data.get("vehicle") or {}
    triggers = data.get("triggers")
    if triggers is None:
        triggers = wire.get("triggers")
    meta = wire.get("meta") or {}
    return VehicleEvent(
        event_id=wire["eventId"],
        event_type="VEHICLE_STATE" if wire["eventType"] == VEHICLE_STATE else "VEHICLE_ERROR",
        smartcar_user_id=data["user"]["id"],
        vehicle=Vehicle(
            id=vehicle,
            make=wire_vehicle.get("make"),
            model=wire_vehicle.get("model"),
            year=model_year(wire_vehicle.get("year")),
            mode=wire_vehicle.get("mode"),
            powertrainType=wire_vehicle.get("powertrainType"),
        ),
        signals=tuple(_signal(s) for s in data.get("signals") or () if _signal_code(s) is not None),
        errors=tuple(_vehicle_error(e) for e in data.get("errors") or ()),
        triggers=tuple(_trigger(t) for t in triggers or ()),
        meta=DeliveryMeta(
            deliveryId=meta.get("deliveryId"),
            deliveredAt=delivered_at(meta.get("deliveredAt")),
            webhookId=meta.get("webhookId"),
            webhookName=meta.get("webhookName"),
            mode=meta.get("mode"),
            version=meta.get("version"),
        ),
    )


def code_from_dotted(name: str) -> str:
    """``"TractionBattery.StateOfCharge"`` → ``"tractionbattery-stateofcharge"``."""
    return name.strip().replace(".", "-").lower()


def clip(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, for quoting a sender's value in a reason."""
    return text if len(text) <= limit else text[:limit] + "…"


def _signal_code(ref: WireSignalRef) -> str | None:
    code, group, name = ref.get("code"), ref.get("group"), ref.get("name")
    if code:
        return code
    if group and name:
        return f"{group}-{name}".lower()
    return None


def _signal_ref(ref: WireSignalRef | str) -> SignalRef:
    if isinstance(ref, str):
        group, _, name = ref.partition(".")
        return SignalRef(code=code_from_dotted(ref), name=name or None, group=group or None)
    return SignalRef(code=_signal_code(ref) or "", name=ref.get("name"), group=ref.get("group"))


def signal_status(value: object, body: object) -> str:
    """A signal's status (webhook and ``/signals`` alike): the one it carries, else (older
    deliveries) SUCCESS when it has a body and UNAVAILABLE when not."""
    if isinstance(value, str) and value:
        return value
    return "SUCCESS" if body is not None else "UNAVAILABLE"


def _signal(wire: WireSignal) -> Signal:
    meta = wire.get("meta") or {}
    status = wire.get("status") or {}
    body = wire.get("body")
    # Built without validating again: every value is of its field's type already (the wire
    # schema's own types, and time readers that return an int or None).
    return Signal.model_construct(
        code=_signal_code(wire) or "",
        name=wire.get("name"),
        group=wire.get("group"),
        body=_finite(body),
        status=signal_status(status.get("value"), body),
        error=_finite(status.get("error")),
        oemUpdatedAt=epoch_ms(meta.get("oemUpdatedAt")),
        retrievedAt=retrieved_at(meta.get("retrievedAt"), meta.get("fetchedAt")),
    )


def _trigger(wire: WireTrigger | str) -> Trigger:
    if isinstance(wire, str):
        # "Group.Name" names a signal; anything else (e.g. FIRST_DELIVERY) is the trigger type.
        if "." in wire:
            return Trigger(type="SIGNAL_UPDATED", code=code_from_dotted(wire))
        return Trigger(type=wire)
    kind, signal = wire.get("type"), wire.get("signal")
    if signal is not None:
        code = code_from_dotted(signal) if isinstance(signal, str) else _signal_code(signal)
        return Trigger(type=kind or "SIGNAL_UPDATED", code=code)
    if wire.get("code") == "FIRST_DELIVERY":
        return Trigger(type="FIRST_DELIVERY")
    code = _signal_code(wire)
    return Trigger(type=kind or ("SIGNAL_UPDATED" if code else "UNKNOWN"), code=code)


def _vehicle_error(wire: WireVehicleError) -> VehicleError:
    return VehicleError(
        type=wire.get("type"),
        code=wire.get("code"),
        state=wire.get("state"),
        description=wire.get("description"),
        suggestedUserMessage=wire.get("suggestedUserMessage"),
        docURL=wire.get("docURL"),
        resolution=(wire.get("resolution") or {}).get("type"),
        signals=tuple(_signal_ref(s) for s in wire.get("signals") or ()),
    )


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (``1e400`` parses as infinity) replaced by None.

    Looking is cheaper than rebuilding and nearly no body holds one, so only those are rebuilt. The
    parser refuses nesting deeper than about 200 levels, which bounds the recursion.
    """
    return value if _all_finite(value) else _without_non_finite(value)


def _all_finite(value: Any) -> bool:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:  # the common leaves, first
        return True
    if isinstance(value, dict):
        return all(map(_all_finite, value.values()))
    if isinstance(value, list):
        return all(map(_all_finite, value))
    return not isinstance(value, float) or math.isfinite(value)


def _without_non_finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _without_non_finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_non_finite(item) for item in value]
    return value


def epoch_ms(value: object) -> int | None:
    """Epoch milliseconds from epoch ms, epoch seconds or an ISO-8601 string; None if unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        number = round(value * 1000) if 0 < value < _SECONDS_CUTOFF else int(value)
        return number if 0 <= number <= _MAX_EPOCH_MS else None
    elif isinstance(value, str):
        text = value.strip()
        if _EPOCH_DIGITS.fullmatch(text):
            number = int(text)
        else:
            return _iso_epoch_ms(text)
    else:
        return None
    if 0 < number < _SECONDS_CUTOFF:
        number *= 1000
    return number if 0 <= number <= _MAX_EPOCH_MS else None


def _iso_epoch_ms(text: str) -> int | None:
    if len(text) > _LONGEST_TIME_TEXT:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            return None
        number = int(parsed.timestamp() * 1000)
    except (ValueError, OverflowError):
        return None
    return number if 0 <= number <= _MAX_EPOCH_MS else None


def delivered_at(value: object) -> int | str | None:
    """``meta.deliveredAt`` as epoch ms; an unreadable short text is kept as sent; else None."""
    as_ms = epoch_ms(value)
    if as_ms is not None:
        return as_ms
    return value if isinstance(value, str) and len(value) <= _LONGEST_TIME_TEXT else None


def retrieved_at(retrieved: object, fetched: object) -> int | None:
    """When a signal was read (webhook and ``/signals`` alike): ``retrievedAt`` unless it is null,
    else ``fetchedAt``; a ``0``, ``""`` or ``false`` is the value sent, never skipped."""
    return epoch_ms(retrieved if retrieved is not None else fetched)


def model_year(value: object) -> int | None:
    """A model year from an int, a whole float or a digit string; None for anything else."""
    year: int
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        year = value
    elif isinstance(value, float) and value.is_integer():
        year = int(value)
    elif isinstance(value, str) and _YEAR_DIGITS.fullmatch(value.strip()):
        year = int(value.strip())
    else:
        return None
    return year if 1 <= year <= 9999 else None
