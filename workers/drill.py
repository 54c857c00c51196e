"""A hook for the drills (tests/drills) to halt a worker at a named step of the job hand-over.

Drills force the interleavings that lose jobs instead of hoping that a timed kill lands in one.
Unset, as in production, the hook does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

#: ``<point>:<n>[:stop]``, see :class:`DrillHalt`.
DRILL_HALT_ENV = "SMARTCAR_INGEST_DRILL_HALT"


class DrillHalt:
    """Drills only: SIGKILL (or SIGSTOP) this process the n-th time it reaches a named step.

    ``SMARTCAR_INGEST_DRILL_HALT=dequeued:3`` kills the worker right after its third dequeue moved
    a job into its list, before the execution is recorded; ``prepared:3`` right after the third
    execution is recorded, before the job starts; ``returned:3`` right after the third job returned
    (its event published and merged), before RQ records it; a ``:stop`` suffix freezes it instead, for the
    drill to resume with SIGCONT. Unset, as in production, it does nothing.
    """

    def __init__(self, spec: str | None) -> None:
        point, _, rest = (spec or "").partition(":")
        count, _, action = rest.partition(":")
        self._point = point
        self._at = int(count) if count.isdigit() else 0
        self._signal = signal.SIGSTOP if action == "stop" else signal.SIGKILL
        self._seen = 0
        self._lock = threading.Lock()

    def reach(self, point: str) -> None:
        if point != self._point:
            return
        with self._lock:
            self._seen += 1
            hit = self._seen == self._at
        if hit:
            os.kill(os.getpid(), self._signal)
