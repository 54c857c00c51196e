"""Remembered ``eventId``s, one small-hash field each: the edge's dedupe, the publish mark, the parked mark;
:data:`LIBRARY` is the prelude of every function that checks or writes a mark (layout and growth:
docs/architecture.md, "Remembered eventIds"; memory and false duplicates: docs/capacity.md)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import redis
from rq.worker_registration import REDIS_WORKER_KEYS

from core.redis.keys import DEDUPE_PREFIX, EVENT_IDS_KEY, PARKED_IDS_KEY, PARKED_MARK_PREFIX, PUBLISHED_PREFIX

#: A slot spans ``ceil(TTL / SLOTS_PER_TTL)`` seconds; at most ``SLOTS_PER_TTL + 1`` are live.
SLOTS_PER_TTL = 3
#: Marks per hash that a generation is sized to hold by the end of its slot.
TARGET = 64
#: A hash this full starts a bigger generation (Redis keeps 128 fields in a listpack by default).
GROW_AT = 112
#: At most this many generations per slot, each at most 2^4 times the shards of the one before.
MAX_GENERATIONS = 6
MAX_STEP_BITS = 4
#: At most 2^MAX_BITS hashes per generation: 16 million, ≈ 1 billion marks a slot.
MAX_BITS = 24

LIBRARY = f"""
-- core/redis/dedupe.py: remembered eventIds, as fields of small time-bucketed hashes.
local ids = {{}}

-- The registries as last parsed, by key, kept from call to call by this library (Redis loads it
-- once): a registry whose text is the one parsed before is not parsed again. Only a cache: any
-- other text is parsed afresh, and a new library (a restart, a reload) starts empty.
local parsed, parsed_count = {{}}, 0

-- The entries of a registry's text, in order: {{expire_at, slot, generation}} (no generation for the
-- legacy window's entry).
function ids.entries(registry, raw)
  local hit = parsed[registry]
  if hit and hit.raw == raw then return hit.entries end
  local entries = {{}}
  for expire_at, t0, bits, slot in string.gmatch(raw, '(%d+):(%d+):(%d+):([%w-]+)') do
    expire_at = tonumber(expire_at)
    local g = slot ~= 'legacy' and ids.generation(registry, slot, expire_at, t0, tonumber(bits)) or nil
    entries[#entries + 1] = {{expire_at = expire_at, slot = slot, gen = g}}
  end
  if not hit then
    parsed_count = parsed_count + 1
    if parsed_count > 16 then parsed, parsed_count = {{}}, 1 end
  end
  parsed[registry] = {{raw = raw, entries = entries}}
  return entries
end

-- A family's state for this call. clock: '' for Redis's, else seconds; legacy: the per-key mark
-- prefix of earlier versions, '' for none. The registry ('<until>:0:0:legacy' during the legacy
-- window, then the generations, newest first) is read lazily, as far as a lookup reads.
function ids.open(registry, ttl, width, clock, legacy)
  local now = tonumber(clock)
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  local raw = redis.call('GET', registry)
  local st = {{registry = registry, ttl = tonumber(ttl), width = tonumber(width), now = now, gens = {{}},
               legacy_prefix = legacy, fresh = not raw, done = not raw, read = 0}}
  if raw then st.entries = ids.entries(registry, raw) end
  return st
end

-- The i-th live generation, newest first (nil past the last), reading the registry up to it.
function ids.gen(st, i)
  while not st.gens[i] and not st.done do
    st.read = st.read + 1
    local entry = st.entries[st.read]
    if not entry then
      st.done = true
      if st.dropped then ids.save(st) end
    elseif entry.expire_at <= st.now then
      st.dropped = true
    elseif entry.slot == 'legacy' then
      st.legacy_until = entry.expire_at
      if st.legacy_prefix ~= '' then st.legacy = st.legacy_prefix end
    else
      st.gens[#st.gens + 1] = entry.gen
    end
  end
  return st.gens[i]
end

-- Every live generation, newest first (and the legacy window known).
function ids.all(st)
  ids.gen(st, 1 / 0)
  return st.gens
end

function ids.save(st)
  local parts = {{}}
  if st.legacy_until then parts[1] = st.legacy_until .. ':0:0:legacy' end
  for _, g in ipairs(st.gens) do
    parts[#parts + 1] = g.expire_at .. ':' .. g.t0 .. ':' .. g.bits .. ':' .. g.slot
  end
  redis.call('SET', st.registry, table.concat(parts, ';'))
end

-- The shard number (first 32 bits) and the field (last 12 bytes) of a 16-byte digest.
function ids.locate(digest)
  local a, b, c, d = string.byte(digest, 1, 4)
  return ((a * 256 + b) * 256 + c) * 256 + d, string.sub(digest, 5)
end

-- The number of an event's hash in generation g, as text: formatted as an integer, which costs Redis a
-- fraction of a Lua number's own formatting (the same text, below 2^32).
function ids.shard(head, g)
  return string.format('%d', math.floor(head / g.div))
end

-- The remembered value of an event and the hash holding it (newest generations first), or nil.
-- After a miss every generation has been read, so st.legacy is known.
function ids.find(st, head, field)
  local i, g = 1, ids.gen(st, 1)
  local shards = {{}}  -- slots of the same size share the shard number: format it once
  while g do
    shards[g.div] = shards[g.div] or ids.shard(head, g)
    local key = g.prefix .. shards[g.div]
    local value = redis.call('HGET', key, field)
    if value then return value, key end
    i = i + 1
    g = ids.gen(st, i)
  end
end

-- Remember an event (not remembered yet) with value in the current slot's newest generation.
function ids.put(st, head, field, value)
  local g = st.gen or ids.current(st)
  local key = g.prefix .. ids.shard(head, g)
  redis.call('HSET', key, field, value)
  local n = redis.call('HLEN', key)
  if n == 1 then redis.call('EXPIREAT', key, g.expire_at) end
  if n >= {GROW_AT} then ids.grow(st, g) end
end

-- Marks in a generation, estimated from the sizes of its first few hashes.
function ids.population(g)
  local shards = 2 ^ g.bits
  local sample = math.min(8, shards)
  local total = 0
  for i = 0, sample - 1 do total = total + redis.call('HLEN', g.prefix .. i) end
  return total / sample * shards
end

-- Shard bits for a generation expected to receive count marks.
function ids.bits_for(count)
  if count <= {TARGET} then return 0 end
  return math.min({MAX_BITS}, math.ceil(math.log(count / {TARGET}) / math.log(2) - 1e-9))
end

function ids.slot_end(slot)
  local w, n = string.match(slot, '^(%d+)-(%d+)$')
  return (tonumber(n) + 1) * tonumber(w)
end

function ids.generation(registry, slot, expire_at, t0, bits)
  return {{slot = slot, expire_at = expire_at, t0 = t0, bits = bits, div = 2 ^ (32 - bits),
          prefix = registry .. ':' .. slot .. ':' .. bits .. ':'}}
end

function ids.open_generation(st, slot, expire_at, bits)
  local g = ids.generation(st.registry, slot, expire_at, string.format('%d', st.now * 1000), bits)
  table.insert(ids.all(st), 1, g)
  st.gen = g
  ids.save(st)
  return g
end

-- The newest generation of the current slot, opening the slot (sized on the rate of the
-- newest other slot) when this is its first mark.
function ids.current(st)
  local n = math.floor(st.now / st.width)
  local slot = st.width .. '-' .. n
  local gens = ids.all(st)
  for _, g in ipairs(gens) do
    if g.slot == slot then
      st.gen = g
      return g
    end
  end
  local rate = 0
  local last = gens[1]
  if last then
    local count, first = 0, tonumber(last.t0)
    for _, g in ipairs(gens) do
      if g.slot == last.slot then
        count = count + ids.population(g)
        first = math.min(first, tonumber(g.t0))
      end
    end
    rate = count / math.max(1, math.min(st.now, ids.slot_end(last.slot)) - first / 1000)
  end
  if st.fresh and st.legacy_prefix ~= '' then
    st.legacy_until = math.ceil(st.now + st.ttl)
    st.legacy = st.legacy_prefix
  end
  st.fresh = false
  local ends = (n + 1) * st.width
  return ids.open_generation(st, slot, ends + st.ttl, ids.bits_for(rate * (ends - st.now)))
end

-- A hash of generation g is nearly full: open a bigger generation sized on g's rate.
function ids.grow(st, g)
  local count, newest = 0, nil
  for _, other in ipairs(ids.all(st)) do
    if other.slot == g.slot then
      count = count + 1
      newest = newest or other
    end
  end
  if newest ~= g or count >= {MAX_GENERATIONS} or g.bits >= {MAX_BITS} then return end
  local rate = ids.population(g) / math.max(1, st.now - tonumber(g.t0) / 1000)
  local bits = ids.bits_for(rate * math.max(1, ids.slot_end(g.slot) - st.now))
  bits = math.min(math.max(bits, g.bits + 1), g.bits + {MAX_STEP_BITS}, {MAX_BITS})
  ids.open_generation(st, g.slot, g.expire_at, bits)
end

-- Forget an event: delete every mark of it.
function ids.forget(st, head, field)
  for _, g in ipairs(ids.all(st)) do redis.call('HDEL', g.prefix .. ids.shard(head, g), field) end
end
"""


def slot_width(ttl_seconds: int) -> int:
    return max(1, math.ceil(ttl_seconds / SLOTS_PER_TTL))


def job_digest(job_id: str) -> bytes:
    """The 128-bit digest an event is remembered by: one event, one job, one mark."""
    return hashlib.blake2b(job_id.encode(), digest_size=16).digest()


@dataclass(frozen=True)
class Marks:
    """One family of remembered events; ``clock`` replaces Redis's (benchmarks, tests that cross days)."""

    registry: str
    ttl_seconds: int
    legacy_prefix: str
    clock: Callable[[], float] | None = None

    def head(self) -> list[str | int]:
        """The arguments of ``ids.open``."""
        clock = "" if self.clock is None else repr(float(self.clock()))
        return [self.registry, self.ttl_seconds, slot_width(self.ttl_seconds), clock, self.legacy_prefix]


def event_marks(ttl_seconds: int, clock: Callable[[], float] | None = None) -> Marks:
    """Accepted and published events: one mark each, ``1`` then ``2``, for ``DEDUPE_TTL_SECONDS``."""
    return Marks(EVENT_IDS_KEY, ttl_seconds, DEDUPE_PREFIX, clock)


def parked_marks(ttl_seconds: int, clock: Callable[[], float] | None = None) -> Marks:
    """Parked events: a mark of (reason, body) each, so one delivery is parked once."""
    return Marks(PARKED_IDS_KEY, ttl_seconds, PARKED_MARK_PREFIX, clock)


#: Each registry, with the per-key mark prefixes that releases before it wrote in its stead.
LEGACY_PREFIXES = {EVENT_IDS_KEY: (DEDUPE_PREFIX, PUBLISHED_PREFIX), PARKED_IDS_KEY: (PARKED_MARK_PREFIX,)}


def start_without_legacy_window(client: redis.Redis) -> list[str]:
    """``redis-setup``: on a Redis new to this service (no registry, no registered RQ worker, no
    per-key mark of an earlier release), write both registries empty: their families then open no
    legacy window, and no lookup reads per-key marks. Returns the registries written; on any other
    Redis, none (the first mark opens the window, as without ``redis-setup``)."""
    registries = list(LEGACY_PREFIXES)
    if client.exists(*registries) or client.scard(REDIS_WORKER_KEYS):
        return []
    prefixes = [prefix for registry in registries for prefix in LEGACY_PREFIXES[registry]]
    if any(next(client.scan_iter(match=f"{prefix}*", count=1000), None) is not None for prefix in prefixes):
        return []
    return [registry for registry in registries if client.set(registry, "", nx=True)]
