"""The Smartcar API emulator as a Starlette app: token endpoint, vehicle API v3 and a control API.

Routes (shapes from smartcar.md §4 and §5; one host serves what Smartcar splits over two, so point
``SMARTCAR_TOKEN_URL`` at ``<base>/oauth2/token`` and ``SMARTCAR_API_URL`` at ``<base>/v3``):

- ``POST /oauth2/token``: client-credentials grant, form-encoded (JSON is also accepted).
- ``GET /v3/vehicles/{id}``, ``GET /v3/vehicles/{id}/signals`` (paged by ``page`` and
  ``pageSize``), ``GET /v3/vehicles/{id}/signals/{code}`` and ``GET /v3/connections``.
- ``/_emulator/...``: failure injection, rate limits, latency, token revocation, stats, the call
  log, connections made at run time (see :mod:`emulator.control`).

Every API call (not the control API) first sleeps the configured latency, then may be answered by
a rate limit in force (:mod:`emulator.limits`), then by an injected failure, and only then is
authenticated and served. Error bodies are described in
:mod:`emulator.errors`. Nothing happens at import time; :func:`create_app` builds everything.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from emulator.catalog import Catalog, dumps
from emulator.control import control_routes
from emulator.errors import kind_for, oauth_error, oauth_error_name, v3_error
from emulator.limits import Limited
from emulator.seed import Seed, default_seed
from emulator.state import EmulatorState, FailureSpec, TokenState

JSON = "application/json"
OAUTH_ROUTE = "/oauth2/token"
VEHICLE_ROUTE = "/v3/vehicles/{id}"
SIGNALS_ROUTE = "/v3/vehicles/{id}/signals"
SIGNAL_ROUTE = "/v3/vehicles/{id}/signals/{code}"
CONNECTIONS_ROUTE = "/v3/connections"
UNMATCHED = "<unmatched>"

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """How one emulator instance behaves. Every field has a default that suits tests."""

    client_id: str = "client_emulator"
    # A well-known fake the emulator publishes on purpose, not a credential.
    client_secret: str = "emulator-secret"  # noqa: S105
    token_lifetime_seconds: int = 3600
    """``expires_in`` of every issued token, and how long the token is accepted."""
    latency_seconds: float = 0.0
    """Added with ``asyncio.sleep`` to every API call; changeable at run time."""
    seed: Seed = field(default_factory=default_seed)
    signals_page_size: int = 10
    """Default ``pageSize`` of ``GET .../signals`` (the spec's example); clients may ask for up to 100."""
    random_seed: int = 0
    """Seeds the RNG behind rate-based failure injection."""
    clock: Callable[[], float] = time.monotonic
    """Seconds on a monotonic scale; tests pass a fake to expire tokens without waiting."""


def _seconds(value: float) -> str:
    # Whole seconds as Smartcar sends them; fractions pass through so tests can wait less.
    return str(int(value)) if float(value).is_integer() else str(value)


def _int_param(raw: str | None, default: int) -> int | None:
    if raw is None:
        return default
    # isascii: str.isdigit also accepts characters such as "²" that int() refuses.
    return int(raw) if raw.isascii() and raw.isdigit() else None


class _Api:
    """The token endpoint and the v3 vehicle API over one catalog and one state."""

    def __init__(self, config: EmulatorConfig, catalog: Catalog, state: EmulatorState) -> None:
        self.config = config
        self.catalog = catalog
        self.state = state

    def routes(self) -> list[Route]:
        """Every API route, each wrapped by :meth:`instrument`."""
        table: list[tuple[str, Handler, str]] = [
            (OAUTH_ROUTE, self.token, "POST"),
            (VEHICLE_ROUTE, self.vehicle, "GET"),
            (SIGNALS_ROUTE, self.signals, "GET"),
            (SIGNAL_ROUTE, self.signal, "GET"),
            (CONNECTIONS_ROUTE, self.connections, "GET"),
        ]
        return [Route(path, self.instrument(path, handler), methods=[method]) for path, handler, method in table]

    def instrument(self, template: str, handler: Handler) -> Handler:
        """Wrap ``handler`` with counting, latency and failure injection."""
        state = self.state
        is_token = template == OAUTH_ROUTE

        async def endpoint(request: Request) -> Response:
            state.stats.calls[template] += 1
            if is_token:
                state.stats.token_requests += 1
            if state.latency > 0:
                await asyncio.sleep(state.latency)
            vehicle_id: str | None = request.path_params.get("id")
            limited = None if is_token else state.rate_limits.check(vehicle_id)
            spec = None if limited is not None else state.failures.take(template, request.scope["path"])
            if limited is not None:
                response = self.rate_limited(limited)
            elif spec is None:
                response = await handler(request)
            else:
                state.stats.injected_failures += 1
                response = self.injected(spec, is_token)
            state.stats.record(template, response.status_code)
            if not is_token:
                state.calls.record(template, vehicle_id, response.status_code)
            return response

        return endpoint

    # Responses

    @staticmethod
    def ok(body: bytes) -> Response:
        """A 200 JSON answer with the ``SC-Request-Id`` header Smartcar documents."""
        return Response(body, 200, {"SC-Request-Id": str(uuid.uuid4())}, media_type=JSON)

    @staticmethod
    def error(
        status: int,
        error_type: str,
        code: str | None,
        detail: str,
        resolution: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """A v3 error answer; its request id is in the body and the ``SC-Request-Id`` header."""
        request_id = str(uuid.uuid4())
        body = v3_error(status, error_type, code, detail, request_id, resolution)
        return Response(body, status, {"SC-Request-Id": request_id, **(headers or {})}, media_type=JSON)

    def injected(self, spec: FailureSpec, is_token: bool) -> Response:
        """The answer an injected failure gives: OAuth-style on the token endpoint, v3 elsewhere."""
        headers = {} if spec.retry_after is None else {"Retry-After": _seconds(spec.retry_after)}
        if is_token:
            body = oauth_error(oauth_error_name(spec.status), spec.detail or "Injected failure.")
            return Response(body, spec.status, headers, media_type=JSON)
        kind = kind_for(spec.status)
        # An explicit "code": null in the rule means a null code, so look at what was set, not at None.
        error_type = spec.type if spec.type is not None else kind.type
        code = spec.code if "code" in spec.model_fields_set else kind.code
        return self.error(spec.status, error_type, code, spec.detail or kind.detail, kind.resolution, headers)

    def rate_limited(self, limited: Limited) -> Response:
        """429 ``RATE_LIMIT`` for a vehicle or the application, with ``Retry-After`` when the limit sends one."""
        headers = {} if limited.retry_after is None else {"Retry-After": limited.retry_after}
        detail = (
            "Too many requests for this application."
            if limited.code == "SMARTCAR_API"
            else "Too many requests for this vehicle."
        )
        return self.error(429, "RATE_LIMIT", limited.code, detail, "RETRY_LATER", headers)

    def vehicle_not_found(self, vehicle_id: str) -> Response:
        """404 for a vehicle that does not exist or that the ``sc-user-id`` user has not connected."""
        detail = f"Vehicle {vehicle_id} was not found for this application and user."
        return self.error(404, "RESOURCE_NOT_FOUND", "VEHICLE_NOT_FOUND", detail)

    def authenticate(self, request: Request) -> Response | None:
        """``None`` when the bearer token is valid, else the 401 to answer."""
        header = request.headers.get("authorization")
        if header is None:
            return self.error(401, "AUTHENTICATION", "MISSING_TOKEN", "Authorization header missing.", "REAUTHENTICATE")
        scheme, _, token = header.partition(" ")
        verdict = self.state.tokens.check(token.strip()) if scheme.lower() == "bearer" else TokenState.UNKNOWN
        if verdict is TokenState.VALID:
            return None
        code, detail = {
            TokenState.UNKNOWN: ("INVALID_TOKEN", "The access token is invalid."),
            TokenState.EXPIRED: ("TOKEN_EXPIRED", "The access token has expired."),
            TokenState.REVOKED: ("TOKEN_REVOKED", "The access token has been revoked."),
        }[verdict]
        return self.error(401, "AUTHENTICATION", code, detail, "REAUTHENTICATE")

    def user_vehicle(self, request: Request) -> Response | None:
        """``None`` when ``sc-user-id`` is present and owns the path's vehicle, else the 400 or 404."""
        user_id = request.headers.get("sc-user-id")
        if not user_id:
            return self.error(400, "VALIDATION", "MISSING_PARAMETER", "missing userId")
        vehicle_id: str = request.path_params["id"]
        if not self.owns(user_id, vehicle_id):
            return self.vehicle_not_found(vehicle_id)
        return None

    def owns(self, user_id: str, vehicle_id: str) -> bool:
        """Whether the seed or a connection made at run time gives ``user_id`` this vehicle."""
        return self.catalog.owns(user_id, vehicle_id) or self.state.owns(user_id, vehicle_id)

    # Endpoints

    async def token(self, request: Request) -> Response:
        """``POST /oauth2/token``: a new opaque token for the configured client credentials."""
        params = await _token_params(request)
        grant, client_id, secret = (params.get(k) for k in ("grant_type", "client_id", "client_secret"))
        if grant != "client_credentials" or client_id is None or secret is None:
            description = "grant_type=client_credentials, client_id and client_secret are required."
            return Response(oauth_error("invalid_request", description), 400, media_type=JSON)
        # Constant-time comparison, as a real token endpoint would do.
        id_ok = hmac.compare_digest(client_id.encode(), self.config.client_id.encode())
        secret_ok = hmac.compare_digest(secret.encode(), self.config.client_secret.encode())
        if not (id_ok and secret_ok):
            body = oauth_error("invalid_client", "Client authentication failed.")
            return Response(body, 401, {"WWW-Authenticate": "Bearer"}, media_type=JSON)
        token = self.state.tokens.issue()
        self.state.stats.tokens_issued += 1
        body = dumps({"access_token": token, "token_type": "Bearer", "expires_in": self.state.tokens.lifetime})
        return Response(body, 200, {"Cache-Control": "no-store"}, media_type=JSON)

    async def vehicle(self, request: Request) -> Response:
        """``GET /v3/vehicles/{id}``; ``sc-user-id`` is optional but, when sent, must own the vehicle."""
        if (denied := self.authenticate(request)) is not None:
            return denied
        vehicle_id: str = request.path_params["id"]
        user_id = request.headers.get("sc-user-id")
        if not self.catalog.has_vehicle(vehicle_id) or (user_id and not self.owns(user_id, vehicle_id)):
            return self.vehicle_not_found(vehicle_id)
        return self.ok(self.catalog.vehicle_body(vehicle_id))

    async def signals(self, request: Request) -> Response:
        """``GET /v3/vehicles/{id}/signals?page=&pageSize=``: one page of the vehicle's signals."""
        if (denied := self.authenticate(request)) is not None:
            return denied
        if (denied := self.user_vehicle(request)) is not None:
            return denied
        query = request.query_params
        page = _int_param(query.get("page"), 1)
        size = _int_param(query.get("pageSize"), self.config.signals_page_size)
        if page is None or size is None or page < 1 or not 1 <= size <= 100:
            return self.error(400, "VALIDATION", "PARAMETER", "page must be >= 1 and pageSize between 1 and 100.")
        body = self.catalog.signals_page(request.path_params["id"], page, size, _api_base(request))
        return self.ok(body)

    async def signal(self, request: Request) -> Response:
        """``GET /v3/vehicles/{id}/signals/{code}``: one signal, 404 for a code the vehicle lacks."""
        if (denied := self.authenticate(request)) is not None:
            return denied
        if (denied := self.user_vehicle(request)) is not None:
            return denied
        code: str = request.path_params["code"]
        body = self.catalog.signal_body(request.path_params["id"], code)
        if body is None:
            return self.error(404, "RESOURCE_NOT_FOUND", "SIGNAL_NOT_FOUND", f"No value for signal {code}.")
        return self.ok(body)

    async def connections(self, request: Request) -> Response:
        """``GET /v3/connections``: filtered by ``filter[...]`` (or ``sc-user-id``), paged by ``page[...]``."""
        if (denied := self.authenticate(request)) is not None:
            return denied
        query = request.query_params
        page = _int_param(query.get("page[number]"), 1)
        size = _int_param(query.get("page[size]"), 10)
        mode = query.get("filter[vehicle.mode]", "live")
        if page is None or size is None or page < 1 or not 1 <= size <= 100 or mode not in ("live", "simulated"):
            detail = "page[number] must be >= 1, page[size] between 1 and 100, filter[vehicle.mode] live or simulated."
            return self.error(400, "VALIDATION", "PARAMETER", detail)
        user_id = query.get("filter[userId]") or request.headers.get("sc-user-id")
        vehicle_id = query.get("filter[vehicleId]")
        # A new list: the catalog hands out its own index lists, which must not grow.
        found = [
            *self.catalog.find_connections(user_id, vehicle_id, mode),
            *self.state.find_connections(user_id, vehicle_id, mode),
        ]
        last = max(1, -(-len(found) // size))
        api_base = _api_base(request)

        def link(number: int) -> str:
            return str(request.url.include_query_params(**{"page[number]": number, "page[size]": size}))

        body = {
            "data": [c.resource(api_base) for c in found[(page - 1) * size : page * size]],
            "meta": {"pageNumber": page, "pageSize": size, "totalCount": len(found)},
            "links": {
                "self": link(page),
                "first": link(1),
                "prev": link(page - 1) if page > 1 else None,
                "next": link(page + 1) if page < last else None,
                "last": link(last),
            },
        }
        return self.ok(dumps(body))


def _api_base(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}/v3"


async def _token_params(request: Request) -> dict[str, str]:
    """The token request's fields from a form-encoded or JSON body; malformed bodies give ``{}``."""
    body = await request.body()
    try:
        if request.headers.get("content-type", "").startswith(JSON):
            loaded = json.loads(body)
            return {k: v for k, v in loaded.items() if isinstance(v, str)} if isinstance(loaded, dict) else {}
        return {key: values[0] for key, values in parse_qs(body.decode()).items()}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """Build a fresh emulator; each call has its own tokens, failure rules and stats."""
    config = config or EmulatorConfig()
    state = EmulatorState(config.token_lifetime_seconds, config.latency_seconds, config.random_seed, config.clock)
    api = _Api(config, Catalog(config.seed), state)

    async def not_routed(request: Request, exc: Exception) -> Response:
        # Unknown paths answer in the v3 shape (Smartcar says INVALID_PATH) and show up in stats,
        # so a client that builds a wrong URL fails loudly in tests.
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        path: str = request.scope["path"]
        if not path.startswith("/_emulator/"):
            state.stats.calls[UNMATCHED] += 1
            state.stats.record(UNMATCHED, status)
        if status == 405:
            return api.error(405, "VALIDATION", "METHOD_NOT_ALLOWED", f"{request.method} is not allowed on {path}.")
        return api.error(status, "RESOURCE_NOT_FOUND", "INVALID_PATH", f"No route for {path}.")

    return Starlette(
        routes=[*api.routes(), *control_routes(state, api.catalog)], exception_handlers={HTTPException: not_routed}
    )
