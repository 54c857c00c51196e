"""Shared in-flight reads: concurrent events for one vehicle ride on one Smartcar call.

A read may be shared only when it cannot serve stale data: an event may join a call that
*started after the event was received*, because whatever that call returns is at least as new
as anything the event could have asked for. A call that started earlier is never joined; the
event starts its own (which later events may then join).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any


class SharedReads:
    """At most one in-flight call per key that events received before its start may not join."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, tuple[int, asyncio.Future[Any]]] = {}
        self.shared = 0
        """How many reads were served by joining another event's call (for metrics and tests)."""

    async def read(self, key: Hashable, received_at_ms: int, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``call`` for ``key``, or join one already running that started after ``received_at_ms``."""
        running = self._calls.get(key)
        if running is not None and running[0] >= received_at_ms and not running[1].done():
            self.shared += 1
            return await asyncio.shield(running[1])
        started_ms = time.time_ns() // 1_000_000
        future: asyncio.Future[Any] = asyncio.ensure_future(call())
        self._calls[key] = (started_ms, future)
        try:
            return await asyncio.shield(future)
        finally:
            if self._calls.get(key, (0, None))[1] is future:
                del self._calls[key]
