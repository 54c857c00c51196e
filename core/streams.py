"""The output and parked streams.

Publishing is idempotent: a Lua script writes a "published" mark for the ``eventId`` and the
stream entry together, and does nothing if the mark exists. A job that runs twice (a worker
killed after publishing but before RQ recorded success, a replay, a duplicate job) therefore
leaves exactly one entry on ``OUTPUT_STREAM``.

Parked entries carry ``event_id``, ``reason``, ``detail`` (one sentence) and ``payload`` (the body
as received). :func:`replay` moves them back onto the queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from redis.asyncio import Redis as AsyncRedis

from core.config import DEFAULT_PARKED_RETENTION_SECONDS
from core.inbox import job_id_for, parked_min_id

_PUBLISH = """
-- KEYS: published mark, output stream. ARGV: mark ttl, then the entry as field/value pairs.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return false
end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
"""


def published_key(event_id: str) -> str:
    """The Redis key that records that an ``eventId`` reached the output stream."""
    return f"smartcar-ingest:published:{job_id_for(event_id)}"


@dataclass(frozen=True)
class StreamNames:
    output: str
    parked: str


class StreamWriter:
    """Writes to the output and parked streams."""

    def __init__(
        self,
        redis: AsyncRedis,
        names: StreamNames,
        published_ttl_seconds: int,
        parked_retention_seconds: int = DEFAULT_PARKED_RETENTION_SECONDS,
    ) -> None:
        self._redis = redis
        self._names = names
        self._ttl = published_ttl_seconds
        self._parked_retention = parked_retention_seconds
        self._publish = redis.register_script(_PUBLISH)

    async def publish(self, event_id: str, fields: Mapping[str, str]) -> str | None:
        """Append one entry for ``event_id`` unless it was published before.

        Returns the new entry id, or None when the event had already been published.
        """
        args: list[str | int] = [self._ttl]
        for field, value in fields.items():
            args.extend((field, value))
        entry_id = await self._publish(keys=[published_key(event_id), self._names.output], args=args)
        if entry_id is None:
            return None
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def park(self, event_id: str, reason: str, detail: str, payload: str) -> str:
        """Keep an event that cannot be processed; returns the parked entry id.

        Entries older than ``parked_retention_seconds`` are trimmed by the same XADD.
        """
        entry_id = await self._redis.xadd(
            self._names.parked,
            {"event_id": event_id, "reason": reason, "detail": detail, "payload": payload},
            minid=parked_min_id(self._parked_retention),
            approximate=True,
        )
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
