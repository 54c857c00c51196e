"""The normalised vehicle event, the only shape the rest of the service sees: times in epoch
milliseconds, signal codes lowercase, no NaN or infinite number in a signal's body or error, and a
signal's ``status`` SUCCESS, ERROR or UNAVAILABLE."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple, NotRequired

from pydantic import BaseModel, SkipValidation
from typing_extensions import TypedDict


class Vehicle(BaseModel, frozen=True):
    id: str
    make: str | None = None
    model: str | None = None
    year: int | None = None
    mode: str | None = None
    powertrainType: str | None = None


class SignalRef(BaseModel, frozen=True):
    code: str
    name: str | None = None
    group: str | None = None


class Signal(TypedDict):
    """A signal as the output stream carries it (made by normalise, which checks every field: a plain
    dict, so that the worker neither validates it again nor converts it back)."""

    code: str
    name: str | None
    group: str | None
    body: Any
    status: str
    error: NotRequired[dict[str, Any]]  # only when the signal has one
    oemUpdatedAt: int | None
    retrievedAt: int | None


class Trigger(BaseModel, frozen=True):
    type: str
    code: str | None = None


class VehicleError(BaseModel, frozen=True):
    type: str | None = None
    code: str | None = None
    state: str | None = None
    description: str | None = None
    suggestedUserMessage: str | None = None
    docURL: str | None = None
    resolution: str | None = None
    signals: tuple[SignalRef, ...] = ()


class DeliveryMeta(BaseModel, frozen=True):
    deliveryId: str | None = None
    deliveredAt: int | str | None = None
    webhookId: str | None = None
    mode: str | None = None


class VehicleEvent(BaseModel, frozen=True):
    event_id: str
    event_type: Literal["VEHICLE_STATE", "VEHICLE_ERROR"]
    smartcar_user_id: str
    vehicle: Vehicle
    signals: Annotated[tuple[Signal, ...], SkipValidation] = ()
    errors: tuple[VehicleError, ...] = ()
    triggers: tuple[Trigger, ...] = ()
    meta: DeliveryMeta = DeliveryMeta()


class QuickEvent(NamedTuple):
    """What the web edge needs to know of a valid vehicle event (a tuple: cheaper than a dataclass)."""

    event_id: str
    event_type: str
    delivery_id: str | None
    delivered_at_ms: int | None = None
