"""The output stream: one entry per ``eventId``, kept ``OUTPUT_STREAM_RETENTION_SECONDS``.

Publishing is idempotent: a Lua script marks the ``eventId`` published (the mark the edge wrote
when it accepted the event, :mod:`core.redis.dedupe`, set from ``1`` to ``2``) and appends the
stream entry together, and does nothing if the mark says published already. A job that runs twice
(a worker killed after publishing but before RQ recorded success, a replay, a duplicate job)
therefore leaves exactly one entry on ``OUTPUT_STREAM``.

The same ``XADD`` trims the stream by age (``MINID ~`` now minus the retention, by Redis's clock):
the stream stays bounded whatever arrives, with no sweeper that could fall behind. ``~`` lets
Redis drop whole nodes only, which keeps each add cheap. A consumer group that falls behind by
more than the retention loses entries: ``smartcar_ingest_output_group_lag_seconds`` and its alert
(:mod:`core.redis.queue_metrics`) say so well before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from redis.asyncio import Redis as AsyncRedis

from core.config import DEFAULT_OUTPUT_STREAM_RETENTION_SECONDS
from core.redis.dedupe import LIBRARY, PUBLISHED, RECALL_FN, event_digest, event_marks, recall_args
from core.redis.functions import lua_function
from core.redis.keys import PUBLISHED_PREFIX, job_id_for, text

_PUBLISH = (
    LIBRARY
    + """
-- KEYS: output stream. ARGV: the marks head (registry, ttl, width, clock, legacy publish-mark
-- prefix), job id, digest, retention in ms, then the entry as field/value pairs.
-- Returns the new entry id, or false when the event was published already.
local st = ids.open(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
local head, field = ids.locate(ARGV[7])
local value, key = ids.find(st, head, field)
if value == '2' or (st.legacy and redis.call('EXISTS', st.legacy .. ARGV[6]) == 1) then
  return false
end
-- The entry first: a script stops at a failing command without undoing what it already did, so
-- a mark written before an XADD that Redis refused would pass an unpublished event for published.
local min_id = math.max(0, math.floor(st.now * 1000) - tonumber(ARGV[8]))
local entry = redis.call('XADD', KEYS[1], 'MINID', '~', string.format('%d', min_id), '*', unpack(ARGV, 9))
if value then
  redis.call('HSET', key, field, '2')
else
  ids.put(st, head, field, '2')
end
return entry
"""
)
_PUBLISH_FN = lua_function("publish", _PUBLISH)


class OutputStream:
    """Writes the output stream, one entry per ``eventId`` whatever happens."""

    def __init__(
        self,
        redis: AsyncRedis,
        stream: str,
        published_ttl_seconds: int,
        retention_seconds: int = DEFAULT_OUTPUT_STREAM_RETENTION_SECONDS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.stream = stream
        self.retention_seconds = retention_seconds
        self.marks = event_marks(published_ttl_seconds, clock)
        self._publish = _PUBLISH_FN.bind(redis)
        self._recall = RECALL_FN.bind(redis)

    async def was_published(self, event_id: str) -> bool:
        """True when ``event_id`` is on the stream already (its mark says published)."""
        value = await self._recall(args=recall_args(self.marks, event_id, PUBLISHED_PREFIX))
        return value is not None and (bytes(value) == PUBLISHED or bytes(value).startswith(b"legacy:"))

    async def publish(self, event_id: str, fields: Mapping[str, str]) -> str | None:
        """Append one entry for ``event_id`` unless it was published before.

        Returns the new entry id, or None when the event had already been published.
        """
        args: list[str | int | bytes] = [
            *self.marks.head(PUBLISHED_PREFIX),
            job_id_for(event_id),
            event_digest(event_id),
            self.retention_seconds * 1000,
        ]
        for field, value in fields.items():
            args.extend((field, value))
        entry_id = await self._publish(keys=[self.stream], args=args)
        return None if entry_id is None else text(entry_id)
