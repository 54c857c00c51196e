"""The RQ job that carries one accepted delivery, a regular RQ job holding the body exactly as
received (docs/architecture.md, "Accepting a delivery")."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from isal import isal_zlib
from pydantic_core import to_json
from redis import Redis
from rq import Queue, Retry
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from core.config import DEFAULT_JOB_RESULT_TTL_SECONDS, Settings
from core.redis.keys import job_id_for

PROCESS_EVENT = "workers.jobs.process_event"

#: Waits between RQ re-runs of a job that failed with a transient error (seconds).
RETRY_INTERVALS = (5, 15, 60, 180, 600)


class JobPayload(TypedDict):
    """The single JSON argument of ``process_event``: the delivery as received, and when."""

    eventId: str
    eventType: str
    body: str
    receivedAt: int


def job_payload(event_id: str, event_type: str, body: str, received_at_ms: int) -> JobPayload:
    return {"eventId": event_id, "eventType": event_type, "body": body, "receivedAt": received_at_ms}


@dataclass(frozen=True)
class JobOptions:
    """How RQ should run ingest jobs."""

    queue: str
    timeout_seconds: int = 120
    retries: int = 5
    result_ttl_seconds: int = DEFAULT_JOB_RESULT_TTL_SECONDS
    failure_ttl_seconds: int = 7 * 24 * 3600

    @classmethod
    def from_settings(cls, settings: Settings) -> JobOptions:
        return cls(
            queue=settings.ingest_queue,
            timeout_seconds=settings.job_timeout_seconds,
            retries=settings.job_retries,
            result_ttl_seconds=settings.job_result_ttl_seconds,
        )


#: The queue of :func:`build_job_hash` only builds the job: this connection never talks to Redis.
_NO_CONNECTION = Redis(host="unused.invalid")


def build_job_hash(payload: Mapping[str, Any], options: JobOptions) -> tuple[str, dict[str, Any]]:
    """Return ``(job_id, mapping)``: the RQ job hash that ``Queue.enqueue`` would have written."""
    job_id = job_id_for(str(payload["eventId"]))
    queue = Queue(options.queue, connection=_NO_CONNECTION, serializer=JSONSerializer)
    job = queue.create_job(
        PROCESS_EVENT,
        args=[dict(payload)],
        job_id=job_id,
        # Describe the job by type and id only: the default would embed the whole body
        # (locations, VINs) in rq-dashboard and in worker logs.
        description=f"process_event({payload['eventType']} {payload['eventId']})",
        timeout=options.timeout_seconds,
        result_ttl=options.result_ttl_seconds,
        failure_ttl=options.failure_ttl_seconds,
        retry=Retry(options.retries, list(RETRY_INTERVALS[: options.retries])) if options.retries else None,
    )
    job.enqueued_at = now()
    return job_id, job.to_dict() | {"status": JobStatus.QUEUED.value}


# The data of a job whose body is spliced in: the JSON of ``(func, None, [payload], {})`` with the
# body, last, as a JSON value rather than a string.
_SPLICED_HEAD = b'["' + PROCESS_EVENT.encode() + b'",null,[{"eventId":'
_SPLICED_BODY = b',"body":'
_SPLICED_TAIL = b"}],{}]"
_SPLICED = _SPLICED_HEAD + b'%s,"eventType":%s,"receivedAt":%d' + _SPLICED_BODY + b"%s" + _SPLICED_TAIL


def spliced_job_data(event_id: str, event_type: str, body: bytes, received_at_ms: int) -> bytes:
    """A job's ``data`` with ``body`` embedded verbatim: JSON that Python's ``json`` reads (no NaN or
    Infinity); :func:`spliced_parts` takes an object back, a string is left to RQ."""
    return _SPLICED % (to_json(event_id), to_json(event_type), received_at_ms, body)


def deflated(data: bytes) -> bytes:
    """A job's data as the edge stores it: a zlib stream, as RQ stores every job's data and inflates it
    (``Job.restore``), made by ISA-L at its level 1 (a quarter of the stdlib's CPU for a smaller stream:
    docs/performance.md, "The job's data deflated")."""
    return isal_zlib.compress(data, 1)


def inflated(raw: bytes, limit: int) -> bytes | None:
    """A job field as RQ reads it (a whole zlib stream inflated by the stdlib's zlib, as RQ does; else
    as it is), or None when that, or a stream's inflation so far, is longer than ``limit``: at most
    ``limit + 1`` bytes are inflated."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(raw, limit + 1)
    except zlib.error:  # not zlib: RQ keeps it as it is
        data = raw
    else:
        if not inflater.eof and len(data) <= limit:  # a stream cut short, which RQ keeps as it is too
            data = raw
    return data if len(data) <= limit else None


def spliced_parts(data: bytes) -> tuple[bytes, str] | None:
    """The fields before a spliced object body as a JSON object, and the body as delivered; None for
    any other data (why unambiguous: docs/architecture.md, "Accepting a delivery")."""
    if not (data.startswith(_SPLICED_HEAD) and data.endswith(_SPLICED_TAIL)):
        return None
    start = data.find(_SPLICED_BODY, len(_SPLICED_HEAD))
    body = data[start + len(_SPLICED_BODY) : len(data) - len(_SPLICED_TAIL)]
    if start < 0 or body.lstrip(b" \t\r\n")[:1] != b"{":  # spliced as delivered, whitespace included
        return None
    try:
        return b'{"eventId":' + data[len(_SPLICED_HEAD) : start] + b"}", body.decode("utf-8")
    except UnicodeDecodeError:
        return None
