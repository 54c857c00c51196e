"""The latest state of each vehicle, one Redis hash each (the "newest" rule: docs/consumers.md;
why the worker plans each merge: docs/architecture.md, "Publishing and the vehicle state")."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import pydantic_core
from redis.asyncio import Redis as AsyncRedis

from core.jsontext import dumps
from core.redis.keys import vehicle_state_key

#: The hash fields that are not signal codes; codes starting with ``_`` are never stored.
VEHICLE_FIELD = "_vehicle"
UPDATED_AT_FIELD = "_updatedAt"
EVENT_ID_FIELD = "_eventId"
RESERVED_PREFIX = "_"

# At most 18 digits: a longer number (not a time the service writes) is decoded, and refused there.
_FRONT = re.compile(rb'^\{"oemUpdatedAt":(-?\d{1,18}|null),"retrievedAt":(-?\d{1,18}|null),')

#: When a version was taken: (has oemUpdatedAt, oemUpdatedAt, has retrievedAt, retrievedAt).
When = tuple[bool, float, bool, float]


@dataclass(frozen=True)
class MergePlan:
    """One event's merge: the field/value pairs to write while the state's ``token`` is unchanged,
    and the codes the state held newer."""

    key: str
    token: bytes
    writes: list[str | bytes]
    stale_signals: list[str]

    def queue(self, transaction: Any, event_id: str, now_ms: int, held_updated_at: str) -> None:
        """Queue the writes on ``transaction`` (checked against ``token`` first by its caller), with
        ``_updatedAt`` Redis's clock, moved past the state's when not later, so it only grows."""
        with contextlib.suppress(ValueError):  # '' when there is no state yet
            now_ms = max(now_ms, int(held_updated_at) + 1)
        transaction.execute_command(
            "HSET", self.key, *self.writes, UPDATED_AT_FIELD, str(now_ms), EVENT_ID_FIELD, event_id
        )


def _time(value: object) -> int | None:
    """An epoch-ms time; anything but an int (or a bool) is unknown."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _when(oem: float | None, ret: float | None) -> When:
    return (oem is not None, oem or 0, ret is not None, ret or 0)


def json_object(raw: str | bytes) -> dict[str, Any] | None:
    """``raw`` decoded when it is a JSON object, else None."""
    try:
        value = pydantic_core.from_json(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _when_stored(stored: bytes) -> When:
    """When a stored version was taken: off the front of its JSON, else (an earlier release's, or
    times that are not whole numbers) decoded, any JSON number counting as a time."""
    if front := _FRONT.match(stored):
        oem, ret = front.groups()
        return _when(None if oem == b"null" else int(oem), None if ret == b"null" else int(ret))
    value = json_object(stored) or {}
    oem, ret = (value.get(name) for name in ("oemUpdatedAt", "retrievedAt"))
    return _when(*(t if isinstance(t, int | float) and not isinstance(t, bool) else None for t in (oem, ret)))


def _stored_json(signal: Mapping[str, Any]) -> bytes:
    """A signal's JSON as the state stores it: its two times first when both are whole numbers or
    null, to be read off the front without parsing."""
    oem, ret = signal.get("oemUpdatedAt", False), signal.get("retrievedAt", False)
    if len(signal) < 3 or not all(t is None or (type(t) is int) for t in (oem, ret)):
        return dumps(signal)
    # A key given again keeps its first place: the times first, with the signal's own values.
    return dumps({"oemUpdatedAt": None, "retrievedAt": None, **signal})


def newest_versions(signals: Iterable[Mapping[str, Any]]) -> dict[str, tuple[When, Mapping[str, Any], bytes]]:
    """Each code's newest version among ``signals``: when taken, the signal, and its stored JSON when
    made to break a tie (else ``b""``). A code not a string, empty or starting with ``_`` is left out."""
    newest: dict[str, tuple[When, Mapping[str, Any], bytes]] = {}
    for signal in signals:
        code = signal.get("code")
        if not isinstance(code, str) or not code or code.startswith(RESERVED_PREFIX):
            continue
        when = _when(_time(signal.get("oemUpdatedAt")), _time(signal.get("retrievedAt")))
        held = newest.get(code)
        if held is None or when > held[0]:
            newest[code] = (when, signal, b"")
        elif when == held[0]:  # equal times: the greater JSON text
            mine, theirs = _stored_json(signal), held[2] or _stored_json(held[1])
            newest[code] = (when, signal, mine) if mine > theirs else (when, held[1], theirs)
    return newest


class VehicleStates:
    """The worker's side: reads a vehicle's state and plans each event's merge into it."""

    def __init__(self, redis: AsyncRedis, prefix: str) -> None:
        self.prefix = prefix
        self._redis = redis

    async def plan(
        self,
        vehicle_id: str,
        signals: Iterable[Mapping[str, Any]],
        vehicle: Mapping[str, Any] | None = None,
        vehicle_from_api: bool = True,
    ) -> MergePlan:
        """The event's merge planned against the state as it is now, reading only the fields it needs."""
        key = vehicle_state_key(self.prefix, vehicle_id)
        newest = newest_versions(signals)
        names = [UPDATED_AT_FIELD, EVENT_ID_FIELD, VEHICLE_FIELD, *newest]
        held = dict(zip(names, cast(list[bytes | None], await self._redis.hmget(key, names)), strict=True))
        writes: list[str | bytes] = []
        if vehicle is not None:
            # Compact, as the output stream writes it (a NaN or infinity from the API becomes null).
            vehicle_json = dumps(vehicle)
            current = held.get(VEHICLE_FIELD)
            if current is None or (vehicle_from_api and current != vehicle_json):
                writes += [VEHICLE_FIELD, vehicle_json]
        stale: list[str] = []
        for code, (when, signal, stored) in newest.items():
            current = held.get(code)
            if current is None or when > (stored_when := _when_stored(current)):
                writes += [code, stored or _stored_json(signal)]
            elif when < stored_when:
                stale.append(code)
            elif (stored := stored or _stored_json(signal)) > current:  # equal times: the greater JSON text
                writes += [code, stored]
        # The token the publish compares: the state's _updatedAt and _eventId as read.
        token = (held.get(UPDATED_AT_FIELD) or b"") + b":" + (held.get(EVENT_ID_FIELD) or b"")
        return MergePlan(key, token, writes, sorted(stale))
