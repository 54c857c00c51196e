"""The seed's data model: users, their vehicles and each vehicle's signals in the v3 REST form.

All classes are frozen. ``ok`` and ``failed`` build signals whose ``code`` is derived from group and
name the way Smartcar derives it (``Odometer`` + ``TraveledDistance`` -> ``odometer-traveleddistance``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

SignalStatus = Literal["SUCCESS", "ERROR", "UNAVAILABLE"]

VIN_CODE = "vehicleidentification-vin"
BEV_PERMISSIONS = ("read_battery", "read_charge", "read_location", "read_odometer", "read_vehicle_info")
ICE_PERMISSIONS = ("read_fuel", "read_location", "read_odometer", "read_vehicle_info")


@dataclass(frozen=True, slots=True)
class SeedSignal:
    """One signal in the v3 REST form. ``body`` and the timestamps are ``None`` on an ERROR signal."""

    code: str
    name: str
    group: str
    status: SignalStatus = "SUCCESS"
    body: Mapping[str, object] | None = field(default=None, hash=False)
    error: Mapping[str, object] | None = field(default=None, hash=False)
    oem_updated_at: int | None = None
    """Epoch milliseconds at which the OEM recorded the value."""
    retrieved_at: int | None = None
    """Epoch milliseconds at which Smartcar fetched the value."""


@dataclass(frozen=True, slots=True)
class SeedVehicle:
    """A connected vehicle. Its VIN is served as the ``vehicleidentification-vin`` signal."""

    id: str
    make: str
    model: str
    year: int
    vin: str
    signals: tuple[SeedSignal, ...] = ()
    powertrain_type: str = "BEV"
    mode: Literal["live", "simulated"] = "live"
    permissions: tuple[str, ...] = BEV_PERMISSIONS

    def all_signals(self) -> tuple[SeedSignal, ...]:
        """The vehicle's signals, with the VIN signal appended unless ``signals`` already has one."""
        if any(signal.code == VIN_CODE for signal in self.signals):
            return self.signals
        retrieved = max((s.retrieved_at or 0 for s in self.signals), default=0)
        vin = SeedSignal(
            code=VIN_CODE,
            name="VIN",
            group="VehicleIdentification",
            body={"value": self.vin},
            oem_updated_at=0,  # captured VIN signals carry 0: the OEM never dates a VIN
            retrieved_at=retrieved,
        )
        return (*self.signals, vin)


@dataclass(frozen=True, slots=True)
class SeedUser:
    """A Smartcar user (the ``sc-user-id`` value) and the vehicles connected under it."""

    id: str
    vehicles: tuple[SeedVehicle, ...]


Seed = tuple[SeedUser, ...]


def ok(group: str, name: str, body: Mapping[str, object], at: tuple[int, int]) -> SeedSignal:
    """A SUCCESS signal; ``at`` is ``(oemUpdatedAt, retrievedAt)`` in epoch ms."""
    return SeedSignal(
        code=f"{group}-{name}".lower(),
        name=name,
        group=group,
        body=body,
        oem_updated_at=at[0],
        retrieved_at=at[1],
    )


def failed(group: str, name: str, error_type: str, error_code: str | None) -> SeedSignal:
    """An ERROR signal, as Smartcar reports an incapable vehicle or a missing permission."""
    return SeedSignal(
        code=f"{group}-{name}".lower(),
        name=name,
        group=group,
        status="ERROR",
        error={"type": error_type, "code": error_code},
    )
