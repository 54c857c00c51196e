"""The output stream: one entry per ``eventId``, published with its vehicle-state merge in one step
(why: docs/architecture.md, "Publishing and the vehicle state"; for consumers: docs/consumers.md)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from itertools import chain
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from core.config import DEFAULT_OUTPUT_STREAM_RETENTION_SECONDS, DEFAULT_VEHICLE_STATE_TTL_SECONDS
from core.redis.dedupe import LIBRARY, Marks, job_digest
from core.redis.functions import NOW_MS, lua_function
from core.redis.group import GroupCommit
from core.redis.keys import EVENT_IDS_KEY, PUBLISHED_PREFIX, PUBLISHING_PREFIX, job_id_for, text
from core.redis.vehicle_state import MergePlan

_MARKS = """
-- ARGV[1] 'check': the marks head (ids.open's five), retention ms, the PTTL below which a state is
-- renewed, then per event: job id, digest, state key ('' when it merges nothing), state token.
-- Returns the output stream's MINID, Redis's clock in ms (0 when no event merges), then per event a
-- verdict (1 publish; 2 publish and renew the state's TTL; 0 published already; -1 its vehicle's
-- state changed since the worker read it), the state's _updatedAt as read and the hash its mark was
-- found in ('' for none).
-- ARGV[1] 'mark', KEYS[1] the output stream: the marks head, the guard prefix and ms, the TTL to set
-- in seconds, then per event: digest, job id, state key to renew ('' for none), the hash the check
-- found its mark in ('' for none). Run in the transaction after the entries: renews those states'
-- TTL (merged whatever follows), then sets each event's mark to published and its guard; no mark
-- when the stream takes no entries (its entries were refused: the transaction's error says so).
-- Returns 1, or 0 when nothing was marked.
local st = ids.open(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if ARGV[1] == 'mark' then
  -- Redis refuses an XADD of ours when the key is not a stream or the stream has used its last id.
  -- An entry with id 0-1 is refused in every case, and only by a stream that takes entries for
  -- being too small (after the entries just added, it can never be written).
  local probe = redis.pcall('XADD', KEYS[1], 'NOMKSTREAM', '0-1', 'probe', '')
  if type(probe) == 'string' then redis.call('XDEL', KEYS[1], probe) end
  local stream = type(probe) == 'table' and probe.err ~= nil
    and string.find(probe.err, 'equal or smaller', 1, true) ~= nil
  for at = 10, #ARGV, 4 do
    if ARGV[at + 2] ~= '' then redis.call('EXPIRE', ARGV[at + 2], ARGV[9]) end
    if stream then
      local head, field = ids.locate(ARGV[at])
      local found = ARGV[at + 3]
      -- The hash the check found the mark in holds it still (a mark never moves), unless the hash
      -- expired since: then the field is new, and is taken out again (no hash without its TTL).
      if found == '' or redis.call('HSET', found, field, '2') == 1 then
        if found ~= '' then redis.call('HDEL', found, field) end
        local value, key = ids.find(st, head, field)
        if value then
          redis.call('HSET', key, field, '2')
        else
          ids.put(st, head, field, '2')
        end
      end
      redis.call('SET', ARGV[7] .. ARGV[at + 1], '', 'PX', ARGV[8])
    end
  end
  return stream and 1 or 0
end
local replies = {string.format('%d', math.max(0, math.floor(st.now * 1000) - tonumber(ARGV[7]))), 0}
local renew_below = tonumber(ARGV[8])
for at = 9, #ARGV, 4 do
  local head, field = ids.locate(ARGV[at + 1])
  local verdict, before = 1, ''
  local value, found = ids.find(st, head, field)
  if value == '2' or (st.legacy and redis.call('EXISTS', st.legacy .. ARGV[at]) == 1) then
    verdict = 0
  elseif ARGV[at + 2] ~= '' then
    local held = redis.call('HMGET', ARGV[at + 2], '_updatedAt', '_eventId')
    if (held[1] or '') .. ':' .. (held[2] or '') == ARGV[at + 3] then
      before = held[1] or ''
      if replies[2] == 0 then replies[2] = now_ms() end
      if redis.call('PTTL', ARGV[at + 2]) < renew_below then verdict = 2 end
    else
      verdict = -1
    end
  end
  replies[#replies + 1] = verdict
  replies[#replies + 1] = before
  replies[#replies + 1] = found or ''
end
return replies
"""
_MARKS_FN = lua_function("publish_marks", _MARKS, prelude=LIBRARY + NOW_MS)

RECALL = """
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
RECALL_FN = lua_function("recall", RECALL, prelude=LIBRARY)

MAX_BATCH = 64
#: How long an event's publish guard stays after the transaction that set it. A publisher of the same
#: event that watched it before then aborts; one that comes after finds the mark.
GUARD_MS = 1000
#: A merged state's TTL is set this share above the state TTL (at least a second above), and renewed
#: only by a merge that finds less than the state TTL and half that headroom left: a state still
#: lives at least the state TTL after its last change (the half is the margin for the time between
#: the check and EXEC), at most the headroom longer, and most merges of a vehicle that reports often
#: write no EXPIRE.
STATE_TTL_HEADROOM = 0.01


def state_ttl_to_set(ttl_seconds: int) -> int:
    """The TTL a merge that renews sets on the state, in seconds."""
    return ttl_seconds + max(1, math.ceil(ttl_seconds * STATE_TTL_HEADROOM))


def state_ttl_renew_below_ms(ttl_seconds: int) -> int:
    """A merge renews a state whose TTL is below this, in milliseconds."""
    return ttl_seconds * 1000 + (state_ttl_to_set(ttl_seconds) - ttl_seconds) * 500


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
        self._redis = redis
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
        outer = sys.exc_info()[1]  # an exception the caller is handling, if any
        while True:
            try:
                return await self._attempt(events)
            except WatchError as exc:
                # redis-py reports a connection lost while watching as a WatchError raised while
                # handling it: an outage for the caller to wait out, not a key that changed (then
                # check again). Only redis-py's own handling counts, not one the caller is in.
                lost = exc.__context__
                if isinstance(lost, RedisConnectionError | RedisTimeoutError) and lost is not outer:
                    raise lost from None

    async def _check(self, transaction: Any, args: list[Any]) -> Any:
        """The marks and the states' tokens, read once their keys are watched."""
        return await _MARKS_FN.bind(transaction)(args=args)

    async def _attempt(
        self, events: list[tuple[str, Mapping[str, str], MergePlan | None]]
    ) -> list[str | Exception | None]:
        """One optimistic transaction for ``events``: watch, check the marks and the states' tokens
        (one function call), then write plainly (docs/architecture.md, "Publishing and the vehicle state")."""
        jobs = [job_id_for(event_id) for event_id, _, _ in events]
        digests = [job_digest(job_id) for job_id in jobs]
        merges = [merge if merge is not None and merge.writes else None for _, _, merge in events]
        head = self.marks.head()
        check: list[Any] = ["check", *head, self.retention_seconds * 1000]
        check.append(state_ttl_renew_below_ms(self.state_ttl_seconds))
        for job_id, digest, merge in zip(jobs, digests, merges, strict=True):
            check += [job_id, digest, *((merge.key, merge.token) if merge else ("", b""))]
        results: list[str | Exception | None] = [None] * len(events)
        entries: list[tuple[int, int]] = []  # (event, its XADD's place among the transaction's replies)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(*{PUBLISHING_PREFIX + job_id for job_id in jobs}, *{m.key for m in merges if m})
            min_id, now_ms, *answers = await self._check(pipe, check)
            checked = [answers[i : i + 3] for i in range(0, len(answers), 3)]  # (verdict, _updatedAt, mark's hash)
            pipe.multi()  # type: ignore[no-untyped-call]
            queued, published, merged = 0, set(), set()
            marks: list[Any] = ["mark", *head, PUBLISHING_PREFIX, GUARD_MS, state_ttl_to_set(self.state_ttl_seconds)]
            for at, (event_id, fields, _) in enumerate(events):
                job_id, merge, (verdict, before, found) = jobs[at], merges[at], checked[at]
                if verdict == 0 or job_id in published:
                    continue  # published already (None)
                if verdict == -1 or (merge is not None and merge.key in merged):
                    results[at] = StateChanged()
                    continue
                published.add(job_id)
                if merge is not None:
                    merged.add(merge.key)
                    merge.queue(pipe, event_id, now_ms, text(before))
                    queued += 1
                # The entry before the mark (why: docs/architecture.md, "Publishing and the vehicle state").
                pipe.execute_command(
                    "XADD", self.stream, "MINID", "~", min_id, "*", *chain.from_iterable(fields.items())
                )
                entries.append((at, queued))
                queued += 1
                marks += [digests[at], job_id, merge.key if merge and verdict == 2 else "", found]
            if not entries:
                return results
            pipe.execute_command(*_MARKS_FN.command([self.stream], marks))
            replies = await pipe.execute()
        for at, reply in entries:
            results[at] = text(replies[reply])
        return results
