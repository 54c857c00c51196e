"""Redis's clock as one process sees it: a ``TIME`` at most once a second, carried forward between
by the process's monotonic clock, for times the service writes "by Redis's clock" without a script
(so the processes' own clocks need not agree)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

#: How often ``TIME`` is read again; the monotonic clock drifts far less than a ms in it.
REFRESH_SECONDS = 1.0
#: How long a reading with a shorter round trip is kept over slower ones: a ``TIME`` that waited
#: behind other commands (the worker's client sends one batch at a time) says less about when
#: Redis read its clock.
KEEP_BEST_SECONDS = 30.0


class RedisClock:
    """Epoch ms by Redis's clock, within half the round trip of the reading it is carried from."""

    def __init__(
        self, redis: Any, refresh_seconds: float = REFRESH_SECONDS, keep_best_seconds: float = KEEP_BEST_SECONDS
    ) -> None:
        self._redis = redis
        self._refresh = refresh_seconds
        self._keep_best = keep_best_seconds
        self._offset_ms = 0.0  # Redis's epoch ms less the monotonic clock's ms
        self._round_trip = 0.0  # seconds, of the reading the offset comes from
        self._taken_at: float | None = None  # monotonic seconds of that reading
        self._tried_at = 0.0  # monotonic seconds of the last reading tried
        self._reading: asyncio.Future[None] | None = None

    async def now_ms(self) -> int:
        """Now (the time of the call, not of its return) by Redis's clock, in epoch ms. Only the
        first call waits for Redis; later readings are taken in the background."""
        now = time.monotonic()
        idle = self._reading is None or self._reading.done()
        if idle and (self._taken_at is None or now - self._tried_at >= self._refresh):
            self._tried_at = now
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(_retrieved)
        if self._taken_at is None:
            assert self._reading is not None
            await asyncio.shield(self._reading)  # a failure is raised to the callers that waited
        return int(now * 1000 + self._offset_ms)

    async def _read(self) -> None:
        sent = time.monotonic()
        seconds, micros = await self._redis.time()
        answered = time.monotonic()
        round_trip = answered - sent
        fresh = self._taken_at is None or answered - self._taken_at >= self._keep_best
        if fresh or round_trip <= self._round_trip:
            # Redis read its clock between the two: take the middle.
            self._offset_ms = int(seconds) * 1000 + int(micros) / 1000 - (sent + answered) * 500
            self._round_trip, self._taken_at = round_trip, answered


def _retrieved(reading: asyncio.Future[None]) -> None:
    """A background reading's failure is nobody's to raise: the next call tries again."""
    with contextlib.suppress(asyncio.CancelledError):
        reading.exception()
