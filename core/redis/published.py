"""The output stream: one entry per ``eventId``.

Publishing is idempotent: a Lua script writes a "published" mark for the ``eventId`` and the
stream entry together, and does nothing if the mark exists. A job that runs twice (a worker
killed after publishing but before RQ recorded success, a replay, a duplicate job) therefore
leaves exactly one entry on ``OUTPUT_STREAM``.
"""

from __future__ import annotations

from collections.abc import Mapping

from redis.asyncio import Redis as AsyncRedis

from core.redis.keys import published_key, text

_PUBLISH = """
-- KEYS: published mark, output stream. ARGV: mark ttl, then the entry as field/value pairs.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return false
end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
"""


class OutputStream:
    """Writes the output stream, one entry per ``eventId`` whatever happens."""

    def __init__(self, redis: AsyncRedis, stream: str, published_ttl_seconds: int) -> None:
        self.stream = stream
        self._ttl = published_ttl_seconds
        self._publish = redis.register_script(_PUBLISH)
        self._redis = redis

    async def was_published(self, event_id: str) -> bool:
        """True when ``event_id`` is on the stream already (its published mark is set)."""
        return bool(await self._redis.exists(published_key(event_id)))

    async def publish(self, event_id: str, fields: Mapping[str, str]) -> str | None:
        """Append one entry for ``event_id`` unless it was published before.

        Returns the new entry id, or None when the event had already been published.
        """
        args: list[str | int] = [self._ttl]
        for field, value in fields.items():
            args.extend((field, value))
        entry_id = await self._publish(keys=[published_key(event_id), self.stream], args=args)
        return None if entry_id is None else text(entry_id)
