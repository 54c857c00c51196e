"""The emulator's control API under ``/_emulator/``, for tests and benchmarks to steer it over HTTP.

- ``POST /_emulator/failures``: add a rule (JSON: :class:`emulator.state.FailureSpec`); 201 with the rule.
- ``GET /_emulator/failures``: ``{"failures": [rule, ...]}``, in matching order.
- ``DELETE /_emulator/failures``: drop every rule; ``{"cleared": n}``.
- ``POST /_emulator/rate-limits``: ``{"vehicleId"?, "seconds", "retryAfter"?}`` (:mod:`emulator.limits`):
  for ``seconds`` every call for that vehicle answers ``429 RATE_LIMIT:VEHICLE`` with ``Retry-After``
  (the seconds left), or, without ``vehicleId``, every API call but the token endpoint answers
  ``429 RATE_LIMIT:SMARTCAR_API`` (with ``Retry-After`` only if ``retryAfter`` is true); 201 with the
  limit. ``GET`` lists the limits in force (``{"limits": [...]}``), ``DELETE`` lifts them (``{"lifted": n}``).
- ``GET /_emulator/calls``: ``{"calls": [{"at", "route", "vehicleId", "status"}, ...]}``, every API call
  (not the token endpoint) oldest first; ``at`` is when it was answered, epoch ms.
- ``POST /_emulator/revoke``: revoke every issued token; ``{"revoked": n}`` (tokens that were live).
- ``POST /_emulator/expire``: expire every issued token now; ``{"expired": n}``.
- ``POST /_emulator/latency``: ``{"seconds": 0.1}`` (0 to 60), echoed back.
- ``POST /_emulator/connections``: ``{"userId", "vehicleId", "createdAt"?}`` makes a connection as a
  user going through Connect would: ``GET /v3/connections`` lists it and the user may read the
  vehicle. ``vehicleId`` must be a seed vehicle. ``createdAt`` is served verbatim as
  ``attributes.createdAt``: left out of the request it is now (ISO-8601, UTC, milliseconds), and
  ``null`` leaves the field out. 201 with the connection item.
- ``GET /_emulator/stats``: counts since start or reset (below).
- ``POST /_emulator/reset``: no tokens, rules, rate limits, counts, logged calls or run-time
  connections; the configured latency; ``{"reset": true}``.
- ``GET /_emulator/healthz``: ``{"status": "ok"}``.

A rule as reported: ``{"id", "path", "status", "count", "rate", "retry_after", "type", "code",
"detail", "remaining"}``. Stats: ``{"token_requests", "tokens_issued", "injected_failures",
"calls": {template: n}, "statuses": {"200": n}, "statuses_by_route": {template: {"200": n}},
"latency_seconds", "live_tokens", "active_failures"}``; templates are route paths such as
``/v3/vehicles/{id}/signals``, and ``<unmatched>`` counts calls to unknown paths. Invalid bodies
get 400 ``{"error": {"code": "invalid_request", "message": ..., "details": [...]}}``.
Control calls are never delayed, failed or counted.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulator.catalog import Catalog, Connection
from emulator.limits import RateLimitSpec
from emulator.state import EmulatorState, FailureSpec


class LatencySpec(BaseModel):
    """The JSON body of ``POST /_emulator/latency``."""

    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, le=60)


class ConnectionSpec(BaseModel):
    """The JSON body of ``POST /_emulator/connections``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    user_id: str = Field(alias="userId", min_length=1, max_length=64)
    vehicle_id: str = Field(alias="vehicleId", min_length=1)
    created_at: str | int | float | None = Field(default=None, alias="createdAt")


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _invalid(exc: ValidationError) -> Response:
    details = json.loads(exc.json(include_url=False))
    message = "The request body does not match the expected JSON."
    return JSONResponse({"error": {"code": "invalid_request", "message": message, "details": details}}, 400)


def control_routes(state: EmulatorState, catalog: Catalog) -> list[Route]:
    """The ``/_emulator/`` routes acting on ``state`` (``catalog`` names the vehicles that exist)."""

    async def add_failure(request: Request) -> Response:
        try:
            spec = FailureSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            return _invalid(exc)
        return JSONResponse(state.failures.add(spec).describe(), 201)

    async def list_failures(request: Request) -> Response:
        return JSONResponse({"failures": state.failures.describe()})

    async def clear_failures(request: Request) -> Response:
        return JSONResponse({"cleared": state.failures.clear()})

    async def add_rate_limit(request: Request) -> Response:
        try:
            spec = RateLimitSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            return _invalid(exc)
        return JSONResponse(state.rate_limits.add(spec), 201)

    async def list_rate_limits(request: Request) -> Response:
        return JSONResponse({"limits": state.rate_limits.describe()})

    async def lift_rate_limits(request: Request) -> Response:
        return JSONResponse({"lifted": state.rate_limits.clear()})

    async def calls(request: Request) -> Response:
        return JSONResponse({"calls": state.calls.snapshot()})

    async def revoke(request: Request) -> Response:
        return JSONResponse({"revoked": state.tokens.revoke_all()})

    async def expire(request: Request) -> Response:
        return JSONResponse({"expired": state.tokens.expire_all()})

    async def set_latency(request: Request) -> Response:
        try:
            spec = LatencySpec.model_validate_json(await request.body())
        except ValidationError as exc:
            return _invalid(exc)
        state.latency = spec.seconds
        return JSONResponse({"seconds": state.latency})

    async def add_connection(request: Request) -> Response:
        try:
            spec = ConnectionSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            return _invalid(exc)
        vehicle = catalog.vehicle(spec.vehicle_id)
        if vehicle is None:
            message = f"No seed vehicle has id {spec.vehicle_id}."
            return JSONResponse({"error": {"code": "invalid_request", "message": message, "details": []}}, 400)
        # Absent means "now"; an explicit null means "no creation time at all".
        created_at = spec.created_at if "created_at" in spec.model_fields_set else _now_iso()
        connection = Connection(str(uuid.uuid4()), spec.user_id, vehicle, created_at)
        state.connections.append(connection)
        api_base = f"{str(request.base_url).rstrip('/')}/v3"
        return JSONResponse(connection.resource(api_base), 201)

    async def stats(request: Request) -> Response:
        snapshot = state.stats.snapshot()
        snapshot.update(
            latency_seconds=state.latency,
            live_tokens=state.tokens.live,
            active_failures=len(state.failures.describe()),
        )
        return JSONResponse(snapshot)

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return [
        Route("/_emulator/failures", add_failure, methods=["POST"]),
        Route("/_emulator/failures", list_failures, methods=["GET"]),
        Route("/_emulator/failures", clear_failures, methods=["DELETE"]),
        Route("/_emulator/rate-limits", add_rate_limit, methods=["POST"]),
        Route("/_emulator/rate-limits", list_rate_limits, methods=["GET"]),
        Route("/_emulator/rate-limits", lift_rate_limits, methods=["DELETE"]),
        Route("/_emulator/calls", calls, methods=["GET"]),
        Route("/_emulator/revoke", revoke, methods=["POST"]),
        Route("/_emulator/expire", expire, methods=["POST"]),
        Route("/_emulator/latency", set_latency, methods=["POST"]),
        Route("/_emulator/connections", add_connection, methods=["POST"]),
        Route("/_emulator/stats", stats, methods=["GET"]),
        Route("/_emulator/reset", reset, methods=["POST"]),
        Route("/_emulator/healthz", healthz, methods=["GET"]),
    ]
