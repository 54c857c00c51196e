"""RQ job functions. Each takes plain JSON data and is importable as ``workers.jobs.<name>``."""

from __future__ import annotations

from typing import Any

from rq import get_current_job

from core import metrics
from core.errors import InvalidJob
from core.logs import get_logger
from core.redis.jobs import JobPayload, spliced_body
from workers import runtime

log = get_logger("smartcar_ingest.worker")

#: The keys of a job payload that must hold text.
_TEXT_KEYS = ("eventId", "eventType", "body")


def read_payload(value: object, data: bytes | None = None) -> JobPayload:
    """``value`` as a :class:`JobPayload`, or :class:`InvalidJob` saying which keys are wrong.

    The message names keys and types only, never a value (a body carries locations and VINs).
    Keys beyond the four of a job payload are ignored, so jobs written by a newer web process
    during a rolling upgrade still run here.

    The web edge embeds a delivery's body in the job verbatim, so RQ hands it over parsed (a
    dict): its exact text is then taken from the job's ``data`` (:func:`core.redis.jobs.spliced_body`).
    """
    if not isinstance(value, dict):
        raise InvalidJob(
            f"Refused by smartcar-ingest: the job's argument is a {type(value).__name__}, not a job payload."
        )
    fields = dict(value)
    if isinstance(fields.get("body"), dict) and data is not None:
        fields["body"] = spliced_body(data)
    problems = [f"{key} is missing or not a string" for key in _TEXT_KEYS if not isinstance(fields.get(key), str)]
    if fields.get("eventId") == "":
        problems.append("eventId is empty")
    received_at = fields.get("receivedAt")
    if isinstance(received_at, bool) or not isinstance(received_at, int) or received_at < 0:
        problems.append("receivedAt is missing or not a whole number of milliseconds")
        received_at = 0
    if problems:
        raise InvalidJob(f"Refused by smartcar-ingest: the job's argument is not a job payload: {'; '.join(problems)}.")
    return {
        "eventId": fields["eventId"],
        "eventType": fields["eventType"],
        "body": fields["body"],
        "receivedAt": received_at,
    }


def process_event(payload: object) -> dict[str, Any]:
    """Process one accepted delivery (see :mod:`workers.processor`).

    ``payload`` is a :class:`~core.redis.jobs.JobPayload` as written by the web process or by
    ``replay``; it is checked before anything else. One of another shape fails the job at once
    with :class:`InvalidJob`, without retries: running it again cannot change its argument.
    A transient failure is raised so that RQ re-runs the job; on RQ's last attempt the event is
    parked instead. The worker runtime must be installed (``smartcar-ingest worker`` does it).
    """
    job = get_current_job()
    try:
        checked = read_payload(payload, job.data if job is not None else None)
    except InvalidJob as exc:
        if job is not None:
            # RQ retries a failed job while it has retries left; this one goes straight to the
            # failed registry, with the message above as its reason.
            job.retries_left = 0
        metrics.JOBS.labels(outcome="error").inc()
        log.error(
            "refused a job whose argument is not a job payload", jobId=job.id if job else None, reason=exc.message
        )
        raise
    final_attempt = job is None or not job.retries_left
    current = runtime.current()
    # Stop a stuck job ourselves, shortly before RQ's own timeout would kill it mid-write.
    budget = max(1.0, (job.timeout if job and job.timeout else current.settings.job_timeout_seconds) - 5)

    async def run() -> dict[str, Any]:
        processor = await current.processor()
        outcome = await processor.process(checked, final_attempt=final_attempt, budget_seconds=budget)
        return outcome.as_dict()

    return current.run(run(), timeout=budget + 15)
