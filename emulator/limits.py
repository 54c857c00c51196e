"""Smartcar's rate limits as the emulator plays them, and a log of every API call.

A limit makes the API answer 429 for a while (smartcar.md §4.8):

- **per vehicle**: every call under ``/v3/vehicles/{id}`` for that vehicle answers
  ``429 RATE_LIMIT`` / ``VEHICLE`` with ``Retry-After``: the seconds left, as Smartcar tells a
  client to honour it;
- **application**: every API call but the token endpoint answers ``429 RATE_LIMIT`` /
  ``SMARTCAR_API``, without ``Retry-After`` unless asked (Smartcar promises none for this limit).

The call log keeps, for each API call (not the control API), when the emulator answered it (epoch
ms, wall clock), its route template, the vehicle id in its path (or null) and its status, so tests
can count calls per vehicle and per second. It holds the last :data:`CALL_LOG_SIZE` calls.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

#: Calls the log keeps (the oldest are dropped first).
CALL_LOG_SIZE = 200_000


class RateLimitSpec(BaseModel):
    """The JSON body of ``POST /_emulator/rate-limits``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    vehicle_id: str | None = Field(default=None, alias="vehicleId", min_length=1, max_length=64)
    """The vehicle limited; absent: the whole application."""
    seconds: float = Field(gt=0, le=3600)
    """How long the limit lasts from now."""
    retry_after: bool | None = Field(default=None, alias="retryAfter")
    """Send ``Retry-After``; by default yes for a vehicle, no for the application."""


@dataclass(slots=True)
class _Limit:
    until: float
    retry_after: bool


@dataclass(frozen=True, slots=True)
class Limited:
    """How a limited call is answered: the error code and the ``Retry-After`` value, if any."""

    code: str
    retry_after: str | None


def retry_after_text(seconds: float) -> str:
    """Seconds left as a ``Retry-After`` value: whole seconds when whole, else rounded up to the millisecond
    (Smartcar sends whole seconds; fractions let tests wait less)."""
    millis = math.ceil(seconds * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis / 1000:.3f}".rstrip("0")


class RateLimits:
    """The limits in force, on the emulator's monotonic ``clock``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._vehicles: dict[str, _Limit] = {}
        self._application: _Limit | None = None

    def add(self, spec: RateLimitSpec) -> dict[str, object]:
        """Start (or replace) a limit; returns it as ``GET`` lists it."""
        until = self._clock() + spec.seconds
        if spec.vehicle_id is None:
            self._application = _Limit(until, spec.retry_after is True)
            return self._describe(None, self._application)
        self._vehicles[spec.vehicle_id] = limit = _Limit(until, spec.retry_after is not False)
        return self._describe(spec.vehicle_id, limit)

    def check(self, vehicle_id: str | None) -> Limited | None:
        """How a call for ``vehicle_id`` (None: no vehicle in its path) is limited now, if it is."""
        now = self._clock()
        application = self._application
        if application is not None and application.until > now:
            left = retry_after_text(application.until - now) if application.retry_after else None
            return Limited("SMARTCAR_API", left)
        limit = self._vehicles.get(vehicle_id) if vehicle_id is not None else None
        if limit is not None and limit.until > now:
            return Limited("VEHICLE", retry_after_text(limit.until - now) if limit.retry_after else None)
        return None

    def describe(self) -> list[dict[str, object]]:
        """The limits still in force."""
        now = self._clock()
        limits = [self._describe(vehicle, limit) for vehicle, limit in self._vehicles.items() if limit.until > now]
        if self._application is not None and self._application.until > now:
            limits.insert(0, self._describe(None, self._application))
        return limits

    def clear(self) -> int:
        """Lift every limit; returns how many were in force."""
        lifted = len(self.describe())
        self._vehicles.clear()
        self._application = None
        return lifted

    def _describe(self, vehicle_id: str | None, limit: _Limit) -> dict[str, object]:
        left = max(0.0, limit.until - self._clock())
        return {"vehicleId": vehicle_id, "secondsLeft": round(left, 3), "retryAfter": limit.retry_after}


class CallLog:
    """The last API calls: ``{"at": epoch ms, "route", "vehicleId", "status"}`` each."""

    def __init__(self, size: int = CALL_LOG_SIZE) -> None:
        self._calls: deque[dict[str, object]] = deque(maxlen=size)

    def record(self, route: str, vehicle_id: str | None, status: int) -> None:
        self._calls.append(
            {"at": round(time.time() * 1000, 1), "route": route, "vehicleId": vehicle_id, "status": status}
        )

    def snapshot(self) -> list[dict[str, object]]:
        return list(self._calls)

    def clear(self) -> None:
        self._calls.clear()
