"""Deterministic seed data for the Smartcar emulator: users, their vehicles and each vehicle's signals.

A seed is a plain ``tuple[SeedUser, ...]``, so seeds compose with ``+``::

    EmulatorConfig(seed=default_seed() + seed_fleet(1_000))

:func:`default_seed` holds every user and vehicle that appears in ``fixtures/captured/`` and the
example ids of ``smartcar.md`` (the vehicles are in :mod:`emulator.captured`). :func:`seed_fleet`
adds synthetic users for benchmarks. The same arguments always give equal data.
"""

from __future__ import annotations

import random
import uuid

from emulator import captured
from emulator.models import (
    BEV_PERMISSIONS,
    ICE_PERMISSIONS,
    VIN_CODE,
    Seed,
    SeedSignal,
    SeedUser,
    SeedVehicle,
    SignalStatus,
    failed,
    ok,
)

__all__ = [
    "VIN_CODE",
    "Seed",
    "SeedSignal",
    "SeedUser",
    "SeedVehicle",
    "SignalStatus",
    "default_seed",
    "failed",
    "ok",
    "seed_fleet",
]

# uuid5 namespace for synthetic ids, so a fleet's ids never change between runs or machines.
_FLEET_NAMESPACE = uuid.UUID("6d1f3c52-0c4e-4b8e-9a57-3f2b1c0de001")


def default_seed() -> Seed:
    """Every user and vehicle of the captured fixtures and of smartcar.md, in a fixed order."""
    return (
        SeedUser("2fbd0033-83e7-43b8-a367-776d6dff1134", (captured.volkswagen_id4(), captured.hyundai_ioniq5())),
        SeedUser("da4ef0df-73b9-4ad7-8c59-1b15ff646f0b", (captured.byd_seal(),)),
        # jaguar_ipace2_all.json redacts its user id to "XXXXXX"; served verbatim on purpose.
        SeedUser("XXXXXX", (captured.jaguar_ipace_many_signals(),)),
        SeedUser("9c9cde56-7d04-468b-a80a-a398bec0ce1e", (captured.jaguar_ipace_charging(),)),
        SeedUser("9c9cde56-3333-5555-6666-7e50207e6e64", (captured.polestar_2(),)),
        SeedUser("9e8d7c6b-2222-4222-8222-222222222222", (captured.tesla_model_y(),)),
    )


_FLEET_MODELS = (
    ("TESLA", "Model 3", "BEV"),
    ("VOLKSWAGEN", "ID.3", "BEV"),
    ("POLESTAR", "Polestar 2", "BEV"),
    ("HYUNDAI", "IONIQ 6", "BEV"),
    ("TOYOTA", "RAV4", "PHEV"),
    ("BMW", "118i", "ICE"),
)


def _fleet_vehicle(index: int) -> SeedVehicle:
    # Not cryptographic: a per-index RNG only makes the synthetic values varied yet repeatable.
    rng = random.Random(f"fleet-vehicle-{index}")  # noqa: S311
    make, model, powertrain = rng.choice(_FLEET_MODELS)
    retrieved = 1767000000000 + index * 1000
    at = (retrieved - rng.randrange(1000, 60_000), retrieved)
    signals = [ok("Odometer", "TraveledDistance", {"value": rng.randrange(1000, 150_000), "unit": "km"}, at)]
    if powertrain == "ICE":
        signals.append(ok("InternalCombustionEngine", "FuelLevel", {"value": round(rng.random(), 2)}, at))
        signals.append(failed("TractionBattery", "StateOfCharge", "COMPATIBILITY", "VEHICLE_NOT_CAPABLE"))
    else:
        signals.append(ok("TractionBattery", "StateOfCharge", {"value": rng.randrange(5, 101), "unit": "percent"}, at))
        signals.append(ok("Charge", "IsCharging", {"value": rng.random() < 0.3}, at))
    signals.append(
        ok(
            "Location",
            "PreciseLocation",
            {"latitude": round(rng.uniform(-60, 60), 4), "longitude": round(rng.uniform(-180, 180), 4)},
            at,
        )
    )
    return SeedVehicle(
        id=str(uuid.uuid5(_FLEET_NAMESPACE, f"vehicle-{index}")),
        make=make,
        model=model,
        year=rng.randrange(2018, 2027),
        vin=f"1FAKEVIN{index:09d}",
        signals=tuple(signals),
        powertrain_type=powertrain,
        permissions=ICE_PERMISSIONS if powertrain == "ICE" else BEV_PERMISSIONS,
    )


def seed_fleet(n: int, vehicles_per_user: int = 1) -> Seed:
    """``n`` synthetic users with ``vehicles_per_user`` vehicles each; ids never clash with the default seed.

    User ``i`` is ``uuid5(namespace, "user-{i}")``; its vehicles are numbered consecutively across the
    fleet, and vehicle ``k`` has VIN ``1FAKEVIN`` plus ``k`` as nine digits.
    """
    if n < 0 or vehicles_per_user < 1:
        raise ValueError("seed_fleet needs n >= 0 and vehicles_per_user >= 1")
    return tuple(
        SeedUser(
            str(uuid.uuid5(_FLEET_NAMESPACE, f"user-{i}")),
            tuple(_fleet_vehicle(i * vehicles_per_user + j) for j in range(vehicles_per_user)),
        )
        for i in range(n)
    )
