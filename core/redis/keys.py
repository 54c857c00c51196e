"""Every Redis key this service names, in one place.

Besides RQ's own keys (``rq:*``, written through RQ's classes or in RQ's layout) and the two
streams named by settings (``OUTPUT_STREAM``, ``PARKED_STREAM``), the service owns these:

========================================================  =====================================================
``smartcar-ingest:seen:<job id>``                          an accepted ``eventId`` (edge dedupe), ``DEDUPE_TTL``
``smartcar-ingest:parked:<job id>``                        a parked ``eventId``: parked once, ``DEDUPE_TTL``
``smartcar-ingest:published:<job id>``                     an ``eventId`` on the output stream, ``DEDUPE_TTL``
``smartcar-ingest:dequeued:<queue>:<worker>``              job ids a worker took but has not started
``smartcar-ingest:worker-alive:<worker>``                  a live worker's heartbeat key
``smartcar-ingest:liveness-workers``                       the workers that announced themselves
``smartcar-ingest:app-token`` (and ``:lock``)              the sealed application token and its refresh lock
``smartcar-ingest:connect-state:<digest>``                 a redeemed Connect ``state``
========================================================  =====================================================

The ``<job id>`` is :func:`job_id_for` the ``eventId``: the id itself when RQ accepts it, else a
digest, so an id from the wire never shapes a key beyond ``[A-Za-z0-9_-]``.
"""

from __future__ import annotations

import hashlib
import re

from rq.queue import Queue

#: Prefix of every key this service owns besides RQ's and the streams.
SERVICE_PREFIX = "smartcar-ingest:"
#: Prefix of RQ's keys and channels.
RQ_PREFIX = "rq:"

DEDUPE_PREFIX = SERVICE_PREFIX + "seen:"
PARKED_MARK_PREFIX = SERVICE_PREFIX + "parked:"
PUBLISHED_PREFIX = SERVICE_PREFIX + "published:"
DEQUEUED_PREFIX = SERVICE_PREFIX + "dequeued:"
ALIVE_PREFIX = SERVICE_PREFIX + "worker-alive:"
WORKERS_SET = SERVICE_PREFIX + "liveness-workers"
TOKEN_KEY = SERVICE_PREFIX + "app-token"
TOKEN_LOCK_KEY = TOKEN_KEY + ":lock"
CONNECT_STATE_PREFIX = SERVICE_PREFIX + "connect-state:"

#: How RQ's job ids may look; an eventId that fits is used as the job id unchanged.
_JOB_ID_SAFE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def job_id_for(event_id: str) -> str:
    """The RQ job id for an event: the ``eventId`` itself when RQ accepts it, else a digest of it.

    One job per ``eventId``: the id is a pure function of it, so a replay, a redelivery and an
    operator all find the same job.
    """
    if _JOB_ID_SAFE.fullmatch(event_id):
        return event_id
    return "evt-" + hashlib.sha256(event_id.encode()).hexdigest()[:40]


def dedupe_key(event_id: str) -> str:
    """Remembers an accepted ``eventId`` for ``DEDUPE_TTL_SECONDS``."""
    return DEDUPE_PREFIX + job_id_for(event_id)


def parked_key(event_id: str) -> str:
    """Remembers a parked ``eventId``, so a retried job or a redelivery parks it once.

    Kept apart from :func:`dedupe_key` so that parking a broken delivery never blocks a later
    valid delivery of the same event.
    """
    return PARKED_MARK_PREFIX + job_id_for(event_id)


def published_key(event_id: str) -> str:
    """Records that an ``eventId`` reached the output stream."""
    return PUBLISHED_PREFIX + job_id_for(event_id)


def queue_key(queue: str) -> str:
    """RQ's list of queued job ids."""
    return f"{Queue.redis_queue_namespace_prefix}{queue}"


def rq_intermediate_key(queue_name: str) -> str:
    """RQ's own list of ids between dequeue and start, shared by every stock RQ worker."""
    return queue_key(queue_name) + ":intermediate"


def alive_key(worker_name: str) -> str:
    """The key a live worker keeps fresh; it expires soon after the worker dies."""
    return ALIVE_PREFIX + worker_name


def dequeued_key(queue_name: str, worker_name: str) -> str:
    """The list holding the ids ``worker_name`` has taken from ``queue_name`` but not yet started."""
    return f"{DEQUEUED_PREFIX}{queue_name}:{worker_name}"


def connect_state_key(digest: str) -> str:
    """Marks a Connect ``state`` (by its digest) as redeemed."""
    return CONNECT_STATE_PREFIX + digest


def text(value: object) -> str:
    """A Redis reply as text: bytes decoded as UTF-8 (invalid bytes replaced), anything else ``str()``."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
