"""Smartcar's values → ours: the wire schema → :class:`~core.events.model.VehicleEvent`, and the time,
year and status readers the worker's ``/signals`` resources share (never raising: unreadable is None)."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, cast

import pydantic_core

from core.errors import InvalidPayload
from core.events.model import DeliveryMeta, Signal, SignalRef, Trigger, Vehicle, VehicleError, VehicleEvent
from core.events.wire import (
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
    """The event of a validated VEHICLE_STATE / VEHICLE_ERROR; InvalidPayload if it names no vehicle."""
    vehicle = vehicle_id(wire)
    if vehicle is None:
        raise InvalidPayload("The delivery names no vehicle (data.vehicle.id or vehicleId).")
    data = wire["data"]
    wire_vehicle = data.get("vehicle") or {}
    triggers = data.get("triggers")
    meta = wire.get("meta") or {}
    # The wire's vehicle and meta hold the model's field names: only the id, year and time are read.
    return VehicleEvent(
        event_id=wire["eventId"],
        event_type="VEHICLE_STATE" if wire["eventType"] == VEHICLE_STATE else "VEHICLE_ERROR",
        smartcar_user_id=data["user"]["id"],
        vehicle=Vehicle.model_validate({**wire_vehicle, "id": vehicle, "year": model_year(wire_vehicle.get("year"))}),
        signals=tuple(signal for s in data.get("signals") or () if (signal := _signal(s)) is not None),
        errors=tuple(map(_vehicle_error, data.get("errors") or ())),
        triggers=tuple(map(_trigger, (wire.get("triggers") if triggers is None else triggers) or ())),
        meta=DeliveryMeta.model_validate({**meta, "deliveredAt": delivered_at(meta.get("deliveredAt"))}),
    )


def _signal_code(ref: WireSignalRef | str) -> str | None:
    """A signal's ``code``, else ``group-name``; the text ``"Group.Name"`` gives ``"group-name"``."""
    if isinstance(ref, str):
        return ref.strip().replace(".", "-").lower()
    code, group, name = ref.get("code"), ref.get("group"), ref.get("name")
    if code:
        return code
    return f"{group}-{name}".lower() if group and name else None


def _signal_ref(ref: WireSignalRef | str) -> SignalRef:
    group, _, name = ref.partition(".") if isinstance(ref, str) else (ref.get("group"), "", ref.get("name"))
    return SignalRef(code=_signal_code(ref) or "", name=name or None, group=group or None)


def signal_status(value: object, body: object) -> str:
    """A signal's status (webhook and ``/signals``): its own, else SUCCESS with a body, UNAVAILABLE without."""
    if isinstance(value, str) and value:
        return value
    return "SUCCESS" if body is not None else "UNAVAILABLE"


def _signal(wire: WireSignal[dict[str, Any]]) -> Signal | None:
    """A signal as the output carries it, or None when it has no usable code (left out of the event)."""
    code = _signal_code(wire)
    if code is None:
        return None
    meta = wire.get("meta") or {}
    status = wire.get("status") or {}
    body = wire.get("body")
    error = status.get("error")
    return cast(
        Signal,
        {
            "code": code,
            "name": wire.get("name"),
            "group": wire.get("group"),
            "body": _finite(body),
            "status": signal_status(status.get("value"), body),
            **({"error": _finite(error)} if error else {}),  # only when it has one
            "oemUpdatedAt": epoch_ms(meta.get("oemUpdatedAt")),
            "retrievedAt": retrieved_at(meta.get("retrievedAt"), meta.get("fetchedAt")),
        },
    )


def _trigger(wire: WireTrigger | str) -> Trigger:
    if isinstance(wire, str):
        # "Group.Name" names a signal; anything else (e.g. FIRST_DELIVERY) is the trigger type.
        return Trigger(type="SIGNAL_UPDATED", code=_signal_code(wire)) if "." in wire else Trigger(type=wire)
    kind, signal = wire.get("type"), wire.get("signal")
    if signal is not None:
        return Trigger(type=kind or "SIGNAL_UPDATED", code=_signal_code(signal))
    if wire.get("code") == "FIRST_DELIVERY":
        return Trigger(type="FIRST_DELIVERY")
    code = _signal_code(wire)
    return Trigger(type=kind or ("SIGNAL_UPDATED" if code else "UNKNOWN"), code=code)


def _vehicle_error(wire: WireVehicleError) -> VehicleError:
    resolution = (wire.get("resolution") or {}).get("type")
    signals = tuple(map(_signal_ref, wire.get("signals") or ()))
    return VehicleError.model_validate({**wire, "resolution": resolution, "signals": signals})


def _finite(value: Any) -> Any:
    """``value`` with each non-finite float (``1e400`` parses as infinity) as null; itself if none."""
    if _all_finite(value):
        return value
    return pydantic_core.from_json(pydantic_core.to_json(value, inf_nan_mode="null"))


def _all_finite(value: Any) -> bool:
    """Whether ``value`` holds no non-finite float, looked through without copying."""
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    if kind is not dict and kind is not list:
        return True
    for item in value.values() if kind is dict else value:
        kind = type(item)
        if (kind is float and not math.isfinite(item)) or ((kind is dict or kind is list) and not _all_finite(item)):
            return False
    return True


def epoch_ms(value: object) -> int | None:
    """Epoch milliseconds from epoch ms, epoch seconds or an ISO-8601 string; None if unreadable."""
    if type(value) is int and _SECONDS_CUTOFF <= value <= _MAX_EPOCH_MS:  # the usual case, at once
        return value
    if isinstance(value, str):
        text = value.strip()
        if not _EPOCH_DIGITS.fullmatch(text):
            return _iso_epoch_ms(text)
        value = int(text)
    if isinstance(value, int) and not isinstance(value, bool):
        number = value * 1000 if 0 < value < _SECONDS_CUTOFF else value
    elif isinstance(value, float) and math.isfinite(value):
        number = round(value * 1000) if 0 < value < _SECONDS_CUTOFF else int(value)
    else:
        return None
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
    if as_ms is None and isinstance(value, str) and len(value) <= _LONGEST_TIME_TEXT:
        return value
    return as_ms


def retrieved_at(retrieved: object, fetched: object) -> int | None:
    """A signal's read time (webhook, ``/signals``): ``retrievedAt`` unless null (0 counts), else ``fetchedAt``."""
    return epoch_ms(retrieved if retrieved is not None else fetched)


def model_year(value: object) -> int | None:
    """A model year from an int, a whole float or a digit string; None for anything else."""
    if isinstance(value, str) and _YEAR_DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 1 <= value <= 9999 else None
