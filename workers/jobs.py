"""Ingest jobs: which claimed jobs run (only ``process_event`` with one JSON object and no callbacks;
anything else is refused, never run: docs/security.md) and the payload each carries."""

from __future__ import annotations

import time
from typing import Any

import pydantic_core
import redis
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from core.errors import ConfigurationError, InvalidJob
from core.logs import get_logger
from core.redis.jobs import PROCESS_EVENT, JobPayload, inflated, spliced_parts
from workers.batch import ClaimedJob

log = get_logger("smartcar_ingest.worker")

#: How long a refused job stays in the failed registry for an operator to look at.
REFUSED_JOB_TTL_SECONDS = 7 * 24 * 3600
#: The keys of a job payload that must hold text.
_TEXT_KEYS = ("eventId", "eventType", "body")
_CALLBACKS = (b"success_callback_name", b"failure_callback_name", b"stopped_callback_name")
#: What a job's data holds beyond the delivery's body: the function, ids and options.
JOB_ENVELOPE_BYTES = 65_536


def admit(claimed_job: ClaimedJob, connection: redis.Redis, max_body_bytes: int) -> JobPayload | InvalidJob | str:
    """The payload of an ingest job; :class:`InvalidJob` for one whose argument is not a payload (it
    fails in RQ); for any other job, why it is refused (text)."""
    limit = max_body_bytes + JOB_ENVELOPE_BYTES
    data = inflated(claimed_job.fields.get(b"data", b""), limit)
    if data is None or inflated(claimed_job.fields.get(b"exc_info", b""), limit) is None:
        return f"the job's data is larger than a delivery of MAX_BODY_BYTES ({max_body_bytes}) needs"
    if any(claimed_job.fields.get(name) for name in _CALLBACKS):
        return "the job carries callbacks"
    try:
        spliced = _spliced(data)
        if spliced is not None:
            fields, body = spliced
            return read_payload(fields | {"body": body})
        try:
            job = claimed_job.job(connection)
            func_name, args, kwargs = job.func_name, job.args, job.kwargs
        except Exception:  # a hash RQ cannot load or decode is refused, whatever broke
            return "the job's data cannot be decoded"
        if func_name != PROCESS_EVENT:
            return "the job names a function other than process_event"
        if kwargs or len(args) != 1 or not isinstance(args[0], dict):
            return "the job's arguments are not one JSON object"
        return read_payload(args[0], job.data)
    except InvalidJob as exc:
        return exc


def refuse(connection: redis.Redis, queue_name: str, job_id: str, reason: str, dequeued: str | None) -> None:
    """Move a refused job, never loaded, from the worker's list (``dequeued``; None: the scheduler
    took it out of its registry) to RQ's failed registry."""
    unloaded = Job(job_id, connection=connection, serializer=JSONSerializer)  # its id only
    registry = FailedJobRegistry.key_template.format(queue_name)
    with connection.pipeline() as pipe:
        if dequeued is not None:
            pipe.lrem(dequeued, 0, job_id)
        pipe.zadd(registry, {job_id: time.time() + REFUSED_JOB_TTL_SECONDS})
        unloaded.set_status(JobStatus.FAILED, pipeline=pipe)
        pipe.expire(unloaded.key, REFUSED_JOB_TTL_SECONDS)
        # RQ's tools (rq-dashboard, Job.latest_result) read a failure's text from its result.
        because = f"Refused by smartcar-ingest: {reason}."
        Result.create_failure(unloaded, REFUSED_JOB_TTL_SECONDS, exc_string=because, pipeline=pipe)
        pipe.execute()
    log.error("refused a job that is not an ingest job", jobId=job_id, reason=reason)


def _spliced(data: bytes) -> tuple[dict[str, Any], str] | None:
    """The payload's fields and the body's text of an edge-written job's data (inflated); None for any other job."""
    parts = spliced_parts(data)
    if parts is None:
        return None
    try:
        fields = pydantic_core.from_json(parts[0])
    except ValueError:
        return None
    return (fields, parts[1]) if isinstance(fields, dict) else None


def read_payload(value: dict[str, Any], data: bytes | None = None) -> JobPayload:
    """``value`` as a :class:`JobPayload` (a body RQ handed over parsed is read from ``data``), or
    :class:`InvalidJob` naming the wrong keys, never a value (a body carries locations and VINs)."""
    fields = dict(value)
    if isinstance(fields.get("body"), dict) and data is not None:
        parts = spliced_parts(data)
        fields["body"] = None if parts is None else parts[1]
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


def process_event(payload: object) -> None:
    """The function the queue's jobs name, never called by ``smartcar-ingest worker``: a stock RQ worker fails them."""
    raise ConfigurationError(
        "ingest jobs run under `smartcar-ingest worker`, which processes them on its own event loop; "
        "a stock RQ worker cannot run them."
    )
