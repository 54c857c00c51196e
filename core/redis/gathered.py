"""Figures gathered in memory and written to Redis once a second, not once per event.

The workers count what every event cost (:class:`core.smartcar.usage.Usage`) and which vehicles
were active (:class:`core.redis.fleet.FleetActivity`). Writing each event's share as it happens
would add round trips to every event; instead each adds to what is pending, and the first
addition after a write schedules the next one, :attr:`Gathered.flush_seconds` later. What is
pending when the process dies unannounced is lost: these are statistics, not data.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

from redis.exceptions import RedisError

from core.logs import get_logger

log = get_logger("smartcar_ingest.gathered")


class Gathered(ABC):
    """The schedule of the writes; a subclass holds what is pending and writes it in :meth:`flush`."""

    #: Logged (with the error's type) when a scheduled write fails.
    failure_message = "gathered figures not written"

    def __init__(self, flush_seconds: float) -> None:
        self.flush_seconds = flush_seconds
        self._flusher: asyncio.Task[None] | None = None

    def _write_soon(self) -> None:
        """Schedule a write unless one is scheduled: call after adding to what is pending."""
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.flush_seconds)
        try:
            await self.flush()
        except (RedisError, OSError) as exc:  # nothing waits on these figures: log and go on
            log.warning(self.failure_message, error=type(exc).__name__)

    @abstractmethod
    async def flush(self) -> None:
        """Write what is pending, in one round trip, and forget it."""

    async def aclose(self) -> None:
        """Write what is pending (at shutdown)."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
        await self.flush()
