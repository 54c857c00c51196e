"""``POST /webhooks/smartcar``: the ingest edge.

Checks run in the contract's order: size → signature → JSON → event type → schema. Anything
validly signed that cannot be processed is parked (202), because a non-2xx would only earn
three pointless retries from Smartcar and then the event would be gone. A 2xx for a vehicle
event is sent only after Redis has run the atomic dedupe-and-enqueue script.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from core import events, metrics
from core.errors import InvalidPayload, LegacyPayload, MalformedBody, PermanentError, UnknownEventType
from core.inbox import Inbox
from core.logs import get_logger
from core.signatures import answer_challenge, is_token_like, verify_signature
from service.responses import error_response

log = get_logger("smartcar_ingest.webhooks")

RETRY_AFTER_SECONDS = "5"


class BodyTooLarge(Exception):
    """The request body exceeds ``MAX_BODY_BYTES``."""


@dataclass(frozen=True)
class WebhookConfig:
    """What the endpoint needs, fixed at startup."""

    tokens: tuple[bytes, ...]
    max_body_bytes: int
    redis_deadline_seconds: float


class WebhookEndpoint:
    """The Starlette endpoint; one instance per application."""

    def __init__(self, config: WebhookConfig, inbox: Inbox) -> None:
        self._config = config
        self._inbox = inbox

    async def handle(self, request: Request) -> Response:
        """Answer one delivery (the route's endpoint)."""
        started = time.perf_counter()
        response = await self._handle(request)
        metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)
        return response

    async def _handle(self, request: Request) -> Response:
        # 1. Size: refuse early on a declared length, and stop reading past the limit otherwise.
        try:
            body = await self._read_body(request)
        except BodyTooLarge:
            return self._reject(413, "body_too_large", f"The body exceeds {self._config.max_body_bytes} bytes.")
        except ClientDisconnect:
            return self._reject(400, "client_disconnected", "The client went away before sending the whole body.")
        received_at_ms = time.time_ns() // 1_000_000

        # 2. Signature. An unsigned VERIFY is answered only for a token-like challenge, so the
        # endpoint never signs bytes that could pass for a delivery body.
        if not verify_signature(self._config.tokens, body, request.headers.get("sc-signature")):
            challenge = _unsigned_challenge(body)
            if challenge is not None and is_token_like(challenge):
                metrics.DELIVERIES.labels(outcome="verify").inc()
                return self._verify_answer(challenge)
            return self._reject(401, "invalid_signature", "The SC-Signature header is missing or does not match.")

        # 3. JSON.
        try:
            document = events.load_json(body)
        except MalformedBody as exc:
            return self._reject(400, exc.code, exc.message)
        event_id = events.event_id_of(document)
        text = body.decode("utf-8")  # load_json succeeded, so this is valid UTF-8

        # 4. Event type, then 5. schema.
        try:
            event_type = events.classify(document)
            if event_type == events.VERIFY:
                challenge = events.parse_verify(document)
                metrics.DELIVERIES.labels(outcome="verify").inc()
                return self._verify_answer(challenge)
            event = events.parse_event(document)
        except (InvalidPayload, LegacyPayload, UnknownEventType) as exc:
            return await self._park(event_id, exc, text)

        try:
            async with asyncio.timeout(self._config.redis_deadline_seconds):
                accepted = await self._inbox.accept(event.event_id, event.event_type, text, received_at_ms)
        except (RedisError, OSError, TimeoutError) as exc:
            return self._unavailable(event.event_id, exc)
        status = "accepted" if accepted else "duplicate"
        metrics.DELIVERIES.labels(outcome=status).inc()
        log.info(
            "delivery " + status,
            eventId=event.event_id,
            eventType=event.event_type,
            deliveryId=event.meta.deliveryId,
        )
        return JSONResponse({"status": status, "eventId": event.event_id}, status_code=202)

    async def _read_body(self, request: Request) -> bytes:
        limit = self._config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _park(self, event_id: str | None, exc: PermanentError, text: str) -> Response:
        try:
            async with asyncio.timeout(self._config.redis_deadline_seconds):
                fresh = await self._inbox.park(event_id, exc.code, exc.message, text)
        except (RedisError, OSError, TimeoutError) as error:
            return self._unavailable(event_id, error)
        metrics.DELIVERIES.labels(outcome="parked_" + exc.code).inc()
        log.warning("delivery parked", eventId=event_id, reason=exc.code, detail=exc.message, repeat=not fresh)
        content: dict[str, object] = {"status": "parked", "reason": exc.code, "eventId": event_id}
        if not fresh:
            content["duplicate"] = True
        return JSONResponse(content, status_code=202)

    def _verify_answer(self, challenge: str) -> Response:
        log.info("verify challenge answered")
        return JSONResponse({"challenge": answer_challenge(self._config.tokens[0], challenge)})

    def _reject(self, status: int, code: str, message: str) -> Response:
        metrics.DELIVERIES.labels(outcome="rejected_" + code).inc()
        log.info("delivery rejected", status=status, code=code)
        return error_response(status, code, message)

    def _unavailable(self, event_id: str | None, exc: BaseException) -> Response:
        metrics.DELIVERIES.labels(outcome="unavailable").inc()
        log.error("redis unavailable, delivery refused", eventId=event_id, error=type(exc).__name__)
        return error_response(
            503,
            "redis_unavailable",
            "The event store is unreachable; retry later.",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )


def _unsigned_challenge(body: bytes) -> str | None:
    """The challenge of a body that claims to be a VERIFY, or None (never raises)."""
    try:
        document = events.load_json(body)
    except MalformedBody:
        return None
    return events.verify_challenge_or_none(document)
