"""One accepted delivery → one enriched entry on the output stream (or one parked entry).

The steps: parse the body as received → look the user up by ``data.user.id`` → fetch the
vehicle and its latest signals concurrently with the application token and ``sc-user-id`` →
build the output document → publish it idempotently.

What happens on failure:

========================================  ==================================================
unknown user                              parked ``unknown_user`` (``users link`` + ``replay``)
body that does not parse (for any reason) parked with the parser's reason, never failed in RQ
Smartcar refuses a read (4xx, not 401)    published with ``enrichment.status = "partial"``
401 even after a token refresh            parked ``upstream_rejected``
transient (network, 5xx, 429, database)   raised so RQ retries the job; on the last attempt,
                                          parked ``retries_exhausted``
========================================  ==================================================
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog

from core import events, metrics
from core.errors import (
    InvalidPayload,
    LegacyPayload,
    SmartcarRejected,
    SmartcarUnauthorized,
    SmartcarUnavailable,
    TransientError,
    UnknownEventType,
    UnknownUser,
)
from core.logs import get_logger
from core.redis.jobs import JobPayload
from core.redis.outage import until_redis_answers_async
from core.redis.parked import ParkedStream
from core.redis.published import OutputStream
from core.smartcar.client import SmartcarClient
from core.smartcar.sharing import SharedReads
from core.store.users import UserStore
from workers.output import Enrichment, build_document, stream_fields

log = get_logger("smartcar_ingest.worker")
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """What processing one event did; returned as the RQ job's result."""

    event_id: str
    status: Literal["published", "already_published", "parked"]
    reason: str | None = None
    entry_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"eventId": self.event_id, "status": self.status, "reason": self.reason, "entryId": self.entry_id}

    @property
    def metric_outcome(self) -> str:
        """The ``outcome`` label of ``smartcar_ingest_jobs_total``: the status, ``parked_<reason>`` when parked."""
        return f"parked_{self.reason}" if self.status == "parked" else self.status


#: How long a job waits out Redis trouble before giving up; the worker then requeues it once Redis
#: answers, without spending a retry (workers.worker).
REDIS_PATIENCE_SECONDS = 60.0


async def _through_outage(call: Callable[[], Awaitable[T]], patience: float = REDIS_PATIENCE_SECONDS) -> T:
    """Run a Redis call, waiting out a short outage (or a Redis refusing writes, see
    :func:`core.redis.outage.redis_unavailable`) rather than failing the job over it; past
    ``patience`` seconds the Redis error is raised.

    The calls wrapped here are idempotent (a read, and the publish and the park, each guarded by
    its mark), so a retry after a lost answer is safe.
    """
    return await until_redis_answers_async(call, give_up_after=patience)


class EventProcessor:
    """Processes job payloads written by :mod:`core.redis.inbox`. Safe to run many at once."""

    def __init__(self, users: UserStore, smartcar: SmartcarClient, output: OutputStream, parked: ParkedStream) -> None:
        self._users = users
        self._smartcar = smartcar
        self._output = output
        self._parked = parked
        self._shared = SharedReads()

    async def process(self, payload: JobPayload, final_attempt: bool, budget_seconds: float = 60.0) -> Outcome:
        """Process one job payload. Raises a :class:`TransientError` only when a retry may help
        and this is not the final attempt. The lookup and the Smartcar calls together get at most
        ``budget_seconds``; running out counts as a transient failure.

        Counts the job in ``smartcar_ingest_jobs_total`` by outcome (``retried`` when a transient
        error is raised for RQ to retry, ``error`` for anything unexpected).
        """
        event_id = payload["eventId"]
        # Every line logged while this event is processed (here, by the token provider, by
        # stamina's retry hook) carries its ids. The binding is local to this job's asyncio task.
        with structlog.contextvars.bound_contextvars(eventId=event_id, deliveryId=None, eventType=None):
            try:
                outcome = await self._process(event_id, payload, final_attempt, budget_seconds)
            except TransientError:
                metrics.JOBS.labels(outcome="retried").inc()
                raise
            except Exception:
                metrics.JOBS.labels(outcome="error").inc()
                raise
        metrics.JOBS.labels(outcome=outcome.metric_outcome).inc()
        return outcome

    async def _process(self, event_id: str, payload: JobPayload, final_attempt: bool, budget_seconds: float) -> Outcome:
        body = payload["body"]
        # 0 stands for "not recorded" (hand-made jobs in tests): count from now instead.
        received_at = payload["receivedAt"] or time.time_ns() // 1_000_000
        try:
            event = parse_body(body)
        except (InvalidPayload, LegacyPayload, UnknownEventType) as exc:
            structlog.contextvars.bind_contextvars(deliveryId=_delivery_id(body))
            return await self._park(event_id, exc.code, exc.message, body)

        structlog.contextvars.bind_contextvars(deliveryId=event.meta.deliveryId, eventType=event.event_type)
        # A re-run after a crash, or a replay, skips the Smartcar calls when the event is out already.
        if await _through_outage(lambda: self._output.was_published(event_id)):
            log.info("event already published")
            return Outcome(event_id, "already_published")
        try:
            async with asyncio.timeout(budget_seconds):
                user = await asyncio.to_thread(self._users.find_by_smartcar_user_id, event.smartcar_user_id)
                if user is None:
                    raise UnknownUser(
                        "No internal user has this Smartcar user id; link it (users link or backfill), then replay."
                    )
                enrichment = await self._enrich(event, received_at)
        except TimeoutError:
            if final_attempt:
                return await self._park(event_id, "retries_exhausted", "Enrichment ran out of time.", body)
            raise SmartcarUnavailable("Enrichment ran out of time; the job will be retried.") from None
        except SmartcarUnauthorized as exc:
            return await self._park(event_id, "upstream_rejected", exc.message, body)
        except UnknownUser as exc:  # parked outside the time budget: parking waits out Redis on its own
            return await self._park(event_id, exc.code, exc.message, body)
        except InvalidPayload as exc:  # the client refused an id the parser let through
            return await self._park(event_id, exc.code, exc.message, body)
        except TransientError as exc:
            if final_attempt:
                return await self._park(event_id, "retries_exhausted", exc.message, body)
            log.warning("transient failure, job will be retried", error=exc.code, detail=exc.message)
            raise

        published_at = time.time_ns() // 1_000_000
        output = build_document(event, user, enrichment, received_at, published_at)
        fields = stream_fields(event, user, output)
        entry_id = await _through_outage(lambda: self._output.publish(event_id, fields))
        if entry_id is None:
            log.info("event already published")
            return Outcome(event_id, "already_published")
        metrics.END_TO_END_SECONDS.observe(max(0, published_at - received_at) / 1000)
        log.info(
            "event published",
            enrichment=enrichment.status,
            latencyMs=published_at - received_at,
        )
        return Outcome(event_id, "published", entry_id=entry_id)

    async def _enrich(self, event: events.VehicleEvent, received_at_ms: int) -> Enrichment:
        """Fetch the vehicle and its signals concurrently; refusals become partial enrichment.

        Events for the same vehicle in flight together share calls that started after they
        were received (:class:`core.smartcar.sharing.SharedReads`), which cannot make their data older.
        """
        vehicle_id, user_id = event.vehicle.id, event.smartcar_user_id
        outcomes: tuple[Any, Any] = await asyncio.gather(
            self._read("vehicle", vehicle_id, user_id, received_at_ms, self._smartcar.get_vehicle),
            self._read("signals", vehicle_id, user_id, received_at_ms, self._smartcar.get_signals),
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

    async def _read(
        self,
        call: Literal["vehicle", "signals"],
        vehicle_id: str,
        user_id: str,
        received_at_ms: int,
        fetch: Callable[[str, str], Awaitable[Any]],
    ) -> Any:
        """One shared read (:class:`SharedReads`), counted in ``smartcar_ingest_shared_reads_total``
        when it joined another event's call instead of starting its own."""
        started = False

        def start() -> Awaitable[Any]:
            nonlocal started
            started = True
            return fetch(vehicle_id, user_id)

        try:
            return await self._shared.read((call, vehicle_id, user_id), received_at_ms, start)
        finally:
            if not started:
                metrics.SHARED_READS.labels(call=call).inc()

    async def _park(self, event_id: str, reason: str, detail: str, body: str) -> Outcome:
        entry_id = await _through_outage(lambda: self._parked.park(event_id, reason, detail, body))
        if entry_id is None:
            log.info("event already parked", reason=reason)
        else:
            log.warning("event parked", reason=reason, detail=detail)
        return Outcome(event_id, "parked", reason=reason, entry_id=entry_id)


def parse_body(body: str) -> events.VehicleEvent:
    """The worker's parse step: the body as received → the normalised event.

    Raises :class:`InvalidPayload`, :class:`LegacyPayload` or :class:`UnknownEventType` and
    nothing else, so that a body the parser cannot read is parked (and can be replayed) instead
    of ending in RQ's failed registry. The body is validated once, by the model the web edge
    validates it with (:func:`core.events.parse_stored`).
    """
    return events.parse_stored(body)


def _delivery_id(body: str) -> str | None:
    """``meta.deliveryId`` of a body that did not parse as an event, for the logs; never raises."""
    return events.delivery_id_of(body)
