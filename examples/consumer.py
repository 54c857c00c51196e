"""An example consumer of ``smartcar:vehicle-events`` (see docs/consumers.md).

It keeps the newest value of every signal per vehicle, which shows the three things every
consumer of the stream must get right:

* **a consumer group**, so several replicas share the stream and each entry is handled by one
  of them (``XGROUP CREATE … $ MKSTREAM``, ``XREADGROUP``, ``XACK`` once the effect is durable);
* **reclaiming** entries that a crashed replica read but never acknowledged (``XAUTOCLAIM`` of
  entries idle for longer than ``--min-idle``), and setting aside an entry that keeps failing;
* **idempotency and ordering**: an entry can be handled twice (a crash between the effect and
  the ``XACK``), and stream order is not the order of vehicle states. The effect is keyed by
  ``event_id`` and each signal is kept only when its ``oemUpdatedAt`` is newer than what is stored.

Run it beside ``make run``::

    uv run python examples/consumer.py --group latest-signals --consumer "$HOSTNAME"

Needs only ``redis`` (redis-py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger("consumer")

STREAM = "smartcar:vehicle-events"
#: Payload versions this consumer reads: 2 only adds fields (enrichment.reads, staleSignals) to 1.
SCHEMA_VERSIONS = (1, 2)

# The effect, done atomically by Redis: remember the event_id (so a second delivery of the same
# entry changes nothing), then keep each signal only if it is newer than the stored one.
# KEYS: processed marker for the event_id, the vehicle's latest-signals hash.
# ARGV: marker ttl, then (code, oemUpdatedAt, signal JSON) triples.
_APPLY = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return -1
end
local updated = 0
for i = 2, #ARGV, 3 do
  local stored = tonumber(redis.call('HGET', KEYS[2], ARGV[i] .. ':oemUpdatedAt'))
  if stored == nil or stored < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[2], ARGV[i] .. ':oemUpdatedAt', ARGV[i + 1], ARGV[i], ARGV[i + 2])
    updated = updated + 1
  end
end
return updated
"""


class LatestSignals:
    """The example's effect: ``latest:<vehicle id>`` hashes of the newest value per signal code."""

    def __init__(self, client: redis.Redis, prefix: str = "example:", remember_seconds: int = 7 * 86_400) -> None:
        self._prefix = prefix
        self._remember = remember_seconds
        self._apply = client.register_script(_APPLY)

    def __call__(self, fields: dict[str, str]) -> int:
        """Apply one entry; returns how many signals it updated, or -1 if it was applied before."""
        document = json.loads(fields["payload"])
        if document.get("schemaVersion") not in SCHEMA_VERSIONS:
            raise ValueError(f"unsupported schemaVersion {document.get('schemaVersion')!r}")
        args: list[str | int] = [self._remember]
        # The webhook's signals and what the API returned; the newest per code wins either way.
        for signal in [*document.get("signals", []), *document.get("latestSignals", [])]:
            if signal.get("status") == "SUCCESS" and isinstance(signal.get("oemUpdatedAt"), int):
                args += [signal["code"], signal["oemUpdatedAt"], json.dumps(signal, separators=(",", ":"))]
        keys = [f"{self._prefix}processed:{fields['event_id']}", f"{self._prefix}latest:{fields['vehicle_id']}"]
        return int(self._apply(keys=keys, args=args))


class Consumer:
    """Reads the stream as ``consumer`` in ``group`` and hands each entry to ``handle``."""

    def __init__(
        self,
        client: redis.Redis,
        group: str,
        consumer: str,
        handle: Callable[[dict[str, str]], object],
        stream: str = STREAM,
        min_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        batch: int = 100,
    ) -> None:
        self.client = client
        self.group = group
        self.consumer = consumer
        self.handle = handle
        self.stream = stream
        self.min_idle_ms = min_idle_ms
        self.max_deliveries = max_deliveries
        self.batch = batch
        self.dead_letters = f"{stream}:dead:{group}"

    def ensure_group(self, start: str = "$") -> None:
        """Create the group if it does not exist: ``$`` reads only new entries, ``0`` the whole stream."""
        try:
            self.client.xgroup_create(self.stream, self.group, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_new(self, block_ms: int | None = None) -> int:
        """Handle entries never delivered to the group (``>``); returns how many were acknowledged."""
        response: Any = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.batch, block=block_ms
        )
        entries = response[0][1] if response else []
        return sum(self._handle(entry_id, fields) for entry_id, fields in entries)

    def read_own_pending(self) -> int:
        """Handle what this consumer read before a restart but never acknowledged (id ``0``)."""
        handled = 0
        cursor = "0"
        while True:
            response: Any = self.client.xreadgroup(self.group, self.consumer, {self.stream: cursor}, count=self.batch)
            entries = response[0][1] if response else []
            if not entries:
                return handled
            for entry_id, fields in entries:
                handled += self._handle(entry_id, fields)
            cursor = _text(entries[-1][0])

    def reclaim(self) -> int:
        """Take over entries another consumer read but left unacknowledged for ``min_idle_ms``.

        An entry delivered more than ``max_deliveries`` times is moved to the dead-letter stream
        and acknowledged, so one bad entry cannot block the group forever.
        """
        handled = 0
        cursor = "0-0"
        while True:
            claimed: Any = self.client.xautoclaim(
                self.stream, self.group, self.consumer, self.min_idle_ms, start_id=cursor, count=self.batch
            )
            cursor, entries = claimed[0], claimed[1]
            for entry_id, fields in entries:
                if fields is None:  # trimmed from the stream while pending
                    self.client.xack(self.stream, self.group, entry_id)
                elif self._deliveries(entry_id) > self.max_deliveries:
                    self._dead_letter(entry_id, fields)
                else:
                    handled += self._handle(entry_id, fields)
            if _text(cursor) == "0-0":
                return handled

    def run(self, block_ms: int = 5000, burst: bool = False) -> None:
        """Finish this consumer's own pending entries, then reclaim and read; with ``burst``, stop
        once nothing is left to read."""
        self.read_own_pending()
        while True:
            handled = self.reclaim() + self.read_new(None if burst else block_ms)
            if burst and not handled:
                return

    def _handle(self, entry_id: bytes | str, raw: dict[Any, Any]) -> int:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        try:
            self.handle(fields)
        except Exception:  # left pending: reclaimed later, dead-lettered after max_deliveries
            log.exception("entry %s (event %s) failed; left pending", _text(entry_id), fields.get("event_id"))
            return 0
        # Acknowledge only once the effect is durable: a crash before this line redelivers the entry.
        self.client.xack(self.stream, self.group, entry_id)
        return 1

    def _deliveries(self, entry_id: bytes | str) -> int:
        pending: Any = self.client.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        return int(pending[0]["times_delivered"]) if pending else 0

    def _dead_letter(self, entry_id: bytes | str, raw: dict[Any, Any]) -> None:
        with self.client.pipeline() as pipe:
            pipe.xadd(self.dead_letters, {**raw, "source_id": entry_id})
            pipe.xack(self.stream, self.group, entry_id)
            pipe.execute()
        log.warning("entry %s moved to %s", _text(entry_id), self.dead_letters)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    parser.add_argument("--stream", default=os.environ.get("OUTPUT_STREAM", STREAM))
    parser.add_argument("--group", default="latest-signals", help="consumer group (one per downstream service)")
    parser.add_argument("--consumer", default=socket.gethostname(), help="this replica's name, stable across restarts")
    parser.add_argument(
        "--from-start", action="store_true", help="a new group reads the whole stream, not only new entries"
    )
    parser.add_argument(
        "--min-idle", type=int, default=60_000, help="ms before another replica's pending entry is reclaimed"
    )
    parser.add_argument("--burst", action="store_true", help="exit once nothing is left to read")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    client = redis.Redis.from_url(args.redis_url)
    consumer = Consumer(
        client, args.group, args.consumer, LatestSignals(client), stream=args.stream, min_idle_ms=args.min_idle
    )
    consumer.ensure_group("0" if args.from_start else "$")
    try:
        consumer.run(burst=args.burst)
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
