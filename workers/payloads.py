"""A claimed job's hash → the payload to process, or why the job must not run.

Jobs the web edge writes embed the delivery verbatim (:func:`core.redis.jobs.spliced_job_data`):
their function, argument shape and body are read straight from the bytes of ``data``, without
building an RQ job or decoding the body twice. Any other job (written by ``replay``, by RQ's own
``Queue.enqueue``, or by someone else) is loaded by RQ and checked as RQ would run it
(:func:`workers.admission.refusal_reason`, :func:`workers.jobs.read_payload`).
"""

from __future__ import annotations

from typing import Any

import pydantic_core
import redis

from core.redis.jobs import JobPayload, spliced_body, spliced_head
from workers.admission import refusal_reason
from workers.batch import Held
from workers.jobs import read_payload

_CALLBACKS = (b"success_callback_name", b"failure_callback_name", b"stopped_callback_name")


def _spliced(held: Held) -> tuple[dict[str, Any], str] | None:
    """The payload's fields and the body's text of an edge-written job; None for any other job."""
    data = held.fields.get(b"data", b"")
    if any(held.fields.get(name) for name in _CALLBACKS):
        return None
    head, body = spliced_head(data), spliced_body(data)
    if head is None or body is None:
        return None
    try:
        fields = pydantic_core.from_json(head)
    except ValueError:
        return None
    return (fields, body) if isinstance(fields, dict) else None


def refusal_of(held: Held, connection: redis.Redis, max_body_bytes: int) -> str | None:
    """Why the claimed job must not run here, or None for a genuine ingest job."""
    if held.oversized(max_body_bytes):
        return f"the job's data is larger than a delivery of MAX_BODY_BYTES ({max_body_bytes}) needs"
    if _spliced(held) is not None:
        return None
    try:
        job = held.job(connection)
    except Exception:  # a hash RQ cannot load is refused like any job this worker will not run
        return "the job's data cannot be decoded"
    return refusal_reason(job)


def read_held(held: Held, connection: redis.Redis) -> JobPayload:
    """The job's :class:`JobPayload`, or :class:`core.errors.InvalidJob` saying what is wrong (for a
    job :func:`refusal_of` admitted)."""
    spliced = _spliced(held)
    if spliced is not None:
        fields, body = spliced
        return read_payload(fields | {"body": body})
    job = held.job(connection)
    return read_payload(job.args[0] if job.args else None, job.data)
