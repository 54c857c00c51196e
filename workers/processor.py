"""One accepted delivery → one enriched entry on the output stream, or one parked entry. The steps
and their Redis keys: docs/architecture.md; each kind of failure: docs/reliability.md."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypedDict

import structlog

from core import metrics
from core.config import Settings
from core.errors import InvalidPayload, SmartcarUnauthorized, SmartcarUnavailable, TransientError
from core.events.model import VehicleEvent
from core.events.parse import delivery_id_of, parse_stored
from core.events.wire import VEHICLE_ERROR
from core.logs import get_logger
from core.redis.clients import worker_redis
from core.redis.deployment_counts import DeploymentCounts
from core.redis.group import GroupCommit
from core.redis.jobs import JobPayload
from core.redis.outage import REDIS_PATIENCE_SECONDS, until_redis_answers_async
from core.redis.parked import ParkedStream
from core.redis.published import OutputStream, StateChanged
from core.redis.vehicle_state import VehicleStates
from core.smartcar.event_reads import VehicleReads
from core.smartcar.http import LeanHttp
from core.smartcar.reads import Read
from core.store.users import UserRecord, UserStore
from workers.output import Enrichment, build_document, stream_fields

log = get_logger("smartcar_ingest.worker")


class JobResult(TypedDict):
    """What one job did with its event: the RQ job's result."""

    eventId: str
    status: Literal["published", "already_published", "parked"]
    reason: str | None
    entryId: str | None


#: How long a worker process remembers a user it found (a re-link shows within this time), and
#: how many it remembers at most.
USER_CACHE_SECONDS = 60.0
USER_CACHE_SIZE = 100_000
#: The most users one query looks up.
USER_LOOKUP_BATCH = 500
#: Redis connections of a worker process's jobs: each call holds one for a round trip only.
REDIS_CONNECTIONS = 32


@dataclass
class EventProcessor:
    """Processes job payloads written by :mod:`core.redis.inbox`. Safe to run many at once."""

    users: UserStore
    reads: VehicleReads
    output: OutputStream
    parked: ParkedStream
    vehicle_states: VehicleStates
    counts: DeploymentCounts
    known_users: dict[str, tuple[UserRecord, float]] = field(default_factory=dict, init=False)
    _lookups: GroupCommit[str, UserRecord | None] = field(init=False)

    def __post_init__(self) -> None:
        self._lookups = GroupCommit(self._look_up, USER_LOOKUP_BATCH)

    async def process(
        self, payload: JobPayload, final_attempt: bool, budget_seconds: float, check_published: bool
    ) -> JobResult:
        """Publish or park one event; raises a :class:`TransientError` only when a retry may help and
        this is not the final attempt. ``check_published``: the job ran before (docs/reliability.md)."""
        # Every line logged while this event is processed carries its ids (bound to this job's task).
        with structlog.contextvars.bound_contextvars(eventId=payload["eventId"], deliveryId=None, eventType=None):
            event_id, body, received_at = payload["eventId"], payload["body"], payload["receivedAt"]
            try:
                event = parse_stored(body)  # what it cannot read is parked (and can be replayed)
            except InvalidPayload as exc:
                structlog.contextvars.bind_contextvars(deliveryId=delivery_id_of(body))
                return await self._park(event_id, exc.code, exc.message, body)

            structlog.contextvars.bind_contextvars(deliveryId=event.meta.deliveryId, eventType=event.event_type)
            self.counts.saw(event)  # the VEHICLE_ERROR alert's vehicle counts
            # Each Redis call here waits out a short outage; all are idempotent (guarded by the event's mark).
            if check_published and await until_redis_answers_async(
                lambda: self.output.was_published(event_id), give_up_after=REDIS_PATIENCE_SECONDS
            ):
                log.debug("event already published")
                return JobResult(eventId=event_id, status="already_published", reason=None, entryId=None)
            try:
                async with asyncio.timeout(budget_seconds):
                    user = await self._find_user(event.smartcar_user_id)
                    if user is None:
                        raise InvalidPayload(
                            "No internal user has this Smartcar user id; link it (users link or backfill), then replay.",
                            "unknown_user",
                        )
                    enrichment = await self._enrich(event, received_at)
            except TimeoutError:
                if final_attempt:
                    return await self._park(event_id, "retries_exhausted", "Enrichment ran out of time.", body)
                raise SmartcarUnavailable("Enrichment ran out of time; the job will be retried.") from None
            # Parked outside the time budget (parking waits out Redis on its own).
            except (SmartcarUnauthorized, InvalidPayload) as exc:
                return await self._park(event_id, exc.code, exc.message, body)
            except TransientError as exc:
                if final_attempt:
                    return await self._park(event_id, "retries_exhausted", exc.message, body)
                log.warning("transient failure, job will be retried", error=exc.code, detail=exc.message)
                raise

            published_at = time.time_ns() // 1_000_000
            output = build_document(event, user, enrichment, received_at, published_at)
            entry_id = await self._publish(event, user, output, vehicle_from_api=enrichment.vehicle is not None)
            if entry_id is None:
                log.debug("event already published")
                return JobResult(eventId=event_id, status="already_published", reason=None, entryId=None)
            metrics.END_TO_END_SECONDS.observe(max(0, published_at - received_at) / 1000)
            log.debug("event published", enrichment=enrichment.status, latencyMs=published_at - received_at)
            return JobResult(eventId=event_id, status="published", reason=None, entryId=entry_id)

    async def _publish(
        self, event: VehicleEvent, user: UserRecord, output: dict[str, Any], vehicle_from_api: bool
    ) -> str | None:
        """Publish the document and its merge into the vehicle's state; the entry id, or None if out already."""
        signals = [*output["signals"], *output["latestSignals"]]
        plan_merge = partial(self.vehicle_states.plan, event.vehicle.id, signals, output["vehicle"], vehicle_from_api)
        while True:
            plan = await until_redis_answers_async(plan_merge, give_up_after=REDIS_PATIENCE_SECONDS)
            output["staleSignals"] = plan.stale_signals
            publish = partial(self.output.publish, event.event_id, stream_fields(event, user, output), plan)
            try:
                return await until_redis_answers_async(publish, give_up_after=REDIS_PATIENCE_SECONDS)
            except StateChanged:
                log.debug("vehicle state changed while planning the merge; planning again")

    async def _find_user(self, smartcar_user_id: str) -> UserRecord | None:
        """The user linked to ``smartcar_user_id``; only found users are remembered (a link shows at once)."""
        now = time.monotonic()
        cached = self.known_users.get(smartcar_user_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        user = await self._lookups.submit(smartcar_user_id)
        if user is not None:
            # Inserted last, so the dict stays in expiry order; when full, only the oldest goes
            # (clearing it all would send every lookup to the database at once).
            self.known_users.pop(smartcar_user_id, None)
            if len(self.known_users) >= USER_CACHE_SIZE:
                del self.known_users[next(iter(self.known_users))]
            self.known_users[smartcar_user_id] = (user, now + USER_CACHE_SECONDS)
        return user

    async def _look_up(self, smartcar_user_ids: list[str]) -> list[UserRecord | None]:
        """The lookups of the events in flight meanwhile: one query, off the event loop."""
        found = await asyncio.to_thread(self.users.find_by_smartcar_user_ids, smartcar_user_ids)
        return [found.get(i) for i in smartcar_user_ids]

    async def _enrich(self, event: VehicleEvent, received_at_ms: int) -> Enrichment:
        """Read the vehicle and its signals (refused or rate-limited: partial); raises a revoked access first."""
        outcomes = await self.reads.read_event(
            event.vehicle.id,
            event.smartcar_user_id,
            received_at_ms,
            after_error=event.event_type == VEHICLE_ERROR,
        )
        if errors := [result for result in outcomes if isinstance(result, BaseException)]:
            raise next((e for e in errors if isinstance(e, SmartcarUnauthorized)), errors[0])
        vehicle, signals = outcomes
        assert isinstance(vehicle, Read)
        assert isinstance(signals, Read)
        enrichment = Enrichment()
        for read in (vehicle, signals):
            enrichment.reads[read.call] = read.describe()
            if (error := read.error) is not None:
                enrichment.errors.append(
                    {"call": read.call, "status": error.status, "type": error.error_type, "code": error.error_code}
                )
        if isinstance(vehicle.data, dict):
            enrichment.vehicle = vehicle.data
        if isinstance(signals.data, list):
            enrichment.signals = signals.data
        return enrichment

    async def _park(self, event_id: str, reason: str, detail: str, body: str) -> JobResult:
        entry_id = await until_redis_answers_async(
            lambda: self.parked.park(event_id, reason, detail, body), give_up_after=REDIS_PATIENCE_SECONDS
        )
        if entry_id is None:
            log.debug("event already parked", reason=reason)
        else:
            log.warning("event parked", reason=reason, detail=detail)
        return JobResult(eventId=event_id, status="parked", reason=reason, entryId=entry_id)


async def open_processor(settings: Settings, http_connections: int, stack: AsyncExitStack) -> EventProcessor:
    """The processor and what its jobs share, opened on the running loop; ``stack`` closes them."""
    redis = worker_redis(settings, min(http_connections, REDIS_CONNECTIONS))
    stack.push_async_callback(redis.aclose)
    http = LeanHttp(http_connections)
    stack.push_async_callback(http.aclose)
    users = UserStore(settings.database_url)
    stack.callback(users.dispose)
    counts = DeploymentCounts(redis)
    counts.start()
    stack.push_async_callback(counts.aclose)
    return EventProcessor(
        users,
        VehicleReads(settings, redis, http),
        OutputStream(
            redis,
            settings.output_stream,
            published_ttl_seconds=settings.dedupe_ttl_seconds,
            retention_seconds=settings.output_stream_retention_seconds,
            state_ttl_seconds=settings.vehicle_state_ttl_seconds,
        ),
        ParkedStream(redis, settings.parked_stream, settings.dedupe_ttl_seconds, settings.parked_retention_seconds),
        vehicle_states=VehicleStates(redis, settings.vehicle_state_prefix),
        counts=counts,
    )
