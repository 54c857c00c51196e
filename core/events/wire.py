"""The wire schema: a Smartcar delivery as sent, read tolerantly into typed dicts (the shapes real
deliveries take: docs/architecture.md, "Reading a delivery"). Times and the year are read by normalise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Generic, Required, TypeVar

from pydantic import ConfigDict, Field, StrictStr, StringConstraints, TypeAdapter, with_config
from typing_extensions import TypedDict

VERIFY = "VERIFY"
VEHICLE_STATE = "VEHICLE_STATE"
VEHICLE_ERROR = "VEHICLE_ERROR"
VEHICLE_EVENT_TYPES = frozenset({VEHICLE_STATE, VEHICLE_ERROR})

#: A Smartcar id that is not free text: a JSON string, never a number coerced into one.
SmartcarId = Annotated[StrictStr, Field(min_length=1, max_length=255)]
#: A vehicle id (a UUID) becomes a URL path segment: nothing that could move the path (``.``, ``/``, ``%``).
VEHICLE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
VehicleId = Annotated[StrictStr, StringConstraints(pattern=VEHICLE_ID_PATTERN)]


class WireObject(TypedDict):
    """Any JSON object, its contents unread."""


class WireSignalRef(TypedDict, total=False):
    code: str | None
    name: str | None
    group: str | None


#: A signal's ``meta`` and ``status.error``: a ``dict`` for the worker, a :class:`WireObject` (unread) for the edge.
Obj = TypeVar("Obj")


class WireStatus(TypedDict, Generic[Obj], total=False):
    value: str | None
    error: Obj | None


# The edge's reading (EDGE_VALIDATOR) leaves out what it never reads: a signal's body, times and error.
class EdgeSignal(WireSignalRef, Generic[Obj], total=False):
    meta: Obj | None
    status: WireStatus[Obj] | None


class WireSignal(EdgeSignal[Obj], total=False):
    body: Any


class WireVehicle(TypedDict, total=False):
    id: VehicleId | None
    make: str | None
    model: str | None
    year: Any
    mode: str | None
    powertrainType: str | None


class WireTrigger(WireSignalRef, total=False):
    type: str | None
    signal: WireSignalRef | str | None


class WireUser(TypedDict):
    id: SmartcarId


class WireResolution(TypedDict, total=False):
    type: str | None


class WireVehicleError(TypedDict, total=False):
    type: str | None
    code: str | None
    state: str | None
    description: str | None
    suggestedUserMessage: str | None
    docURL: str | None
    resolution: WireResolution | None
    signals: list[WireSignalRef | str] | None


class WireMeta(TypedDict, total=False):
    version: str | None
    deliveryId: StrictStr | None
    deliveredAt: Any
    webhookId: StrictStr | None
    webhookName: str | None
    mode: str | None


#: A signal as the worker reads it (``WireSignal[dict]``), or as the edge does (``EdgeSignal[WireObject]``).
S = TypeVar("S", bound=WireSignalRef)


class WireData(TypedDict, Generic[S], total=False):
    user: Required[WireUser]
    vehicle: WireVehicle | None
    signals: list[S] | None
    triggers: list[WireTrigger | str] | None
    errors: list[WireVehicleError] | None


# Descriptive text (make, model, signal names) accepts numbers; the root's config holds for all inside.
@with_config(ConfigDict(coerce_numbers_to_str=True))
class WireEnvelope(TypedDict, Generic[S], total=False):
    """A vehicle event (its type is checked afterwards); ``version``, ``eventName``, ``payload``: :func:`is_legacy`."""

    eventId: Required[SmartcarId]
    eventType: Required[StrictStr]
    vehicleId: VehicleId | None
    data: Required[WireData[S]]
    triggers: list[WireTrigger | str] | None
    meta: WireMeta | None
    version: Any
    eventName: Any
    payload: Any


Envelope = WireEnvelope[WireSignal[dict[str, Any]]]
WIRE_VALIDATOR = TypeAdapter(Envelope)
EDGE_VALIDATOR = TypeAdapter(WireEnvelope[EdgeSignal[WireObject]])


def is_legacy(document: Mapping[str, Any]) -> bool:
    """True for the top-level keys of a v2.0 webhook (v3 has ``meta.version`` instead)."""
    return document.get("version") is not None or (
        document.get("eventName") is not None and document.get("payload") is not None
    )


def vehicle_id(envelope: WireEnvelope[Any]) -> str | None:
    """``data.vehicle.id``, else the top-level ``vehicleId``; None when neither is given."""
    vehicle = envelope["data"].get("vehicle")
    return (vehicle.get("id") if vehicle else None) or envelope.get("vehicleId") or None
