"""RQ job functions. Each takes plain JSON data and is importable as ``workers.jobs.<name>``."""

from __future__ import annotations

from rq import get_current_job

from core import metrics
from core.errors import InvalidJob
from core.logs import get_logger
from core.redis.jobs import JobPayload, spliced_body
from workers import runtime
from workers.processor import JobResult

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


async def run_event(
    payload: JobPayload,
    final_attempt: bool,
    budget_seconds: float,
    check_published: bool = True,
    using: runtime.Runtime | None = None,
) -> JobResult:
    """Process one checked payload on the running loop (see :mod:`workers.processor`) with the
    installed runtime, the worker's own path, or with ``using``.

    A transient failure is raised so that RQ re-runs the job; on RQ's last attempt
    (``final_attempt``) the event is parked instead. The lookup and the Smartcar calls get at most
    ``budget_seconds``. Without ``using``, the worker runtime must be installed (``smartcar-ingest
    worker`` does it).
    """
    processor = await (using or runtime.current()).processor()
    return await processor.process(
        payload, final_attempt=final_attempt, budget_seconds=budget_seconds, check_published=check_published
    )


def job_budget(timeout: float | None, default: int) -> float:
    """Seconds a job may spend: its RQ timeout less a margin, so it stops itself before RQ would."""
    return max(1.0, (timeout or default) - 5)


async def process_event(payload: object) -> JobResult:
    """The job function the queue's jobs name, as RQ would call it (a coroutine, run by RQ's
    ``Job.perform`` in a stock worker, on a new event loop per job; ``smartcar-ingest worker``
    calls :func:`run_event` directly, on its own loop).

    ``payload`` is a :class:`~core.redis.jobs.JobPayload` as written by the web process or by
    ``replay``; it is checked before anything else. One of another shape fails the job at once
    with :class:`InvalidJob`, without retries: running it again cannot change its argument.
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
    # RQ runs each coroutine job on a loop of its own: clients are opened for this job and closed after it.
    scoped = runtime.Runtime(runtime.current().settings, max_connections=10)
    budget = job_budget(job.timeout if job else None, scoped.settings.job_timeout_seconds)
    try:
        return await run_event(
            checked, final_attempt=job is None or not job.retries_left, budget_seconds=budget, using=scoped
        )
    finally:
        await scoped.aclose()
