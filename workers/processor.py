"""One accepted delivery → one enriched entry on the output stream (or one parked entry).

The steps: parse the body as received → look the user up by ``data.user.id`` → fetch the
vehicle and its latest signals concurrently with the application token and ``sc-user-id`` →
build the output document → publish it idempotently.

What happens on failure:

========================================  ==================================================
unknown user                              parked ``unknown_user`` (``users link`` + ``replay``)
body that no longer parses                parked with the parser's reason
Smartcar refuses a read (4xx, not 401)    published with ``enrichment.status = "partial"``
401 even after a token refresh            parked ``upstream_rejected``
transient (network, 5xx, 429, database)   raised so RQ retries the job; on the last attempt,
                                          parked ``retries_exhausted``
========================================  ==================================================
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from core import events
from core.errors import (
    InvalidPayload,
    LegacyPayload,
    MalformedBody,
    SmartcarRejected,
    SmartcarUnauthorized,
    SmartcarUnavailable,
    TransientError,
    UnknownEventType,
)
from core.logs import get_logger
from core.output import Enrichment, build_document, stream_fields
from core.sharing import SharedReads
from core.smartcar import SmartcarClient
from core.streams import StreamWriter, published_key
from core.users import UserStore

log = get_logger("smartcar_ingest.worker")


@dataclass(frozen=True)
class Outcome:
    """What processing one event did; returned as the RQ job's result."""

    event_id: str
    status: Literal["published", "already_published", "parked"]
    reason: str | None = None
    entry_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"eventId": self.event_id, "status": self.status, "reason": self.reason, "entryId": self.entry_id}


class EventProcessor:
    """Processes job payloads written by :mod:`core.inbox`. Safe to run many at once."""

    def __init__(self, redis: Redis, users: UserStore, smartcar: SmartcarClient, streams: StreamWriter) -> None:
        self._redis = redis
        self._users = users
        self._smartcar = smartcar
        self._streams = streams
        self._shared = SharedReads()

    async def process(self, payload: dict[str, Any], final_attempt: bool, budget_seconds: float = 60.0) -> Outcome:
        """Process one job payload. Raises a :class:`TransientError` only when a retry may help
        and this is not the final attempt. The lookup and the Smartcar calls together get at most
        ``budget_seconds``; running out counts as a transient failure."""
        event_id = str(payload["eventId"])
        body = str(payload["body"])
        received_at = int(payload.get("receivedAt") or time.time() * 1000)
        try:
            document = events.load_json(body.encode())
            events.classify(document)
            event = events.parse_event(document)
        except MalformedBody as exc:
            return await self._park(event_id, InvalidPayload.code, exc.message, body)
        except (InvalidPayload, LegacyPayload, UnknownEventType) as exc:
            return await self._park(event_id, exc.code, exc.message, body)

        bound = log.bind(eventId=event_id, deliveryId=event.meta.deliveryId, eventType=event.event_type)
        # A re-run after a crash, or a replay, skips the Smartcar calls when the event is out already.
        if await self._redis.exists(published_key(event_id)):
            bound.info("event already published")
            return Outcome(event_id, "already_published")
        try:
            async with asyncio.timeout(budget_seconds):
                user = await asyncio.to_thread(self._users.find_by_smartcar_user_id, event.smartcar_user_id)
                if user is None:
                    return await self._park(
                        event_id,
                        "unknown_user",
                        "No internal user has this Smartcar user id; link it (users link or backfill), then replay.",
                        body,
                    )
                enrichment = await self._enrich(event, received_at)
        except TimeoutError:
            if final_attempt:
                return await self._park(event_id, "retries_exhausted", "Enrichment ran out of time.", body)
            raise SmartcarUnavailable("Enrichment ran out of time; the job will be retried.") from None
        except SmartcarUnauthorized as exc:
            return await self._park(event_id, "upstream_rejected", exc.message, body)
        except TransientError as exc:
            if final_attempt:
                return await self._park(event_id, "retries_exhausted", exc.message, body)
            bound.warning("transient failure, job will be retried", error=exc.code, detail=exc.message)
            raise

        published_at = time.time_ns() // 1_000_000
        output = build_document(event, user, enrichment, received_at, published_at)
        entry_id = await self._streams.publish(event_id, stream_fields(event, user, output))
        if entry_id is None:
            bound.info("event already published")
            return Outcome(event_id, "already_published")
        bound.info(
            "event published",
            enrichment=enrichment.status,
            latencyMs=published_at - received_at,
        )
        return Outcome(event_id, "published", entry_id=entry_id)

    async def _enrich(self, event: events.VehicleEvent, received_at_ms: int) -> Enrichment:
        """Fetch the vehicle and its signals concurrently; refusals become partial enrichment.

        Events for the same vehicle in flight together share calls that started after they
        were received (:class:`core.sharing.SharedReads`), which cannot make their data older.
        """
        vehicle_id, user_id = event.vehicle.id, event.smartcar_user_id
        outcomes: tuple[Any, Any] = await asyncio.gather(
            self._shared.read(
                ("vehicle", vehicle_id, user_id),
                received_at_ms,
                lambda: self._smartcar.get_vehicle(vehicle_id, user_id),
            ),
            self._shared.read(
                ("signals", vehicle_id, user_id),
                received_at_ms,
                lambda: self._smartcar.get_signals(vehicle_id, user_id),
            ),
            return_exceptions=True,
        )
        vehicle, signals = outcomes
        enrichment = Enrichment()
        results: list[tuple[str, object]] = [("vehicle", vehicle), ("signals", signals)]
        # Decide by the most serious failure: revoked access first, then anything transient.
        for _, result in results:
            if isinstance(result, SmartcarUnauthorized):
                raise result
        for _, result in results:
            if isinstance(result, BaseException) and not isinstance(result, SmartcarRejected):
                raise result
        for call, result in results:
            if isinstance(result, SmartcarRejected):
                enrichment.errors.append(
                    {"call": call, "status": result.status, "type": result.error_type, "code": result.error_code}
                )
        if isinstance(vehicle, dict):
            enrichment.vehicle = vehicle
        if isinstance(signals, list):
            enrichment.signals = signals
        return enrichment

    async def _park(self, event_id: str, reason: str, detail: str, body: str) -> Outcome:
        entry_id = await self._streams.park(event_id, reason, detail, body)
        log.warning("event parked", eventId=event_id, reason=reason, detail=detail)
        return Outcome(event_id, "parked", reason=reason, entry_id=entry_id)
