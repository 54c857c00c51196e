"""Which jobs a worker runs: only genuine ingest jobs, never whatever else someone wrote to Redis.

Anyone who can write to Redis can put a job on the queue, and RQ would import and call whatever
function it names. A job refused here goes straight to the failed registry, never run.
"""

from __future__ import annotations

import time

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from core.redis.jobs import PROCESS_EVENT
from workers.batch import Held

#: How long a refused job stays in the failed registry for an operator to look at.
REFUSED_JOB_TTL_SECONDS = 7 * 24 * 3600


def refusal_reason(job: Job) -> str | None:
    """Why ``job`` must not run here, or None for a genuine ingest job.

    Anyone who can write to Redis can put a job on the queue; RQ would import and call whatever
    function it names, and any success, failure or stopped callback it carries. The only job this
    worker runs is ``process_event`` with one plain JSON object argument and no callbacks.
    """
    try:
        func_name = job.func_name
        args, kwargs = job.args, job.kwargs
    except Exception:  # an unreadable job hash is refused, whatever broke in decoding it
        return "the job's data cannot be decoded"
    if func_name != PROCESS_EVENT:
        return "the job names a function other than process_event"
    callbacks = (job._success_callback_name, job._failure_callback_name, job._stopped_callback_name)
    if any(callbacks):
        return "the job carries callbacks"
    if kwargs or len(args) != 1 or not isinstance(args[0], dict):
        return "the job's arguments are not one JSON object"
    return None


def refuse(connection: redis.Redis, queue: Queue, job: Job, reason: str, dequeued: str | None = None) -> None:
    """Move a refused job from the worker's list (``dequeued``) or RQ's intermediate list to the
    failed registry, without running it and without any of its callbacks (RQ's own failure
    handling would call them)."""
    with connection.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue_key, 0, job.id)
        if dequeued is not None:
            pipe.lrem(dequeued, 0, job.id)
        pipe.lrem(queue.key, 0, job.id)
        because = f"Refused by smartcar-ingest: {reason}."
        FailedJobRegistry(queue.name, connection=connection, serializer=JSONSerializer).add(
            job, ttl=REFUSED_JOB_TTL_SECONDS, exc_string=because, pipeline=pipe
        )
        # RQ's tools (rq-dashboard, Job.latest_result) read a failure's text from its result.
        Result.create_failure(job, REFUSED_JOB_TTL_SECONDS, exc_string=because, pipeline=pipe)
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        pipe.execute()


def refuse_unreadable(connection: redis.Redis, queue: Queue, job_id: str, dequeued: str) -> None:
    """Move a job whose hash RQ cannot even load to the failed registry, leaving the hash as found."""
    registry = FailedJobRegistry(queue.name, connection=connection, serializer=JSONSerializer)
    with connection.pipeline() as pipe:
        pipe.lrem(dequeued, 0, job_id)
        pipe.zadd(registry.key, {job_id: time.time() + REFUSED_JOB_TTL_SECONDS})
        pipe.hset(Job.key_for(job_id), "status", JobStatus.FAILED.value)
        pipe.execute()


def refuse_claimed(
    connection: redis.Redis, queue: Queue, held: Held, reason: str, dequeued: str, max_body_bytes: int
) -> None:
    """Refuse a job this worker claimed: :func:`refuse`, or :func:`refuse_unreadable` when its hash
    is too large to load (:meth:`Held.oversized`) or cannot even be loaded as an RQ job."""
    if held.oversized(max_body_bytes):
        refuse_unreadable(connection, queue, held.job_id, dequeued)
        return
    try:
        job = held.job(connection)
    except Exception:
        refuse_unreadable(connection, queue, held.job_id, dequeued)
        return
    refuse(connection, queue, job, reason, dequeued)
