"""RQ job functions. Each takes plain JSON data and is importable as ``workers.jobs.<name>``."""

from __future__ import annotations

from typing import Any

from rq import get_current_job

from workers import runtime


def process_event(payload: dict[str, Any]) -> dict[str, Any]:
    """Process one accepted delivery (see :mod:`workers.processor`).

    ``payload`` is the dict written by :func:`core.inbox.job_payload`. A transient failure is
    raised so that RQ re-runs the job; on RQ's last attempt the event is parked instead.
    """
    job = get_current_job()
    final_attempt = job is None or not job.retries_left
    current = runtime.current()
    # Stop a stuck job ourselves, shortly before RQ's own timeout would kill it mid-write.
    budget = max(1.0, (job.timeout if job and job.timeout else current.settings.job_timeout_seconds) - 5)

    async def run() -> dict[str, Any]:
        processor = await current.processor()
        outcome = await processor.process(payload, final_attempt=final_attempt, budget_seconds=budget)
        return outcome.as_dict()

    return current.run(run(), timeout=budget + 15)
