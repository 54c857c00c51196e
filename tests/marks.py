"""What a family of remembered eventIds holds (core.redis.dedupe), read the way the product reads it."""

from __future__ import annotations

from redis import Redis

from core.redis.dedupe import Marks, job_digest
from core.redis.keys import job_id_for, text
from core.redis.published import RECALL_FN


def recall(client: Redis, marks: Marks, event_id: str) -> bytes | None:
    """What ``marks`` remembers of ``event_id`` (``b"1"``, ``b"2"``, a parked mark), or None."""
    job_id = job_id_for(event_id)
    value = RECALL_FN.bind(client)(args=[*marks.head(), job_id, job_digest(job_id)])
    return None if value is None else bytes(value)


def generations(client: Redis, registry: str) -> list[tuple[str, int, int]]:
    """The generations a family's registry lists, newest first: ``(slot, bits, expire_at)``.

    Slots whose expiry has passed are listed until a script next reads the registry.
    """
    raw = client.get(registry)
    rows = []
    for entry in (text(raw) if raw else "").split(";"):
        parts = entry.split(":")
        if len(parts) == 4 and parts[3] != "legacy":
            rows.append((parts[3], int(parts[2]), int(parts[0])))
    return rows
