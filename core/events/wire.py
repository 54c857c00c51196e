"""The wire models: a Smartcar delivery as sent, read tolerantly, unknown fields ignored.

Smartcar's documentation and its real deliveries (``tests/fixtures/captured/``) disagree: triggers
come in ``data.triggers`` as ``{code, name, group}`` or at the top level as ``{type, signal}``
(``signal`` an object or a ``"Group.Name"`` string); signal times as ``retrievedAt`` or
``fetchedAt``; ``meta``, ``triggers`` and a signal's ``status`` may be missing. Ids are strict
strings; times and the model year are ``Any``, read by :mod:`core.events.normalise`.
:data:`EDGE_VALIDATOR` is the web edge's reading: the same checks into plain dicts.
"""

from __future__ import annotations

from typing import Annotated, Any, Required

from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints, TypeAdapter, with_config
from typing_extensions import TypedDict

VERIFY = "VERIFY"
VEHICLE_STATE = "VEHICLE_STATE"
VEHICLE_ERROR = "VEHICLE_ERROR"
VEHICLE_EVENT_TYPES = frozenset({VEHICLE_STATE, VEHICLE_ERROR})

#: A Smartcar id that is not free text: a JSON string, never a number coerced into one.
SmartcarId = Annotated[StrictStr, Field(min_length=1, max_length=255)]
#: Smartcar vehicle ids are UUIDs. The id becomes a URL path segment (``/vehicles/{id}``), so
#: nothing that could move the path (``.``, ``..``, ``/``, ``%``) is ever accepted.
VEHICLE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
VehicleId = Annotated[StrictStr, StringConstraints(pattern=VEHICLE_ID_PATTERN)]


def is_legacy(version: object, event_name: object, payload: object) -> bool:
    """True for the top-level keys of a v2.0 webhook (v3 has ``meta.version`` instead)."""
    return version is not None or (event_name is not None and payload is not None)


class Wire(BaseModel):
    """Descriptive text accepts numbers, which is harmless; every id is a strict string."""

    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)


class WireSignalRef(Wire):
    code: str | None = None
    name: str | None = None
    group: str | None = None


class WireStatus(Wire):
    value: str | None = None
    error: dict[str, Any] | None = None


class WireSignalMeta(Wire):
    oemUpdatedAt: Any = None
    retrievedAt: Any = None
    fetchedAt: Any = None


class WireSignal(WireSignalRef):
    body: Any = None
    meta: WireSignalMeta | None = None
    status: WireStatus | None = None


class WireTrigger(Wire):
    type: str | None = None
    code: str | None = None
    name: str | None = None
    group: str | None = None
    signal: WireSignalRef | str | None = None


class WireVehicle(Wire):
    id: VehicleId | None = None
    make: str | None = None
    model: str | None = None
    year: Any = None
    mode: str | None = None
    powertrainType: str | None = None


class WireUser(Wire):
    id: SmartcarId


class WireResolution(Wire):
    type: str | None = None


class WireVehicleError(Wire):
    type: str | None = None
    code: str | None = None
    state: str | None = None
    description: str | None = None
    suggestedUserMessage: str | None = None
    docURL: str | None = None
    resolution: WireResolution | None = None
    signals: list[WireSignalRef | str] | None = None


class WireData(Wire):
    user: WireUser
    vehicle: WireVehicle | None = None
    signals: list[WireSignal] | None = None
    triggers: list[WireTrigger | str] | None = None
    errors: list[WireVehicleError] | None = None


class WireMeta(Wire):
    version: str | None = None
    deliveryId: StrictStr | None = None
    deliveredAt: Any = None
    webhookId: StrictStr | None = None
    webhookName: str | None = None
    mode: str | None = None


class WireEnvelope(Wire):
    """A VEHICLE_STATE or VEHICLE_ERROR delivery; the event type itself is checked afterwards.
    ``version``, ``eventName`` and ``payload`` mark a legacy v2.0 webhook (:func:`is_legacy`)."""

    eventId: SmartcarId
    eventType: StrictStr
    vehicleId: VehicleId | None = None
    data: WireData
    triggers: list[WireTrigger | str] | None = None
    meta: WireMeta | None = None
    version: Any = None
    eventName: Any = None
    payload: Any = None

    @property
    def vehicle_id(self) -> str | None:
        """``data.vehicle.id``, else the top-level ``vehicleId``; None when neither is given."""
        return (self.data.vehicle.id if self.data.vehicle else None) or self.vehicleId or None


class WireVerifyData(Wire):
    challenge: str = Field(min_length=1)


class WireVerify(Wire):
    data: WireVerifyData


# ---------------------------------------------------------------------------------------------
# The edge's reading: the fields and checks of WireEnvelope into plain dicts, less the fields typed
# ``Any`` the edge never reads, an object read as ``dict[str, Any]`` left unread. Kept because it
# costs half the model's time a body (docs/performance.md); tests/test_events.py holds the twins to
# the same verdicts and fields.

_edge = with_config(ConfigDict(coerce_numbers_to_str=True))


@_edge
class EdgeObject(TypedDict):
    """Any JSON object, its contents unread."""


@_edge
class EdgeSignalRef(TypedDict, total=False):
    code: str | None
    name: str | None
    group: str | None


@_edge
class EdgeStatus(TypedDict, total=False):
    value: str | None
    error: EdgeObject | None


@_edge
class EdgeSignal(EdgeSignalRef, total=False):
    meta: EdgeObject | None
    status: EdgeStatus | None


@_edge
class EdgeTrigger(TypedDict, total=False):
    type: str | None
    code: str | None
    name: str | None
    group: str | None
    signal: EdgeSignalRef | str | None


@_edge
class EdgeVehicle(TypedDict, total=False):
    id: VehicleId | None
    make: str | None
    model: str | None
    mode: str | None
    powertrainType: str | None


@_edge
class EdgeUser(TypedDict):
    id: SmartcarId


@_edge
class EdgeResolution(TypedDict, total=False):
    type: str | None


@_edge
class EdgeVehicleError(TypedDict, total=False):
    type: str | None
    code: str | None
    state: str | None
    description: str | None
    suggestedUserMessage: str | None
    docURL: str | None
    resolution: EdgeResolution | None
    signals: list[EdgeSignalRef | str] | None


@_edge
class EdgeData(TypedDict, total=False):
    user: Required[EdgeUser]
    vehicle: EdgeVehicle | None
    signals: list[EdgeSignal] | None
    triggers: list[EdgeTrigger | str] | None
    errors: list[EdgeVehicleError] | None


@_edge
class EdgeMeta(TypedDict, total=False):
    version: str | None
    deliveryId: StrictStr | None
    deliveredAt: Any
    webhookId: StrictStr | None
    webhookName: str | None
    mode: str | None


@_edge
class EdgeEnvelope(TypedDict, total=False):
    eventId: Required[SmartcarId]
    eventType: Required[StrictStr]
    vehicleId: VehicleId | None
    data: Required[EdgeData]
    triggers: list[EdgeTrigger | str] | None
    meta: EdgeMeta | None
    version: Any
    eventName: Any
    payload: Any


EDGE_VALIDATOR = TypeAdapter(EdgeEnvelope)
