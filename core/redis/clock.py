"""Redis's clock as one process sees it: a ``TIME`` at most once a second, carried forward between
by the process's monotonic clock, for times the service writes "by Redis's clock" without a script
(so the processes' own clocks need not agree)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

#: How long one ``TIME`` serves before the next; the monotonic clock drifts far less than a ms in it.
REFRESH_SECONDS = 1.0


class RedisClock:
    """Epoch ms by Redis's clock, within half the round trip of the last ``TIME``."""

    def __init__(self, redis: Any, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self._redis = redis
        self._refresh = refresh_seconds
        self._offset_ms = 0.0  # Redis's epoch ms less the monotonic clock's ms
        self._read_at: float | None = None  # monotonic seconds of the last TIME
        self._reading: asyncio.Future[None] | None = None

    async def now_ms(self) -> int:
        """Now (the time of the call, not of its return) by Redis's clock, in epoch ms."""
        now = time.monotonic()
        if self._read_at is None or now - self._read_at >= self._refresh:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.ensure_future(self._read())
            await asyncio.shield(self._reading)
        return int(now * 1000 + self._offset_ms)

    async def _read(self) -> None:
        sent = time.monotonic()
        seconds, micros = await self._redis.time()
        answered = time.monotonic()
        # Redis read its clock between the two: take the middle.
        redis_ms = int(seconds) * 1000 + int(micros) / 1000
        self._offset_ms = redis_ms - (sent + answered) * 500
        self._read_at = answered
