"""``smartcar-ingest worker`` that SIGKILLs (or freezes) itself the n-th time it reaches a named step.

``python -m tests.drills.halting_worker <point>:<n>[:stop] worker --concurrency 4`` wraps one of the
worker's steps in this process, then runs the ``worker`` command as ``smartcar-ingest`` would. Drills
force the interleavings that lose jobs with it instead of hoping that a timed kill lands in one; the
product holds no hook for them. The points:

* ``dequeued``: a claim moved jobs into the worker's list, their executions not yet recorded;
* ``prepared``: the executions are recorded, the jobs not yet started;
* ``checked``: a publish checked its events' marks and states, its transaction not yet sent;
* ``returned``: a job returned (its event published and merged), RQ not yet told.

A ``:stop`` suffix freezes the process (SIGSTOP) instead, for the drill to resume it with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from cli.main import main
from core.redis import published
from workers import batch, processor, worker

Step = Callable[..., Coroutine[Any, Any, Any]]

#: Where each point is: the step wrapped, and whether the halt comes before it runs or after it returned.
POINTS: dict[str, tuple[object, str, bool]] = {
    "dequeued": (worker.AsyncWorker, "_start", True),
    "prepared": (batch.Bookkeeping, "start", False),
    "checked": (published.OutputStream, "_check", False),
    "returned": (processor.EventProcessor, "process", False),
}


def install(spec: str) -> None:
    """Wrap the step of ``spec`` (``<point>:<n>[:stop]``) so that its n-th pass halts this process."""
    point, count, *action = spec.split(":")
    owner, name, before = POINTS[point]
    step: Step = getattr(owner, name)  # a renamed step fails here, loudly, not by never halting
    halt = signal.SIGSTOP if action == ["stop"] else signal.SIGKILL
    passes = 0

    def reached() -> None:
        nonlocal passes
        passes += 1
        if passes == int(count):
            os.kill(os.getpid(), halt)

    async def halting(*args: Any, **kwargs: Any) -> Any:
        if before:
            reached()
        result = await step(*args, **kwargs)
        if not before:
            reached()
        return result

    setattr(owner, name, halting)


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
