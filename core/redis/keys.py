"""Every Redis key this service names; an id from the wire never shapes a key beyond
``[A-Za-z0-9_-]``. What each key holds: docs/architecture.md, "Redis keys"."""

from __future__ import annotations

import hashlib
import re

from rq.queue import Queue

SERVICE_PREFIX = "smartcar-ingest:"
RQ_PREFIX = "rq:"

EVENT_IDS_KEY = SERVICE_PREFIX + "event-ids"
PARKED_IDS_KEY = SERVICE_PREFIX + "parked-ids"
#: Per-key marks of earlier versions, consulted only during the legacy window (core.redis.dedupe).
DEDUPE_PREFIX = SERVICE_PREFIX + "seen:"
PARKED_MARK_PREFIX = SERVICE_PREFIX + "parked:"
PUBLISHED_PREFIX = SERVICE_PREFIX + "published:"
#: Watched by every publisher of an event and set by the one that publishes it (core.redis.published).
PUBLISHING_PREFIX = SERVICE_PREFIX + "publishing:"
DEQUEUED_PREFIX = SERVICE_PREFIX + "dequeued:"
#: A job hash the edge wrote in the transaction that enqueues it, renamed or deleted by the same transaction.
STAGED_JOB_PREFIX = SERVICE_PREFIX + "staged:"
ALIVE_PREFIX = SERVICE_PREFIX + "worker-alive:"
WORKERS_SET = SERVICE_PREFIX + "liveness-workers"
TOKEN_KEY = SERVICE_PREFIX + "app-token"
TOKEN_LOCK_KEY = TOKEN_KEY + ":lock"
CONNECT_STATE_PREFIX = SERVICE_PREFIX + "connect-state:"
BUDGET_KEY = SERVICE_PREFIX + "budget"
APPLICATION_PAUSE_KEY = SERVICE_PREFIX + "pause:application"
USAGE_PREFIX = SERVICE_PREFIX + "usage:"
#: The shared reads' hashes, and the answers window-0 reads keep. Their answers are stored compressed since
#: issue 27's eleventh part, and got these names with that format (earlier releases used ``read:``), so
#: that during a rolling upgrade a worker of an earlier release never meets an answer it cannot parse.
READ_PREFIX = SERVICE_PREFIX + "read2:"

#: How RQ's job ids may look; an eventId that fits is used as the job id unchanged.
_JOB_ID_SAFE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_VEHICLE_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def job_id_for(event_id: str) -> str:
    """The ``eventId`` itself when RQ accepts it, else ``evt-`` and a digest (so no literal ``eventId``
    takes the job and mark of another event): a replay, a redelivery and an operator find the same job."""
    if _JOB_ID_SAFE.fullmatch(event_id) and not event_id.startswith("evt-"):
        return event_id
    return "evt-" + hashlib.sha256(event_id.encode()).hexdigest()[:40]


def queue_key(queue: str) -> str:
    return f"{Queue.redis_queue_namespace_prefix}{queue}"


def rq_intermediate_key(queue_name: str) -> str:
    """RQ's own list of ids between dequeue and start, shared by every stock RQ worker."""
    return queue_key(queue_name) + ":intermediate"


def alive_key(worker_name: str) -> str:
    return ALIVE_PREFIX + worker_name


def dequeued_key(queue_name: str, worker_name: str) -> str:
    return f"{DEQUEUED_PREFIX}{queue_name}:{worker_name}"


def vehicle_state_key(prefix: str, vehicle_id: str) -> str:  # the parser held the id to [A-Za-z0-9_-]{1,64}
    return prefix + vehicle_id


def _vehicle_part(vehicle_id: str) -> str:
    if _VEHICLE_SAFE.fullmatch(vehicle_id):
        return vehicle_id
    return "v-" + hashlib.sha256(vehicle_id.encode()).hexdigest()[:40]


def read_key(call: str, vehicle_id: str, user_id: str) -> str:
    """The user id is free text from the wire, so only its digest is used."""
    user = hashlib.sha256(user_id.encode()).hexdigest()[:24]
    return f"{READ_PREFIX}{call}:{_vehicle_part(vehicle_id)}:{user}"


def latest_read_key(key: str) -> str:
    """Where a window-0 read of ``key`` (a :func:`read_key`) keeps its answer for a later skipped read."""
    return key + ":latest"


def vehicle_pause_key(vehicle_id: str) -> str:
    return f"{SERVICE_PREFIX}pause:vehicle:" + _vehicle_part(vehicle_id)


def usage_key(minute: int) -> str:
    """``minute``: epoch seconds // 60."""
    return f"{USAGE_PREFIX}{minute}"


def fleet_key(kind: str, bucket: int) -> str:
    """``kind``: ``active`` or ``errors``; ``bucket``: epoch seconds // bucket length."""
    return f"{SERVICE_PREFIX}fleet:{kind}:{bucket}"


def text(value: object) -> str:
    """A Redis reply as text: bytes decoded as UTF-8 (invalid bytes replaced), anything else ``str()``."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
