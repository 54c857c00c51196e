"""The read-only side of the emulator: a seed indexed by id, with its JSON bodies serialised once.

Every vehicle resource and every signal resource is serialised when the catalog is built, so a
request only looks bytes up and joins them; a signals page splices pre-serialised items between a
small per-request ``meta``/``links`` header. Shapes follow smartcar.md §4.3 to §4.6.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from emulator.seed import SeedSignal, SeedUser, SeedVehicle

# uuid5 namespace for connection ids, so each (user, vehicle) pair keeps its id across runs.
_CONNECTION_NAMESPACE = uuid.UUID("0b6a1e7e-7c1f-4f0a-9d55-5a1c0de0c0c0")
#: When the seed's connections were made: fixed and long past, so the data stays the same from run
#: to run and no seeded connection looks freshly made (connections made at run time carry their
#: own time, see :mod:`emulator.control`).
SEED_CONNECTED_AT = "2025-06-01T00:00:00.000Z"


def dumps(value: object) -> bytes:
    """Compact JSON bytes, the form every emulator body is sent in."""
    return json.dumps(value, separators=(",", ":")).encode()


def signal_resource(vehicle_id: str, signal: SeedSignal) -> dict[str, object]:
    """A v3 ``SignalResource``. An ERROR signal has no ``body`` and no ``meta``, as in webhooks."""
    status: dict[str, object] = {"value": signal.status}
    if signal.error is not None:
        status["error"] = dict(signal.error)
    attributes: dict[str, object] = {
        "code": signal.code,
        "name": signal.name,
        "group": signal.group,
        "status": status,
    }
    resource: dict[str, object] = {"id": signal.code, "type": "signal", "attributes": attributes}
    if signal.body is not None:
        attributes["body"] = signal.body
    if signal.retrieved_at is not None or signal.oem_updated_at is not None:
        resource["meta"] = {"retrievedAt": signal.retrieved_at, "oemUpdatedAt": signal.oem_updated_at}
    resource["links"] = {"self": f"/vehicles/{vehicle_id}/signals/{signal.code}"}
    return resource


@dataclass(frozen=True, slots=True)
class Connection:
    """One (user, vehicle) connection with its ``/v3/connections`` item, minus the absolute link.

    ``created_at`` is served verbatim as ``attributes.createdAt`` (left out when ``None``):
    Smartcar documents no creation-time field, so this is the emulator's guess at one.
    """

    id: str
    user_id: str
    vehicle: SeedVehicle
    created_at: str | int | float | None = SEED_CONNECTED_AT

    def resource(self, api_base: str) -> dict[str, object]:
        """The list item; ``api_base`` is the emulator's ``.../v3`` URL without a trailing slash."""
        vehicle = self.vehicle
        attributes: dict[str, object] = {
            "user": {"id": self.user_id},
            "vehicle": {
                "make": vehicle.make,
                "model": vehicle.model,
                "year": vehicle.year,
                "mode": vehicle.mode,
                "powertrainType": vehicle.powertrain_type,
            },
            "permissions": list(vehicle.permissions),
        }
        if self.created_at is not None:
            attributes["createdAt"] = self.created_at
        return {
            "id": self.id,
            "type": "connection",
            "attributes": attributes,
            "relationships": {
                "vehicle": {
                    "data": {"id": vehicle.id, "type": "vehicle"},
                    "links": {"related": f"{api_base}/vehicles/{vehicle.id}"},
                }
            },
        }


class _VehicleEntry:
    """Pre-serialised bodies for one vehicle."""

    __slots__ = ("included", "resource", "signal_items", "signals")

    def __init__(self, vehicle: SeedVehicle) -> None:
        attributes = {"make": vehicle.make, "model": vehicle.model, "year": vehicle.year}
        self.resource = dumps(
            {
                "id": vehicle.id,
                "type": "vehicle",
                "attributes": attributes,
                "links": {"self": f"/vehicles/{vehicle.id}"},
            }
        )
        self.included = dumps({"vehicle": {"id": vehicle.id, "type": "vehicle", "attributes": attributes}})
        items = [(signal.code, dumps(signal_resource(vehicle.id, signal))) for signal in vehicle.all_signals()]
        self.signal_items: tuple[bytes, ...] = tuple(body for _, body in items)
        self.signals: dict[str, bytes] = dict(items)


class Catalog:
    """Users, vehicles and connections of one seed, looked up by id in O(1).

    A vehicle may be connected to several users (a shared car); it must then be the same
    :class:`SeedVehicle` each time. Raises :class:`ValueError` on a duplicate user id or on two
    different vehicles with one id.
    """

    def __init__(self, users: Sequence[SeedUser]) -> None:
        self._vehicles: dict[str, _VehicleEntry] = {}
        self._seed_vehicles: dict[str, SeedVehicle] = {}
        self._owned: set[tuple[str, str]] = set()
        self.connections: tuple[Connection, ...] = ()
        self._by_user: dict[str, list[Connection]] = {}
        self._by_vehicle: dict[str, list[Connection]] = {}
        connections: list[Connection] = []
        for user in users:
            if user.id in self._by_user:
                raise ValueError(f"seed lists user {user.id!r} twice")
            self._by_user[user.id] = []
            for vehicle in user.vehicles:
                known = self._seed_vehicles.setdefault(vehicle.id, vehicle)
                if known != vehicle:
                    raise ValueError(f"seed has two different vehicles with id {vehicle.id!r}")
                if vehicle.id not in self._vehicles:
                    self._vehicles[vehicle.id] = _VehicleEntry(vehicle)
                key = (user.id, vehicle.id)
                if key in self._owned:
                    continue
                self._owned.add(key)
                connection_id = str(uuid.uuid5(_CONNECTION_NAMESPACE, f"{user.id}/{vehicle.id}"))
                connection = Connection(id=connection_id, user_id=user.id, vehicle=vehicle)
                connections.append(connection)
                self._by_user[user.id].append(connection)
                self._by_vehicle.setdefault(vehicle.id, []).append(connection)
        self.connections = tuple(connections)

    def has_vehicle(self, vehicle_id: str) -> bool:
        """Whether any user has ``vehicle_id`` connected."""
        return vehicle_id in self._vehicles

    def vehicle(self, vehicle_id: str) -> SeedVehicle | None:
        """The seed's vehicle with this id, if any."""
        return self._seed_vehicles.get(vehicle_id)

    def owns(self, user_id: str, vehicle_id: str) -> bool:
        """Whether ``user_id`` has ``vehicle_id`` connected."""
        return (user_id, vehicle_id) in self._owned

    def vehicle_body(self, vehicle_id: str) -> bytes:
        """The ``GET /v3/vehicles/{id}`` body; the vehicle must exist."""
        return self._vehicles[vehicle_id].resource

    def signal_body(self, vehicle_id: str, code: str) -> bytes | None:
        """The ``GET .../signals/{code}`` body, or ``None`` for a code the vehicle lacks."""
        return self._vehicles[vehicle_id].signals.get(code)

    def signals_page(self, vehicle_id: str, page: int, size: int, api_base: str) -> bytes:
        """One page (1-based) of ``GET .../signals``; a page past the end has an empty ``data``.

        Paging ``meta`` uses the OpenAPI names (``page``, ``pageSize``, ``totalCount``) and the
        links carry ``page``/``pageSize`` query parameters, as in smartcar.md §4.4.
        """
        entry = self._vehicles[vehicle_id]
        total = len(entry.signal_items)
        last = max(1, -(-total // size))
        start = (page - 1) * size
        path = f"{api_base}/vehicles/{vehicle_id}/signals"

        def link(number: int) -> str:
            return f"{path}?page={number}&pageSize={size}"

        links = {
            "self": link(page),
            "first": link(1),
            "previous": link(page - 1) if page > 1 else None,
            "next": link(page + 1) if page < last else None,
            "last": link(last),
        }
        return b"".join(
            (
                b'{"data":[',
                b",".join(entry.signal_items[start : start + size]),
                b'],"meta":',
                dumps({"page": page, "pageSize": size, "totalCount": total}),
                b',"links":',
                dumps(links),
                b',"included":',
                entry.included,
                b"}",
            )
        )

    def find_connections(self, user_id: str | None, vehicle_id: str | None, mode: str | None) -> list[Connection]:
        """Connections matching every filter given; ``None`` means "no filter"."""
        if user_id is not None:
            found = self._by_user.get(user_id, [])
            if vehicle_id is not None:
                found = [c for c in found if c.vehicle.id == vehicle_id]
        elif vehicle_id is not None:
            found = self._by_vehicle.get(vehicle_id, [])
        else:
            found = list(self.connections)
        if mode is not None:
            found = [c for c in found if c.vehicle.mode == mode]
        return found
