"""Smartcar webhook payloads: tolerant wire models and one normalised internal form.

Smartcar's documentation and its real deliveries disagree on the VEHICLE_STATE shape (see
``docs/payloads.md``): triggers sit in ``data.triggers`` as ``{code, name, group}`` or at the
top level as ``{type, signal}`` where ``signal`` is an object or a ``"Group.Name"`` string;
signal times come as ``retrievedAt`` or ``fetchedAt``; ``meta``, ``triggers`` and per-signal
``status`` may be missing. The wire models accept all of these and ignore unknown fields;
:func:`parse_event` folds them into :class:`VehicleEvent`, the only form the rest of the code sees.

Parsing is split the way the web endpoint checks a delivery: :func:`load_json` (400 when it
fails), :func:`classify` (event type, legacy or unknown), then :func:`parse_event` or
:func:`parse_verify` (the schema).

The web edge and the worker read one body the same way: ids are JSON strings only (a number is a
schema failure, never coerced into a different string), ``NaN`` and ``Infinity`` are not JSON, and
the time and year readers return None rather than raise, whatever they are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints, ValidationError

from core.errors import InvalidPayload, LegacyPayload, MalformedBody, UnknownEventType
from core.timestamps import delivered_at, epoch_ms, model_year

VERIFY = "VERIFY"
VEHICLE_STATE = "VEHICLE_STATE"
VEHICLE_ERROR = "VEHICLE_ERROR"
VEHICLE_EVENT_TYPES = frozenset({VEHICLE_STATE, VEHICLE_ERROR})
EventType = Literal["VEHICLE_STATE", "VEHICLE_ERROR"]


#: A Smartcar id that is not free text: a JSON string, never a number coerced into one.
SmartcarId = Annotated[StrictStr, Field(min_length=1, max_length=255)]
#: Smartcar vehicle ids are UUIDs. The id becomes a URL path segment (``/vehicles/{id}``), so
#: nothing that could move the path (``.``, ``..``, ``/``, ``%``) is ever accepted.
VEHICLE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
VehicleId = Annotated[StrictStr, StringConstraints(pattern=VEHICLE_ID_PATTERN)]


class _Wire(BaseModel):
    """Base of the wire models: unknown fields ignored.

    Descriptive text (make, model, signal names) accepts numbers, which is harmless; every id is
    a strict string (:data:`SmartcarId`, :data:`VehicleId`), so a numeric id is a schema failure
    at the edge and in the worker alike. Times and the model year are read by
    :mod:`core.timestamps`, which turn anything unreadable into None, so they are typed ``Any`` here.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)


class _WireSignalRef(_Wire):
    code: str | None = None
    name: str | None = None
    group: str | None = None


class _WireStatus(_Wire):
    value: str | None = None
    error: dict[str, Any] | None = None


class _WireSignalMeta(_Wire):
    oemUpdatedAt: Any = None
    retrievedAt: Any = None
    fetchedAt: Any = None


class _WireSignal(_WireSignalRef):
    body: Any = None
    meta: _WireSignalMeta | None = None
    status: _WireStatus | None = None


class _WireTrigger(_Wire):
    type: str | None = None
    code: str | None = None
    name: str | None = None
    group: str | None = None
    signal: _WireSignalRef | str | None = None


class _WireVehicle(_Wire):
    id: VehicleId | None = None
    make: str | None = None
    model: str | None = None
    year: Any = None
    mode: str | None = None
    powertrainType: str | None = None


class _WireUser(_Wire):
    id: SmartcarId


class _WireResolution(_Wire):
    type: str | None = None


class _WireVehicleError(_Wire):
    type: str | None = None
    code: str | None = None
    state: str | None = None
    description: str | None = None
    suggestedUserMessage: str | None = None
    docURL: str | None = None
    resolution: _WireResolution | None = None
    signals: list[_WireSignalRef | str] | None = None


class _WireData(_Wire):
    user: _WireUser
    vehicle: _WireVehicle | None = None
    signals: list[_WireSignal] | None = None
    triggers: list[_WireTrigger | str] | None = None
    errors: list[_WireVehicleError] | None = None


class _WireMeta(_Wire):
    version: str | None = None
    deliveryId: StrictStr | None = None
    deliveredAt: Any = None
    webhookId: StrictStr | None = None
    webhookName: str | None = None
    mode: str | None = None


class _WireEnvelope(_Wire):
    eventId: SmartcarId
    eventType: StrictStr
    vehicleId: VehicleId | None = None
    data: _WireData
    triggers: list[_WireTrigger | str] | None = None
    meta: _WireMeta | None = None


class _WebEnvelope(_WireEnvelope):
    """The envelope plus the top-level keys that mark a legacy v2.0 webhook."""

    version: Any = None
    eventName: Any = None
    payload: Any = None


class _WireVerifyData(_Wire):
    challenge: str = Field(min_length=1)


class _WireVerify(_Wire):
    data: _WireVerifyData


# ---------------------------------------------------------------------------------------------
# The normalised form.


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Vehicle(_Model):
    id: str
    make: str | None = None
    model: str | None = None
    year: int | None = None
    mode: str | None = None
    powertrainType: str | None = None


class Signal(_Model):
    """One signal as delivered: ``status`` is SUCCESS, ERROR or UNAVAILABLE; times in epoch ms."""

    code: str
    name: str | None = None
    group: str | None = None
    body: Any = None
    status: str
    error: dict[str, Any] | None = None
    oemUpdatedAt: int | None = None
    retrievedAt: int | None = None


class SignalRef(_Model):
    code: str
    name: str | None = None
    group: str | None = None


class Trigger(_Model):
    type: str
    code: str | None = None


class VehicleError(_Model):
    type: str | None = None
    code: str | None = None
    state: str | None = None
    description: str | None = None
    suggestedUserMessage: str | None = None
    docURL: str | None = None
    resolution: str | None = None
    signals: tuple[SignalRef, ...] = ()


class DeliveryMeta(_Model):
    deliveryId: str | None = None
    deliveredAt: int | str | None = None
    webhookId: str | None = None
    webhookName: str | None = None
    mode: str | None = None
    version: str | None = None


class VehicleEvent(_Model):
    """A VEHICLE_STATE or VEHICLE_ERROR delivery in the one form the service works with."""

    event_id: str
    event_type: EventType
    smartcar_user_id: str
    vehicle: Vehicle
    signals: tuple[Signal, ...] = ()
    errors: tuple[VehicleError, ...] = ()
    triggers: tuple[Trigger, ...] = ()
    meta: DeliveryMeta = DeliveryMeta()


# ---------------------------------------------------------------------------------------------
# Parsing steps, in the order the endpoint applies them.


@dataclass(frozen=True, slots=True)
class QuickEvent:
    """What the web edge needs to know of a valid vehicle event."""

    event_id: str
    event_type: str
    delivery_id: str | None
    delivered_at_ms: int | None = None


def quick_vehicle_event(body: bytes) -> QuickEvent | None:
    """Validate a well-formed VEHICLE_STATE / VEHICLE_ERROR straight from bytes, in one pass.

    Returns None for anything else (not JSON, VERIFY, legacy, unknown type, schema failure):
    the caller then takes the step-by-step path, which decides between 400 and parking. What
    this accepts is exactly what :func:`load_json`, :func:`classify` and :func:`parse_event`
    accept.
    """
    # The one-pass validator reads NaN and Infinity literals as numbers; load_json refuses them. A
    # body holding those bytes (in a string, far more often) takes the step-by-step path instead.
    if b"NaN" in body or b"Infinity" in body:
        return None
    try:
        wire = _WebEnvelope.model_validate_json(body)
    except ValidationError:
        return None
    if wire.version is not None or (wire.eventName is not None and wire.payload is not None):
        return None
    if wire.eventType not in VEHICLE_EVENT_TYPES:
        return None
    if not ((wire.data.vehicle and wire.data.vehicle.id) or wire.vehicleId):
        return None
    meta = wire.meta
    return QuickEvent(
        wire.eventId,
        wire.eventType,
        meta.deliveryId if meta else None,
        epoch_ms(meta.deliveredAt) if meta else None,
    )


def load_json(body: bytes) -> Any:
    """Parse a UTF-8 JSON body; raise :class:`MalformedBody` if it is not one.

    ``NaN``, ``Infinity`` and ``-Infinity`` are refused: they are not JSON, and a non-finite
    number must never reach the output stream.
    """
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError:
        raise MalformedBody("The body is not valid UTF-8 JSON.") from None


def parses_as_json(text: str) -> bool:
    """True when ``text`` is a JSON value of any kind (``123``, ``true``, ``null``, ``NaN`` too).

    The parser is the one :func:`load_json` uses, in its more permissive setting, so anything
    the edge could ever read as a body counts.
    """
    try:
        pydantic_core.from_json(text)
    except ValueError:
        return False
    return True


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


def classify(document: Any) -> str:
    """Return the event type of a parsed delivery.

    Raises :class:`LegacyPayload` for a v2.0 webhook, :class:`UnknownEventType` for a type this
    service does not handle and :class:`InvalidPayload` when there is no type at all.
    """
    if not isinstance(document, dict):
        raise InvalidPayload("The body is JSON but not an object.")
    # v2.0 webhooks carry a top-level version (and eventName/payload) instead of meta.version.
    if document.get("version") is not None or (
        document.get("eventName") is not None and document.get("payload") is not None
    ):
        raise LegacyPayload("This is a legacy v2.0 webhook; configure a v3 webhook in the Smartcar Dashboard.")
    event_type = document.get("eventType")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidPayload("The delivery has no eventType.")
    if event_type != VERIFY and event_type not in VEHICLE_EVENT_TYPES:
        raise UnknownEventType(f"The eventType {_clip(event_type)!r} is not one this service handles.")
    return event_type


def parse_verify(document: Any) -> str:
    """Return the challenge of a VERIFY delivery; :class:`InvalidPayload` when it has none."""
    try:
        return _WireVerify.model_validate(document).data.challenge
    except ValidationError as exc:
        raise InvalidPayload(_describe(exc)) from None


def verify_challenge_or_none(document: Any) -> str | None:
    """The challenge of a document that claims to be a VERIFY, without raising."""
    if isinstance(document, dict) and document.get("eventType") == VERIFY:
        data = document.get("data")
        if isinstance(data, dict) and isinstance(data.get("challenge"), str):
            return str(data["challenge"])
    return None


def parse_event(document: Any) -> VehicleEvent:
    """Validate a VEHICLE_STATE or VEHICLE_ERROR document and normalise it.

    Raises :class:`InvalidPayload` with a one-sentence reason (field paths only, never values).
    """
    try:
        wire = _WireEnvelope.model_validate(document)
    except ValidationError as exc:
        raise InvalidPayload(_describe(exc)) from None
    if wire.eventType not in VEHICLE_EVENT_TYPES:
        raise InvalidPayload(f"The eventType {_clip(wire.eventType)!r} is not a vehicle event.")
    data = wire.data
    vehicle_id = (data.vehicle.id if data.vehicle else None) or wire.vehicleId
    if not vehicle_id:
        raise InvalidPayload("The delivery names no vehicle (data.vehicle.id or vehicleId).")
    wire_vehicle = data.vehicle or _WireVehicle()
    triggers = data.triggers if data.triggers is not None else wire.triggers
    meta = wire.meta or _WireMeta()
    return VehicleEvent(
        event_id=wire.eventId,
        event_type=VEHICLE_STATE if wire.eventType == VEHICLE_STATE else VEHICLE_ERROR,
        smartcar_user_id=data.user.id,
        vehicle=Vehicle(
            id=vehicle_id,
            make=wire_vehicle.make,
            model=wire_vehicle.model,
            year=model_year(wire_vehicle.year),
            mode=wire_vehicle.mode,
            powertrainType=wire_vehicle.powertrainType,
        ),
        signals=tuple(_signal(s) for s in data.signals or () if _signal_code(s) is not None),
        errors=tuple(_vehicle_error(e) for e in data.errors or ()),
        triggers=tuple(_trigger(t) for t in triggers or ()),
        meta=DeliveryMeta(
            deliveryId=meta.deliveryId,
            deliveredAt=delivered_at(meta.deliveredAt),
            webhookId=meta.webhookId,
            webhookName=meta.webhookName,
            mode=meta.mode,
            version=meta.version,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Normalisation helpers.


def code_from_dotted(name: str) -> str:
    """``"TractionBattery.StateOfCharge"`` → ``"tractionbattery-stateofcharge"``."""
    return name.strip().replace(".", "-").lower()


def _signal_code(ref: _WireSignalRef) -> str | None:
    if ref.code:
        return ref.code
    if ref.group and ref.name:
        return f"{ref.group}-{ref.name}".lower()
    return None


def _signal_ref(ref: _WireSignalRef | str) -> SignalRef:
    if isinstance(ref, str):
        group, _, name = ref.partition(".")
        return SignalRef(code=code_from_dotted(ref), name=name or None, group=group or None)
    return SignalRef(code=_signal_code(ref) or "", name=ref.name, group=ref.group)


def _signal(wire: _WireSignal) -> Signal:
    meta = wire.meta or _WireSignalMeta()
    status = wire.status.value if wire.status and wire.status.value else None
    if status is None:
        # Older deliveries omit status; a signal with a body was read successfully.
        status = "SUCCESS" if wire.body is not None else "UNAVAILABLE"
    return Signal(
        code=_signal_code(wire) or "",
        name=wire.name,
        group=wire.group,
        body=_finite(wire.body),
        status=status,
        error=_finite(wire.status.error) if wire.status else None,
        oemUpdatedAt=epoch_ms(meta.oemUpdatedAt),
        retrievedAt=epoch_ms(meta.retrievedAt if meta.retrievedAt is not None else meta.fetchedAt),
    )


def _trigger(wire: _WireTrigger | str) -> Trigger:
    if isinstance(wire, str):
        # "Group.Name" names a signal; anything else (e.g. FIRST_DELIVERY) is the trigger type.
        if "." in wire:
            return Trigger(type="SIGNAL_UPDATED", code=code_from_dotted(wire))
        return Trigger(type=wire)
    if wire.signal is not None:
        code = code_from_dotted(wire.signal) if isinstance(wire.signal, str) else _signal_code(wire.signal)
        return Trigger(type=wire.type or "SIGNAL_UPDATED", code=code)
    if wire.code == "FIRST_DELIVERY":
        return Trigger(type="FIRST_DELIVERY")
    code = wire.code or _signal_code(_WireSignalRef(name=wire.name, group=wire.group))
    return Trigger(type=wire.type or ("SIGNAL_UPDATED" if code else "UNKNOWN"), code=code)


def _vehicle_error(wire: _WireVehicleError) -> VehicleError:
    return VehicleError(
        type=wire.type,
        code=wire.code,
        state=wire.state,
        description=wire.description,
        suggestedUserMessage=wire.suggestedUserMessage,
        docURL=wire.docURL,
        resolution=wire.resolution.type if wire.resolution else None,
        signals=tuple(_signal_ref(s) for s in wire.signals or ()),
    )


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None.

    ``load_json`` refuses NaN and Infinity literals, but a number beyond a double's range
    (``1e400``) still parses as infinity; it must not reach the output as invalid JSON. The
    parser refuses nesting deeper than about 200 levels, which bounds the recursion.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _describe(exc: ValidationError) -> str:
    """One sentence naming the first few failing fields, without echoing their values."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:3]:
        location = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{location}: {error['msg'].rstrip('.')}")
    more = "" if exc.error_count() <= 3 else f" (and {exc.error_count() - 3} more)"
    return "The payload does not match the event schema: " + "; ".join(parts) + more + "."
