"""``POST /webhooks/smartcar``, the ingest edge: a plain ASGI app (the hot path) checking in the
contract's order (docs/architecture.md, docs/security.md); a 2xx only once Redis or the spool holds it."""

from __future__ import annotations

import asyncio
import errno
import time
from typing import Any

import pydantic_core
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from core import metrics
from core.config import Settings
from core.errors import InvalidPayload, MalformedBody, PermanentError
from core.events import parse
from core.events.model import QuickEvent
from core.logs import get_logger
from core.redis.functions import MissingFunction
from core.redis.inbox import Inbox
from core.signatures import answer_challenge, is_token_like, verify_signature
from service.responses import error_body
from service.spool import Spool, SpooledDelivery

log = get_logger("smartcar_ingest.webhooks")

#: After a Redis failure, how long deliveries go straight to the spool (when one is set).
SPOOL_ONLY_SECONDS = 1.0
_JSON = (b"content-type", b"application/json")
_RETRY_AFTER = (b"retry-after", b"5")  # on every 503
#: The largest unsigned body read for a VERIFY challenge (a VERIFY is a few hundred bytes); a larger
#: one that fails the signature is refused unread, costing what any rejected request costs.
UNSIGNED_VERIFY_MAX_BYTES = 4096

_OUTCOME_ACCEPTED = metrics.DELIVERIES.labels(outcome="accepted")
_OUTCOME_DUPLICATE = metrics.DELIVERIES.labels(outcome="duplicate")


class Deadlines:
    """In place of ``asyncio.timeout`` (dearer: docs/performance.md): a sweep every ``tick`` seconds,
    while any task is registered, cancels each task past its time."""

    def __init__(self, tick: float = 0.05) -> None:
        self._tick = tick
        #: Registered tasks: when they must be done by, and how many cancellations they had then.
        self._due: dict[asyncio.Task[Any], tuple[float, int]] = {}
        #: Tasks cancelled by their deadline, not yet told (:meth:`expired`).
        self._fired: dict[asyncio.Task[Any], int] = {}
        self._armed: asyncio.AbstractEventLoop | None = None  # the sweep's loop, while it runs

    def start(self, seconds: float, task: asyncio.Task[Any] | None = None) -> asyncio.Task[Any]:
        """Give ``task`` (by default the current one) ``seconds``, less a tick, for its next wait."""
        if task is None:
            task = asyncio.current_task()
            assert task is not None, "a deadline belongs to a task"
        loop = task.get_loop()
        self._due[task] = (loop.time() + max(0.0, seconds - self._tick), task.cancelling())
        if self._armed is not loop:
            self._armed = loop
            loop.call_later(self._tick, self._sweep, loop)
        return task

    def stop(self, task: asyncio.Task[Any]) -> None:
        self._due.pop(task, None)
        self._fired.pop(task, None)

    def expired(self, task: asyncio.Task[Any]) -> TimeoutError:
        """Call in an ``except CancelledError``: a ``TimeoutError`` when the cancellation is the
        deadline's alone (it is then withdrawn, as ``asyncio.timeout`` does); else re-raises it."""
        cancelling = self._fired.pop(task, None)
        if cancelling is None or task.uncancel() > cancelling:
            raise  # the CancelledError the caller is handling
        return TimeoutError()

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._armed:
            return  # the endpoint moved to another loop (tests), which runs its own sweep
        now = loop.time()
        late = [task for task, (due, _) in self._due.items() if due <= now or task.get_loop() is not loop]
        for task in late:
            _, cancelling = self._due.pop(task)
            if task.get_loop() is loop:
                self._fired[task] = cancelling
                task.cancel()
        if self._due:
            loop.call_later(self._tick, self._sweep, loop)
        else:
            self._armed = None


def redis_deadline_seconds(settings: Settings) -> float:
    """How long a request waits on Redis before answering 503: two socket timeouts (reconnect, call)."""
    return min(0.95, settings.redis_timeout_seconds * 1.9)


Answer = tuple[int, bytes]  # a status and its JSON body


def _json(status: int, content: Any) -> Answer:
    return status, pydantic_core.to_json(content)


def _accepted(status: bytes, event_id: str) -> Answer:  # nearly every delivery's answer, written directly
    return 202, b'{"status":"%s","eventId":%s}' % (status, pydantic_core.to_json(event_id))


def _error(status: int, code: str, message: str) -> Answer:
    return _json(status, error_body(code, message))


class WebhookEndpoint:
    def __init__(self, settings: Settings, inbox: Inbox, spool: Spool | None = None) -> None:
        self._tokens = settings.management_tokens
        self._max_body_bytes = settings.max_body_bytes
        self._body_timeout = settings.body_timeout_seconds
        self._redis_deadline = redis_deadline_seconds(settings)
        #: Signed deliveries sent longer ago than this (``meta.deliveredAt``) are refused.
        self._max_delivery_age_ms = settings.delivery_max_age_seconds * 1000
        self._inbox = inbox
        self._spool = spool
        self._spool_only_until = 0.0
        self._deadlines = Deadlines()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            status, body = await self._handle(scope, receive)
        except Exception as exc:  # a bug must not become a 500, nor lose the delivery: Smartcar retries a 503
            status, body = self._internal_error(exc)
        headers = [_JSON, (b"content-length", b"%d" % len(body))]
        if status == 503:
            headers.append(_RETRY_AFTER)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive) -> Answer:
        signature: str | None = None
        declared: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"sc-signature":
                signature = value.decode("latin-1")
            elif name == b"content-length":
                declared = value

        # 1. Size: refuse early on a declared length, and stop reading past the limit otherwise.
        task = self._deadlines.start(self._body_timeout)
        try:
            body = await self._read_body(receive, declared)
        except asyncio.CancelledError:
            self._deadlines.expired(task)
            return self._reject(408, "body_timeout", "The body did not arrive in time.")
        finally:
            self._deadlines.stop(task)
        if isinstance(body, tuple):
            return body
        received_at_ms = time.time_ns() // 1_000_000

        # 2. Signature. An unsigned VERIFY is answered only for a token-like challenge, so the
        # endpoint never signs bytes that could pass for a delivery body.
        if not verify_signature(self._tokens, body, signature):
            try:  # a small body that claims to be a VERIFY
                document = parse.load_json(body) if len(body) <= UNSIGNED_VERIFY_MAX_BYTES else None
            except MalformedBody:
                document = None
            challenge = parse.verify_challenge_or_none(document)
            if challenge is not None and is_token_like(challenge):
                return self._verify_answer(challenge)
            return self._reject(401, "invalid_signature", "The SC-Signature header is missing or does not match.")

        # Fast path: a well-formed vehicle event, validated from bytes in one pass.
        quick = parse.quick_vehicle_event(body)
        if quick is not None:
            if (too_old := self._too_old(quick.delivered_at_ms, received_at_ms)) is not None:
                return too_old
            return await self._accept(quick, body, received_at_ms, task)

        # 3. JSON: an object, sent recently enough.
        try:
            document = parse.load_json(body)
        except MalformedBody as exc:
            return self._reject(400, exc.code, exc.message)
        if not isinstance(document, dict):
            # A signed scalar or array carries no eventId to dedupe on: parking it would let one
            # signature fill the parked stream.
            return self._reject(400, "not_an_object", "The body is JSON but not an object.")
        if (too_old := self._too_old(parse.delivered_at_ms(document), received_at_ms)) is not None:
            return too_old
        event_id = parse.event_id_of(document)
        text = body.decode("utf-8")  # load_json succeeded, so this is valid UTF-8

        # 4. Event type, then 5. schema.
        try:
            event = parse.parse_document(document)
        except InvalidPayload as exc:
            return await self._park(event_id, exc, text)
        if isinstance(event, str):  # a VERIFY's challenge
            return self._verify_answer(event)
        quick = QuickEvent(event.event_id, event.event_type, event.meta.deliveryId)
        # load_json read it (no NaN or Infinity literal): a JSON object the job can embed as it is.
        return await self._accept(quick, body, received_at_ms, task)

    def _too_old(self, delivered_at_ms: int | None, received_at_ms: int) -> Answer | None:
        """Past the dedupe window, the signed ``meta.deliveredAt`` is the guard against replays."""
        limit = self._max_delivery_age_ms
        if delivered_at_ms is None or received_at_ms - delivered_at_ms <= limit:
            return None
        return self._reject(400, "delivery_too_old", f"The delivery was sent more than {limit // 1000} seconds ago.")

    async def _accept(self, event: QuickEvent, body: bytes, received_at_ms: int, task: asyncio.Task[Any]) -> Answer:
        if self._spool is None or time.monotonic() >= self._spool_only_until:
            self._deadlines.start(self._redis_deadline, task)
            try:
                accepted = await self._inbox.accept(event.event_id, event.event_type, body, received_at_ms)
            except asyncio.CancelledError:
                error: BaseException = self._deadlines.expired(task)
            except (RedisError, OSError) as exc:
                error = exc
            else:
                if accepted:
                    _OUTCOME_ACCEPTED.inc()
                    log.debug("delivery accepted", eventId=event.event_id, deliveryId=event.delivery_id)
                    return _accepted(b"accepted", event.event_id)
                _OUTCOME_DUPLICATE.inc()
                log.debug("delivery duplicate", eventId=event.event_id, deliveryId=event.delivery_id)
                return _accepted(b"duplicate", event.event_id)
            finally:
                self._deadlines.stop(task)
            if self._spool is None:
                return self._unavailable(event.event_id, error)
            # Go straight to the spool for a moment rather than wait out the deadline on every request.
            self._spool_only_until = time.monotonic() + SPOOL_ONLY_SECONDS
        return await self._spooled(SpooledDelivery(event.event_id, event.event_type, body.decode(), received_at_ms))

    async def _read_body(self, receive: Receive, declared: bytes | None) -> bytes | Answer:
        limit = self._max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return self._reject(413, "body_too_large", f"The body exceeds {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return self._reject(400, "client_disconnected", "The client went away before sending the whole body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return self._reject(413, "body_too_large", f"The body exceeds {limit} bytes.")
            if not message.get("more_body", False):
                # Usually the whole body came in one message: no copy.
                return b"".join((*chunks, chunk)) if chunks else chunk
            chunks.append(chunk)

    async def _park(self, event_id: str | None, exc: PermanentError, text: str) -> Answer:
        task = self._deadlines.start(self._redis_deadline)
        try:
            fresh = await self._inbox.parked.park(event_id, exc.code, exc.message, text) is not None
        except asyncio.CancelledError:
            error: BaseException = self._deadlines.expired(task)
        except (RedisError, OSError) as caught:
            error = caught
        else:
            metrics.DELIVERIES.labels(outcome="parked_" + exc.code).inc()
            log.warning("delivery parked", eventId=event_id, reason=exc.code, detail=exc.message, repeat=not fresh)
            content: dict[str, object] = {"status": "parked", "reason": exc.code, "eventId": event_id}
            if not fresh:
                content["duplicate"] = True
            return _json(202, content)
        finally:
            self._deadlines.stop(task)
        if self._spool is None:
            return self._unavailable(event_id, error)
        delivery = SpooledDelivery(event_id, "UNKNOWN", text, time.time_ns() // 1_000_000, exc.code, exc.message)
        return await self._spooled(delivery)

    async def _spooled(self, delivery: SpooledDelivery) -> Answer:
        assert self._spool is not None
        try:
            await asyncio.to_thread(self._spool.append, delivery)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # SPOOL_MAX_BYTES reached, or the disk is full
                metrics.DELIVERIES.labels(outcome="spool_full").inc()
                log.error("redis unavailable and the spool is full, delivery refused", eventId=delivery.event_id)
                return _error(503, "spool_full", "The event store is unreachable and the spool is full; retry later.")
            log.error("spooling failed", eventId=delivery.event_id, error=type(exc).__name__)
            return self._unavailable(delivery.event_id, exc)
        metrics.DELIVERIES.labels(outcome="spooled").inc()
        log.warning("redis unavailable, delivery spooled", eventId=delivery.event_id)
        content: dict[str, object] = {"status": "spooled", "eventId": delivery.event_id}
        if delivery.park_reason is not None:
            content.update(status="parked", reason=delivery.park_reason, spooled=True)
        return _json(202, content)

    def _verify_answer(self, challenge: str) -> Answer:
        metrics.DELIVERIES.labels(outcome="verify").inc()
        log.info("verify challenge answered")
        return _json(200, {"challenge": answer_challenge(self._tokens[0], challenge)})

    def _reject(self, status: int, code: str, message: str) -> Answer:
        metrics.DELIVERIES.labels(outcome="rejected_" + code).inc()
        log.info("delivery rejected", status=status, code=code)
        return _error(status, code, message)

    def _internal_error(self, exc: Exception) -> Answer:  # as service.responses.unexpected_exception
        metrics.DELIVERIES.labels(outcome="internal_error").inc()
        log.error("unhandled error", path="/webhooks/smartcar", error=type(exc).__name__, exc_info=exc)
        return _error(503, "internal_error", "The request could not be handled; retry later.")

    def _unavailable(self, event_id: str | None, exc: BaseException) -> Answer:
        metrics.DELIVERIES.labels(outcome="unavailable").inc()
        # A missing function is a setup step left out: its message says which (no secret in it).
        fix = {"fix": str(exc)} if isinstance(exc, MissingFunction) else {}
        log.error("redis unavailable, delivery refused", eventId=event_id, error=type(exc).__name__, **fix)
        return _error(503, "redis_unavailable", "The event store is unreachable; retry later.")
