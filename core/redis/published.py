"""The output stream: one entry per ``eventId``, published with its vehicle-state merge in one step
(why: docs/architecture.md, "Publishing and the vehicle state"; for consumers: docs/consumers.md)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain

from redis.asyncio import Redis as AsyncRedis

from core.config import DEFAULT_OUTPUT_STREAM_RETENTION_SECONDS, DEFAULT_VEHICLE_STATE_TTL_SECONDS
from core.redis.dedupe import LIBRARY, Marks, job_digest
from core.redis.functions import lua_function
from core.redis.group import GroupCommit
from core.redis.keys import EVENT_IDS_KEY, PUBLISHED_PREFIX, job_id_for, text
from core.redis.vehicle_state import STATE_LIBRARY, MergePlan

_COMMIT = (
    LIBRARY
    + STATE_LIBRARY
    + """
-- KEYS: output stream. ARGV: the marks head (ids.open's five), retention ms, state TTL seconds,
-- then per event: job id, digest, event id, state key, state token, n, m, n state and m entry
-- values (field/value pairs). Returns per event: the new entry id; 0 when published already; -1
-- when its vehicle's state changed since the worker read it (nothing done: it plans again).
local st = ids.open(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
local min_id = string.format('%d', math.max(0, math.floor(st.now * 1000) - tonumber(ARGV[6])))
local clock
local results = {}
local at = 8
while at <= #ARGV do
  local n, m = tonumber(ARGV[at + 5]), tonumber(ARGV[at + 6])
  local writes = at + 7
  local entry = writes + n
  local head, field = ids.locate(ARGV[at + 1])
  local value, key = ids.find(st, head, field)
  local result = 0
  if value ~= '2' and not (st.legacy and redis.call('EXISTS', st.legacy .. ARGV[at]) == 1) then
    local applied = true
    if n > 0 then
      clock = clock or now_ms()
      applied = apply_state(ARGV[at + 3], ARGV[at + 4], ARGV[7], ARGV[at + 2], writes, entry - 1, clock)
    end
    if applied then
      -- The entry before the mark (why: docs/architecture.md, "Publishing and the vehicle state").
      result = redis.call('XADD', KEYS[1], 'MINID', '~', min_id, '*', unpack(ARGV, entry, entry + m - 1))
      if value then
        redis.call('HSET', key, field, '2')
      else
        ids.put(st, head, field, '2')
      end
    else
      result = -1
    end
  end
  results[#results + 1] = result
  at = entry + m
end
return results
"""
)
_COMMIT_FN = lua_function("commit_events", _COMMIT)

RECALL = (
    LIBRARY
    + """
-- ARGV: the marks head (registry, ttl, width, clock, legacy prefix), job id, digest.
-- Returns the remembered value, or 'legacy:<value>' when only a per-key mark of an earlier version has it.
local st = ids.open(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
local head, field = ids.locate(ARGV[7])
local value = ids.find(st, head, field)
if value then return value end
if st.legacy then
  local old = redis.call('GET', st.legacy .. ARGV[6])
  if old then return 'legacy:' .. old end
end
return false
"""
)
RECALL_FN = lua_function("recall", RECALL)

MAX_BATCH = 64


class StateChanged(Exception):
    """The vehicle's state changed since the merge was planned: nothing was done; plan again."""


class OutputStream:
    def __init__(
        self,
        redis: AsyncRedis,
        stream: str,
        published_ttl_seconds: int,
        retention_seconds: int = DEFAULT_OUTPUT_STREAM_RETENTION_SECONDS,
        clock: Callable[[], float] | None = None,
        state_ttl_seconds: int = DEFAULT_VEHICLE_STATE_TTL_SECONDS,
    ) -> None:
        self.stream = stream
        self.retention_seconds = retention_seconds
        self.state_ttl_seconds = state_ttl_seconds
        # The accept marks, and during the legacy window the publish marks of earlier versions.
        self.marks = Marks(EVENT_IDS_KEY, published_ttl_seconds, PUBLISHED_PREFIX, clock)
        self._commit = _COMMIT_FN.bind(redis)
        self._recall = RECALL_FN.bind(redis)
        self._group: GroupCommit[tuple[str, Mapping[str, str], MergePlan | None], str | None] = GroupCommit(
            self._call, MAX_BATCH
        )

    async def was_published(self, event_id: str) -> bool:
        """True when ``event_id`` is on the stream already (its mark says published)."""
        job_id = job_id_for(event_id)
        value = await self._recall(args=[*self.marks.head(), job_id, job_digest(job_id)])
        return value is not None and (bytes(value) == b"2" or bytes(value).startswith(b"legacy:"))

    async def publish(self, event_id: str, fields: Mapping[str, str], merge: MergePlan | None = None) -> str | None:
        """The new entry id, with ``merge`` applied; None when the event was published already
        (nothing merged). Raises :class:`StateChanged` when the merge's state has changed since."""
        return await self._group.submit((event_id, fields, merge))

    async def _call(
        self, events: list[tuple[str, Mapping[str, str], MergePlan | None]]
    ) -> list[str | Exception | None]:
        args: list[str | int | bytes] = [*self.marks.head(), self.retention_seconds * 1000, self.state_ttl_seconds]
        for event_id, fields, merge in events:
            writes = merge.writes if merge is not None else []
            key, token = (merge.key, merge.token) if merge is not None and writes else ("", b"")
            job_id = job_id_for(event_id)
            args += [job_id, job_digest(job_id), event_id, key, token, len(writes), 2 * len(fields)]
            args += writes
            args += chain.from_iterable(fields.items())
        replies = await self._commit(keys=[self.stream], args=args)
        return [None if reply == 0 else StateChanged() if reply == -1 else text(reply) for reply in replies]
