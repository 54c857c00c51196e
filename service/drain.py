"""The spool drainer: moves deliveries spooled during a Redis outage into Redis once it is back,
through the same dedupe as live traffic (docs/reliability.md, "Spool file safety")."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Generator
from dataclasses import dataclass

from redis.exceptions import RedisError

from core.logs import get_logger
from core.redis.inbox import Inbox
from service.spool import ReadReport, Spool, SpooledDelivery, read_records

log = get_logger("smartcar_ingest.spool")

#: Deliveries enqueued together while draining (they share round trips through the group commit).
CHUNK = 256


@dataclass
class DrainReport:
    files: int = 0
    accepted: int = 0
    duplicates: int = 0
    parked: int = 0
    torn_tail_bytes: int = 0


def _next_chunk(records: Generator[SpooledDelivery, None, None]) -> list[SpooledDelivery]:
    return list(itertools.islice(records, CHUNK))


async def drain_once(spool: Spool, inbox: Inbox) -> DrainReport:
    """Drain every pending spool file; raises ``RedisError`` (leaving the file) if Redis fails."""
    report = DrainReport()
    for path in await asyncio.to_thread(spool.pending):
        claimed = await asyncio.to_thread(spool.claim, path)
        if claimed is None:
            continue
        read = ReadReport()
        records = read_records(claimed, read)
        try:
            while chunk := await asyncio.to_thread(_next_chunk, records):
                parks = [d for d in chunk if d.park_reason]
                accepts = [d for d in chunk if not d.park_reason]
                results = await asyncio.gather(
                    *(inbox.accept(str(d.event_id), d.event_type, d.body, d.received_at_ms) for d in accepts)
                )
                report.accepted += sum(results)
                report.duplicates += len(results) - sum(results)
                for d in parks:
                    await inbox.park(d.event_id, str(d.park_reason), d.park_detail or "", d.body)
                    report.parked += 1
        finally:
            records.close()
        if read.torn_tail_bytes:
            # Everything before the tear was applied; the torn bytes are kept for inspection.
            kept = await asyncio.to_thread(spool.set_aside, claimed)
            log.error(
                "spool file ended in a torn record; it was not applied", file=str(kept), bytes=read.torn_tail_bytes
            )
            report.torn_tail_bytes += read.torn_tail_bytes
        else:
            await asyncio.to_thread(spool.finish, claimed)
        report.files += 1
    if report.files:
        log.info(
            "spool drained",
            files=report.files,
            accepted=report.accepted,
            duplicates=report.duplicates,
            parked=report.parked,
        )
    return report


async def drain_forever(spool: Spool, inbox: Inbox, interval_seconds: float = 1.0) -> None:
    """Drain whenever there is something to drain and Redis takes it; runs until cancelled."""
    while True:
        try:
            # Listing the directory also recounts the spool's size for SPOOL_MAX_BYTES.
            if await asyncio.to_thread(spool.pending):
                await drain_once(spool, inbox)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("spool drain paused: Redis not available yet", error=type(exc).__name__)
        await asyncio.sleep(interval_seconds)
