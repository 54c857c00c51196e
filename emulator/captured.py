"""The vehicles of ``fixtures/captured/`` and of smartcar.md's examples, as seed data.

Signal values, units and timestamps come from the captured deliveries. VINs and coordinates do
not: captured VINs (some look real) become ``1FAKEVIN00TEST00n`` and locations move to landmarks.
"""

from __future__ import annotations

from emulator.models import SeedSignal, SeedVehicle, failed, ok


def _not_capable(group: str, name: str) -> SeedSignal:
    return failed(group, name, "COMPATIBILITY", "VEHICLE_NOT_CAPABLE")


def _no_permission(group: str, name: str) -> SeedSignal:
    return failed(group, name, "PERMISSION", None)


def _closed_doors(at: tuple[int, int]) -> list[SeedSignal]:
    cells = [(row, column) for row in (0, 1) for column in (0, 1)]
    return [
        ok("Closure", "IsLocked", {"value": True}, at),
        ok(
            "Closure",
            "Doors",
            {
                "values": [{"row": r, "column": c, "isOpen": False, "isLocked": True} for r, c in cells],
                "rowCount": 2,
                "columnCount": 2,
            },
            at,
        ),
        ok(
            "Closure",
            "Windows",
            {"values": [{"row": r, "column": c, "isOpen": False} for r, c in cells], "rowCount": 2, "columnCount": 2},
            at,
        ),
    ]


def volkswagen_id4() -> SeedVehicle:
    """The VW ID.4 of vw_id_4_*.json: few signals, several of them ERROR."""
    # vw_id_4_all.json. Two other captures (fuel, test_mode) label this id "BMW 118i 2025"; the
    # emulator keeps the majority label, which five of the seven captures agree on.
    at = (1758238233000, 1758238783086)
    return SeedVehicle(
        id="a1d50709-3502-4faa-ba43-a5c7565e6a09",
        make="VOLKSWAGEN",
        model="ID.4",
        year=2021,
        vin="1FAKEVIN00TEST001",
        signals=(
            _not_capable("ConnectivityStatus", "IsOnline"),
            ok("Odometer", "TraveledDistance", {"value": 62041, "unit": "km"}, (1758238176603, 1758238782829)),
            _no_permission("Closure", "IsLocked"),
            _not_capable("InternalCombustionEngine", "FuelLevel"),
            ok("TractionBattery", "StateOfCharge", {"value": 42, "unit": "percent"}, at),
            _not_capable("TractionBattery", "Range"),
            ok(
                "Charge",
                "ChargeLimits",
                {"values": [{"type": "GLOBAL", "limit": 80, "condition": None}], "activeLimit": 80, "unit": "percent"},
                (1758238232000, at[1]),
            ),
            ok("Charge", "IsCharging", {"value": False}, at),
        ),
    )


def hyundai_ioniq5() -> SeedVehicle:
    """The IONIQ 5 that vw_id_4_mismatch.json delivers under the VW owner."""
    # vw_id_4_mismatch.json delivers this vehicle with no signals; the values here are invented.
    at = (1758238233000, 1758238783086)
    return SeedVehicle(
        id="70076e4a-d774-464c-8241-60de654ccb24",
        make="Hyundai",
        model="IONIQ 5",
        year=2023,
        vin="1FAKEVIN00TEST002",
        signals=(
            ok("TractionBattery", "StateOfCharge", {"value": 67, "unit": "percent"}, at),
            ok("Odometer", "TraveledDistance", {"value": 18250, "unit": "km"}, at),
        ),
    )


def byd_seal() -> SeedVehicle:
    """The BYD plug-in hybrid of byd_seal_all.json."""
    at = (1767920001000, 1767920009852)
    return SeedVehicle(
        id="b3014ded-85db-4f12-8923-7a231354d8d0",
        make="BYD",
        model="Seal U Dm-i",
        year=2025,
        vin="1FAKEVIN00TEST003",
        powertrain_type="PHEV",
        signals=(
            _not_capable("VehicleUserAccount", "Role"),
            _not_capable("ConnectivitySoftware", "CurrentFirmwareVersion"),
            _not_capable("InternalCombustionEngine", "FuelLevel"),
            ok("VehicleIdentification", "Nickname", {"value": "SEAL U DM-i"}, at),
            ok("TractionBattery", "StateOfCharge", {"value": 78, "unit": "percent"}, at),
            ok("Closure", "IsLocked", {"value": True}, at),
            ok("Odometer", "TraveledDistance", {"value": 10321, "unit": "km"}, at),
            ok("ConnectivityStatus", "IsOnline", {"value": True}, at),
            ok("ConnectivityStatus", "IsAsleep", {"value": False}, at),
        ),
    )


def jaguar_ipace_many_signals() -> SeedVehicle:
    """The I-PACE of jaguar_ipace2_all.json, owned by the redacted user "XXXXXX"."""
    # jaguar_ipace2_all.json: the one vehicle with more signals than a default page (10) holds.
    at = (1768168607000, 1768168615889)
    return SeedVehicle(
        id="27192cce-8920-4ba9-b6c6-4f280a86fe39",
        make="JAGUAR",
        model="I-PACE",
        year=2021,
        vin="1FAKEVIN00TEST004",
        signals=(
            _not_capable("Closure", "Tailgate"),
            *_closed_doors(at),
            ok("Closure", "Sunroof", {"isOpen": False}, at),
            ok("Location", "PreciseLocation", {"latitude": 51.5007, "longitude": -0.1246, "heading": 132}, at),
            _not_capable("Transmission", "GearState"),
            ok("Charge", "IsChargingCableConnected", {"value": True}, at),
            ok("Charge", "DetailedChargingStatus", {"value": "FULLY_CHARGED"}, at),
            ok("Charge", "IsCharging", {"value": False}, at),
            ok("Charge", "ChargeRate", {"value": 15, "unit": "km/h"}, at),
            ok("Charge", "ChargeLimits", {"values": [], "activeLimit": 100, "unit": "percent"}, at),
            ok("TractionBattery", "StateOfCharge", {"value": 100, "unit": "percent"}, at),
            ok("TractionBattery", "Range", {"value": 358, "additionalValues": [], "unit": "km"}, at),
            ok("Odometer", "TraveledDistance", {"value": 53168, "unit": "km"}, at),
            ok(
                "Wheel",
                "Tires",
                {
                    "values": [
                        {"row": 0, "column": 1, "tirePressure": 699.9},
                        {"row": 0, "column": 0, "tirePressure": 258},
                        {"row": 1, "column": 1, "tirePressure": 258},
                        {"row": 1, "column": 0, "tirePressure": 258},
                    ],
                    "rowCount": 2,
                    "columnCount": 2,
                    "unit": "bar",
                },
                at,
            ),
            _no_permission("Diagnostics", "Airbag"),
        ),
    )


def jaguar_ipace_charging() -> SeedVehicle:
    """The charging I-PACE of jaguar_ipace_all.json."""
    at = (1765157655000, 1765157664453)
    return SeedVehicle(
        id="db745230-7f7c-4791-bcaa-185facf371be",
        make="JAGUAR",
        model="I-PACE",
        year=2021,
        vin="1FAKEVIN00TEST005",
        signals=(
            _not_capable("ConnectivityStatus", "IsOnline"),
            ok("Charge", "DetailedChargingStatus", {"value": "CHARGING"}, at),
            ok("Charge", "IsCharging", {"value": True}, at),
            ok("LowVoltageBattery", "StateOfCharge", {"value": 100, "unit": "percent"}, at),
            ok("Odometer", "TraveledDistance", {"value": 167336, "unit": "km"}, at),
            ok("TractionBattery", "StateOfCharge", {"value": 54, "unit": "percent"}, at),
            ok("TractionBattery", "Range", {"value": 168, "additionalValues": [], "unit": "km"}, at),
            _no_permission("Diagnostics", "DtcCount"),
        ),
    )


def polestar_2() -> SeedVehicle:
    """The Polestar 2 of polestar_2_all.json."""
    at = (1769937933000, 1769937943244)
    return SeedVehicle(
        id="875d9333-bbbb-4444-aaaa-17be22ebe970",
        make="POLESTAR",
        model="Polestar 2",
        year=2024,
        vin="1FAKEVIN00TEST006",
        signals=(
            ok("VehicleIdentification", "ExteriorColor", {"value": "Space"}, (0, 0)),
            ok("Charge", "Wattage", {"value": 4683, "unit": "watts"}, at),
            ok("Charge", "Voltage", {"value": 223, "unit": "volts"}, at),
            failed("Charge", "ChargeTimers", "SERVER", "INTERNAL"),
            ok("TractionBattery", "StateOfCharge", {"value": 89, "unit": "percent"}, at),
            ok(
                "TractionBattery",
                "Range",
                {"value": 290, "type": "DEFAULT", "additionalValues": [], "unit": "km"},
                at,
            ),
            ok(
                "Location",
                "PreciseLocation",
                {"latitude": 60.1699, "longitude": 24.9384, "locationType": "LAST_PARKED"},
                (1769852864000, 1769937942671),
            ),
            ok("Odometer", "TraveledDistance", {"value": 42506.3, "unit": "km"}, (1769852860000, 1769937942628)),
        ),
    )


def tesla_model_y() -> SeedVehicle:
    """smartcar.md's example vehicle."""
    # smartcar.md §4.3/§4.4 and §7. §4.6 shows this id as a RIVIAN R1S; §4.3 (the vehicle
    # endpoint itself) says TESLA Model Y 2022, and the emulator follows the endpoint's own example.
    return SeedVehicle(
        id="5f0c1a2b-1111-4111-8111-111111111111",
        make="TESLA",
        model="Model Y",
        year=2022,
        vin="1FAKEVIN00TEST007",
        signals=(
            ok(
                "Odometer", "TraveledDistance", {"unit": "kilometers", "value": 48211.4}, (1767000100000, 1767000200000)
            ),
            ok(
                "Location",
                "PreciseLocation",
                {"latitude": 47.6101, "longitude": -122.2015, "heading": 212, "locationType": "LAST_PARKED"},
                (1767001000000, 1767001004321),
            ),
            ok("TractionBattery", "StateOfCharge", {"unit": "percent", "value": 71}, (1767000100000, 1767000200000)),
        ),
    )
