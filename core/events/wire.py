"""The wire models: a Smartcar delivery as sent, read tolerantly.

Smartcar's documentation and its real deliveries disagree on the VEHICLE_STATE shape (the real
ones are kept in ``tests/fixtures/captured/``): triggers sit in ``data.triggers`` as
``{code, name, group}`` or at the top level as ``{type, signal}`` where ``signal`` is an object or
a ``"Group.Name"`` string; signal times come as ``retrievedAt`` or ``fetchedAt``; ``meta``,
``triggers`` and per-signal ``status`` may be missing. These models accept all of these and
ignore unknown fields; :mod:`core.events.normalise` folds them into the internal form.

Ids are JSON strings only (a number is a schema failure, never coerced into a different string).
Times and the model year are typed ``Any`` here and read by :mod:`core.timestamps`, which turns
anything unreadable into None.

:data:`EDGE_VALIDATOR` is the web edge's reading of the same deliveries: the same checks into plain
dicts, without what the edge never reads.
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
    """True for the top-level keys of a v2.0 webhook.

    v2.0 webhooks carry a top-level ``version`` (and ``eventName`` with ``payload``) where v3
    has ``meta.version``. The dict check of the step-by-step path and the one-pass check share it.
    """
    return version is not None or (event_name is not None and payload is not None)


class Wire(BaseModel):
    """Base of the wire models: unknown fields ignored.

    Descriptive text (make, model, signal names) accepts numbers, which is harmless; every id is
    a strict string (:data:`SmartcarId`, :data:`VehicleId`), so a numeric id is a schema failure
    at the edge and in the worker alike.
    """

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
    """A VEHICLE_STATE or VEHICLE_ERROR delivery; the event type itself is checked afterwards."""

    eventId: SmartcarId
    eventType: StrictStr
    vehicleId: VehicleId | None = None
    data: WireData
    triggers: list[WireTrigger | str] | None = None
    meta: WireMeta | None = None

    @property
    def vehicle_id(self) -> str | None:
        """``data.vehicle.id``, else the top-level ``vehicleId``; None when neither is given."""
        return (self.data.vehicle.id if self.data.vehicle else None) or self.vehicleId or None


class WebEnvelope(WireEnvelope):
    """The envelope plus the top-level keys that mark a legacy v2.0 webhook.

    The one-pass reading of a body (edge and worker) validates this model, so a legacy body is
    recognised without a second parse.
    """

    version: Any = None
    eventName: Any = None
    payload: Any = None

    @property
    def legacy(self) -> bool:
        return is_legacy(self.version, self.eventName, self.payload)


class WireVerifyData(Wire):
    challenge: str = Field(min_length=1)


class WireVerify(Wire):
    data: WireVerifyData


# ---------------------------------------------------------------------------------------------
# The edge's reading: the fields and checks of WebEnvelope, into plain dicts, without the fields
# typed ``Any`` the edge never reads (a signal's body and times, the model year) and with
# ``dict[str, Any]`` an object left unread. Why a second reading: on the fleet mix it takes 38 µs
# a body where the model takes 83 µs (docs/performance.md). tests/test_events.py holds the two to
# the same verdicts and the same fields.

_edge = with_config(ConfigDict(coerce_numbers_to_str=True))


@_edge
class EdgeObject(TypedDict):
    """Any JSON object, its contents unread (``dict[str, Any]`` in the models)."""


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


#: Validates a delivery body (JSON bytes) as :class:`WebEnvelope` does, into an :class:`EdgeEnvelope`.
EDGE_VALIDATOR = TypeAdapter(EdgeEnvelope)
