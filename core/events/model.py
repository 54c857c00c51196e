"""The normalised form of a vehicle event: the only shape the rest of the service sees.

:class:`VehicleEvent` is what the worker enriches and publishes; :class:`QuickEvent` is the
little the web edge needs to know to accept a delivery. Times are epoch milliseconds, signal
codes are lowercase, and no number in a signal body or error is NaN or infinite.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

EventType = Literal["VEHICLE_STATE", "VEHICLE_ERROR"]


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


class QuickEvent(NamedTuple):
    """What the web edge needs to know of a valid vehicle event (a tuple: built once per delivery,
    several times cheaper than a frozen dataclass)."""

    event_id: str
    event_type: str
    delivery_id: str | None
    delivered_at_ms: int | None = None
