"""The latest state of each vehicle, ordered by the car's own clock.

One Redis hash per vehicle, ``VEHICLE_STATE_PREFIX`` + vehicle id (:func:`core.redis.keys.vehicle_state_key`):

==============  =====================================================================================
field           value
==============  =====================================================================================
``<code>``      the newest signal of that code, as JSON in the output payload's form (``code``,
                ``name``, ``group``, ``body``, ``status``, ``error`` when failed, ``oemUpdatedAt``,
                ``retrievedAt``), from the webhook's ``signals`` or the ``/signals`` read alike
``_vehicle``    the vehicle's attributes (the output's ``vehicle``): a copy read from the API replaces a
                different one; the webhook's own copy (the read was refused) only fills a missing one
``_updatedAt``  when the state last changed, epoch ms by Redis's clock
``_eventId``    the event that last changed anything
==============  =====================================================================================

A signal's JSON starts with its two times (``{"oemUpdatedAt":…,"retrievedAt":…,``) when both are
whole numbers or null, so that the merge compares times without parsing any JSON.

**Newest** is a total order on the versions of one code: the greater ``oemUpdatedAt``, then the
greater ``retrievedAt``; a missing time is older than any time (so a signal without them never
replaces one that has them); on equal times the greater JSON text, compared byte by byte, so that
the final state never depends on the order the versions arrived in.

Each event is merged by one Lua script (:data:`MERGE_SCRIPT`), atomically: per code it takes the
event's newest version (a code may come in both lists), writes it when it is newer than the
state's, and reports the code as **stale** when it is older by time. Equal is neither, so a
repeated event, a retried job, a re-run after a crash between merge and publish or a replay
changes nothing and reports what the first run reported, unless a newer event was merged between
the two. Every change renews the key's TTL (``VEHICLE_STATE_TTL_SECONDS``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic_core
from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis

from core.redis.functions import lua_function
from core.redis.keys import text, vehicle_state_key

#: The hash fields that are not signal codes; codes starting with ``_`` are never stored.
VEHICLE_FIELD = "_vehicle"
UPDATED_AT_FIELD = "_updatedAt"
EVENT_ID_FIELD = "_eventId"
RESERVED_PREFIX = "_"

MERGE_SCRIPT = """
-- KEYS[1]: the vehicle's state hash.
-- ARGV[1] event id, ARGV[2] ttl seconds, ARGV[3] vehicle JSON ('' for none), ARGV[4] '1' when the
-- vehicle was read from the API (it then replaces a different stored copy), then per signal:
-- code, oemUpdatedAt ('' when unknown), retrievedAt ('' when unknown), signal JSON.
-- Returns {1 when anything changed else 0, {stale codes}}.
local key = KEYS[1]

-- times are epoch ms (integers below 2^53, exact as Lua numbers); nil is older than any time
local function cmp_time(a, b)
  if a == b then return 0 end
  if a == nil then return -1 end
  if b == nil then return 1 end
  if a < b then return -1 end
  return 1
end

local function cmp_when(a, b)
  local c = cmp_time(a.oem, b.oem)
  if c ~= 0 then return c end
  return cmp_time(a.ret, b.ret)
end

-- byte order (string '<' follows the server's locale)
local function cmp_bytes(a, b)
  if a == b then return 0 end
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      if x < y then return -1 end
      return 1
    end
  end
  if #a < #b then return -1 end
  return 1
end

local function newer(a, b)
  local c = cmp_when(a, b)
  if c ~= 0 then return c > 0 end
  return cmp_bytes(a.json, b.json) > 0
end

local function time_of(value)
  if type(value) == 'number' then return value end
  return nil
end

-- HMGET and HSET a thousand at a time: Lua's unpack() takes at most a few thousand values
local CHUNK = 1000

local function hmget(names)
  local values = {}
  for i = 1, #names, CHUNK do
    local part = redis.call('HMGET', key, unpack(names, i, math.min(i + CHUNK - 1, #names)))
    for j = 1, #part do values[i + j - 1] = part[j] end
  end
  return values
end

local function hset(pairs_)
  for i = 1, #pairs_, 2 * CHUNK do
    redis.call('HSET', key, unpack(pairs_, i, math.min(i + 2 * CHUNK - 1, #pairs_)))
  end
end

-- the times of a stored version: read off the front of its JSON, where the worker writes them (no
-- parsing); a version written otherwise (by an earlier release, or with times that are not whole
-- numbers) is decoded
local function stored(json)
  local oem, ret = string.match(json, '^{"oemUpdatedAt":([-%dnul]+),"retrievedAt":([-%dnul]+),')
  if oem then return {oem = tonumber(oem), ret = tonumber(ret), json = json} end
  local ok, value = pcall(cjson.decode, json)
  if not ok or type(value) ~= 'table' then
    return {json = json}
  end
  return {oem = time_of(value.oemUpdatedAt), ret = time_of(value.retrievedAt), json = json}
end

-- the event's newest version of each code, codes in first-seen order
local best, codes = {}, {}
for i = 5, #ARGV, 4 do
  local code = ARGV[i]
  local version = {oem = tonumber(ARGV[i + 1]), ret = tonumber(ARGV[i + 2]), json = ARGV[i + 3]}
  local held = best[code]
  if held == nil then
    best[code] = version
    codes[#codes + 1] = code
  elseif newer(version, held) then
    best[code] = version
  end
end

local fields = {'_vehicle'}
for n = 1, #codes do fields[n + 1] = codes[n] end
local current = hmget(fields)

local writes, stale = {}, {}
local vehicle = ARGV[3]
if vehicle ~= '' and (not current[1] or (ARGV[4] == '1' and current[1] ~= vehicle)) then
  writes[#writes + 1] = '_vehicle'
  writes[#writes + 1] = vehicle
end
for n = 1, #codes do
  local code, version, held = codes[n], best[codes[n]], current[n + 1]
  if not held then
    writes[#writes + 1] = code
    writes[#writes + 1] = version.json
  else
    local previous = stored(held)
    if cmp_when(version, previous) < 0 then
      stale[#stale + 1] = code
    elseif newer(version, previous) then
      writes[#writes + 1] = code
      writes[#writes + 1] = version.json
    end
  end
end

if #writes == 0 then
  return {0, stale}
end
local now = redis.call('TIME')
writes[#writes + 1] = '_updatedAt'
writes[#writes + 1] = tostring(now[1] * 1000 + math.floor(now[2] / 1000))
writes[#writes + 1] = '_eventId'
writes[#writes + 1] = ARGV[1]
hset(writes)
redis.call('EXPIRE', key, ARGV[2])
return {1, stale}
"""
MERGE_FUNCTION = lua_function("merge_vehicle_state", MERGE_SCRIPT)


@dataclass(frozen=True)
class MergeResult:
    """What merging one event did: whether the state changed, and the codes it held newer."""

    changed: bool
    stale_signals: list[str]


def _time(value: object) -> int | None:
    """An epoch-ms time; anything but an int (or a bool) is unknown (None, ``''`` to the script)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json(value: object) -> str:
    """Compact JSON as the output stream writes it (a NaN or infinity from the API becomes null)."""
    return pydantic_core.to_json(value, inf_nan_mode="null").decode()


def _stored_json(signal: Mapping[str, Any]) -> str:
    """A signal's JSON as the state stores it: its two times first, when both are whole numbers or
    null, so that the merge reads them off the front without parsing (the same object as
    :func:`_json`'s, keys in another order)."""
    oem, ret = signal.get("oemUpdatedAt", False), signal.get("retrievedAt", False)
    if len(signal) < 3 or not all(t is None or (type(t) is int) for t in (oem, ret)):
        return _json(signal)
    # A key given again keeps its first place: the times first, with the signal's own values.
    return _json({"oemUpdatedAt": None, "retrievedAt": None, **signal})


def merge_arguments(
    event_id: str,
    ttl_seconds: int,
    vehicle: Mapping[str, Any] | None,
    vehicle_from_api: bool,
    signals: Iterable[Mapping[str, Any]],
) -> list[str | int]:
    """The script's ARGV for one event: each code once, its newest version by the script's own
    rule (a code usually comes in both the webhook's list and the ``/signals`` read, and every
    argument costs Redis time). Signals without a usable code (not a string, empty, or starting
    with ``_``, which the state's own fields use) are left out."""
    newest: dict[str, tuple[tuple[bool, int, bool, int, bytes], int | None, int | None, str]] = {}
    for signal in signals:
        code = signal.get("code")
        if not isinstance(code, str) or not code or code.startswith(RESERVED_PREFIX):
            continue
        oem, ret = _time(signal.get("oemUpdatedAt")), _time(signal.get("retrievedAt"))
        stored = _stored_json(signal)
        rank = (oem is not None, oem or 0, ret is not None, ret or 0, stored.encode())
        held = newest.get(code)
        if held is None or rank > held[0]:
            newest[code] = (rank, oem, ret, stored)
    args: list[str | int] = [event_id, ttl_seconds, "" if vehicle is None else _json(vehicle), int(vehicle_from_api)]
    for code, (_, oem, ret, stored) in newest.items():
        args += [code, "" if oem is None else oem, "" if ret is None else ret, stored]
    return args


def _result(reply: Any) -> MergeResult:
    changed, stale = reply
    return MergeResult(changed=bool(changed), stale_signals=sorted({text(code) for code in stale or ()}))


class VehicleStates:
    """The worker's side: merges each event into its vehicle's state, one script call per event."""

    def __init__(self, redis: AsyncRedis, prefix: str, ttl_seconds: int) -> None:
        self.prefix = prefix
        self._ttl = ttl_seconds
        self._merge = MERGE_FUNCTION.bind(redis)

    def key(self, vehicle_id: str) -> str:
        return vehicle_state_key(self.prefix, vehicle_id)

    async def merge(
        self,
        vehicle_id: str,
        event_id: str,
        signals: Iterable[Mapping[str, Any]],
        vehicle: Mapping[str, Any] | None = None,
        vehicle_from_api: bool = True,
    ) -> MergeResult:
        """Merge one event's signals (webhook and ``/signals`` alike, in the output form) and its
        vehicle into the state. Idempotent: running it again changes nothing and answers the same,
        unless a newer event was merged in between. ``vehicle_from_api`` false (the webhook's own
        copy) only fills a missing ``_vehicle``."""
        args = merge_arguments(event_id, self._ttl, vehicle, vehicle_from_api, signals)
        return _result(await self._merge(keys=[self.key(vehicle_id)], args=args))


@dataclass(frozen=True)
class StoredState:
    """One vehicle's state as read back (``vehicle-state``)."""

    vehicle_id: str
    key: str
    vehicle: dict[str, Any] | None
    updated_at_ms: int | None
    event_id: str | None
    ttl_seconds: int | None
    """Seconds until the state expires; None when the key has no expiry."""
    signals: dict[str, dict[str, Any]]
    """By code; a value that is not a JSON object is kept as ``{"code": code, "unreadable": text}``."""


def read_state(client: SyncRedis, prefix: str, vehicle_id: str) -> StoredState | None:
    """The state of ``vehicle_id``, or None when there is none (never seen, or expired)."""
    key = vehicle_state_key(prefix, vehicle_id)
    with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(key)
        pipe.ttl(key)
        raw, ttl = pipe.execute()
    if not raw:
        return None
    fields = {text(name): text(value) for name, value in raw.items()}
    signals: dict[str, dict[str, Any]] = {}
    for code, value in fields.items():
        if not code.startswith(RESERVED_PREFIX):
            parsed = _object(value)
            signals[code] = parsed if parsed is not None else {"code": code, "unreadable": value}
    updated = fields.get(UPDATED_AT_FIELD, "")
    return StoredState(
        vehicle_id=vehicle_id,
        key=key,
        vehicle=_object(fields.get(VEHICLE_FIELD, "")),
        updated_at_ms=int(updated) if updated.isdigit() else None,
        event_id=fields.get(EVENT_ID_FIELD),
        ttl_seconds=int(ttl) if isinstance(ttl, int) and ttl >= 0 else None,
        signals=signals,
    )


def _object(value: str) -> dict[str, Any] | None:
    try:
        parsed = pydantic_core.from_json(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
