"""Deadlines for many requests on one timer (the webhook's body read and its Redis write)."""

from __future__ import annotations

import asyncio
from typing import Any


class Deadlines:
    """The deadlines of many requests on one timer, in place of ``asyncio.timeout``.

    Why: two ``asyncio.timeout`` a delivery cost 9-11 µs more CPU (5-6 % on the fleet mix;
    docs/performance.md). A request registers its task with the time it must be done by; one
    callback, run every ``tick`` seconds while any request is registered, cancels each task whose
    time has passed, and :meth:`timed_out` tells that apart from any other cancellation. A deadline
    fires up to ``tick`` late, so :meth:`start` registers ``seconds - tick``.
    """

    def __init__(self, tick: float = 0.05) -> None:
        self._tick = tick
        #: Registered tasks: when they must be done by, and how many cancellations they had then.
        self._due: dict[asyncio.Task[Any], tuple[float, int]] = {}
        #: Tasks cancelled by their deadline, not yet told (:meth:`timed_out`).
        self._fired: dict[asyncio.Task[Any], int] = {}
        #: The loop the sweep runs on (None while no request is registered).
        self._armed: asyncio.AbstractEventLoop | None = None

    def start(self, seconds: float, task: asyncio.Task[Any] | None = None) -> asyncio.Task[Any]:
        """Give ``task`` (by default the current one) ``seconds`` (less one tick) to finish what it
        waits for next; returns the task, for :meth:`timed_out` and :meth:`stop`."""
        if task is None:
            task = asyncio.current_task()
            assert task is not None, "a deadline belongs to a task"
        loop = task.get_loop()
        self._due[task] = (loop.time() + max(0.0, seconds - self._tick), task.cancelling())
        if self._armed is not loop:
            self._armed = loop
            loop.call_later(self._tick, self._sweep, loop)
        return task

    def stop(self, task: asyncio.Task[Any]) -> None:
        """The wait is over: forget ``task``'s deadline (whether or not it fired)."""
        self._due.pop(task, None)
        self._fired.pop(task, None)

    def timed_out(self, task: asyncio.Task[Any]) -> bool:
        """In an ``except CancelledError``: True when the cancellation is the deadline's alone (it
        is then withdrawn, as ``asyncio.timeout`` does); False when it must propagate."""
        cancelling = self._fired.pop(task, None)
        return cancelling is not None and task.uncancel() <= cancelling

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._armed:
            return  # the endpoint moved to another loop (tests), which runs its own sweep
        now = loop.time()
        late = [task for task, (due, _) in self._due.items() if due <= now or task.get_loop() is not loop]
        for task in late:
            _, cancelling = self._due.pop(task)
            if task.get_loop() is loop:
                self._fired[task] = cancelling
                task.cancel()
        if self._due:
            loop.call_later(self._tick, self._sweep, loop)
        else:
            self._armed = None
