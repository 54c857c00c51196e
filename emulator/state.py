"""The mutable side of the emulator: issued tokens, injected failures, latency and call counts.

Everything here is touched only from the server's event loop, so nothing takes a lock.
"""

from __future__ import annotations

import random
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from emulator.catalog import Connection
from emulator.limits import CallLog, RateLimits


class TokenState(Enum):
    """What an ``Authorization: Bearer`` value amounts to."""

    VALID = "valid"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"


class TokenStore:
    """Opaque bearer tokens with an expiry on ``clock`` (seconds, monotonic)."""

    def __init__(self, lifetime: int, clock: Callable[[], float]) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._revoked: set[str] = set()

    def issue(self) -> str:
        """A new random token valid for ``lifetime`` seconds from now."""
        now = self._clock()
        # Forget expired tokens so a long benchmark does not grow the table without bound.
        self._expiry = {token: until for token, until in self._expiry.items() if until > now}
        token = secrets.token_urlsafe(32)
        self._expiry[token] = now + self.lifetime
        return token

    def check(self, token: str) -> TokenState:
        """Classify ``token``: valid, never issued (or forgotten), expired, or revoked."""
        until = self._expiry.get(token)
        if until is not None:
            return TokenState.VALID if until > self._clock() else TokenState.EXPIRED
        return TokenState.REVOKED if token in self._revoked else TokenState.UNKNOWN

    def revoke_all(self) -> int:
        """Revoke every issued token; returns how many were still live."""
        now = self._clock()
        live = sum(1 for until in self._expiry.values() if until > now)
        self._revoked.update(self._expiry)
        self._expiry.clear()
        return live

    def expire_all(self) -> int:
        """Make every issued token expired now (a 1-hour wait, skipped); returns how many there were."""
        now = self._clock()
        for token in self._expiry:
            self._expiry[token] = now
        return len(self._expiry)

    @property
    def live(self) -> int:
        """How many issued tokens are still valid."""
        now = self._clock()
        return sum(1 for until in self._expiry.values() if until > now)

    def clear(self) -> None:
        """Forget every token, revoked ones included."""
        self._expiry.clear()
        self._revoked.clear()


class FailureSpec(BaseModel):
    """The JSON body of ``POST /_emulator/failures``.

    ``path`` is ``"*"`` (every call outside ``/_emulator/``), a route template such as
    ``"/v3/vehicles/{id}/signals"`` (matched exactly), or a concrete path prefix such as
    ``"/v3/vehicles/5f0c1a2b-1111-4111-8111-111111111111"``. Without ``count`` and ``rate`` the
    rule fires once; with only ``rate`` it fires on that fraction of calls until cleared.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = "*"
    status: int = Field(ge=400, le=599)
    count: int | None = Field(default=None, ge=1)
    rate: float | None = Field(default=None, gt=0, le=1)
    retry_after: float | None = Field(default=None, ge=0)
    type: str | None = None
    code: str | None = None
    detail: str | None = None


@dataclass(slots=True)
class FailureRule:
    """An active rule; ``remaining`` is ``None`` when only ``rate`` bounds it."""

    id: int
    spec: FailureSpec
    remaining: int | None

    def matches(self, template: str, path: str) -> bool:
        """Whether a call to ``path`` (routed as ``template``) falls under this rule."""
        pattern = self.spec.path
        if pattern == "*":
            return True
        if "{" in pattern:
            return pattern == template
        return path.startswith(pattern)

    def describe(self) -> dict[str, object]:
        """The rule as the control API reports it."""
        return {"id": self.id, **self.spec.model_dump(), "remaining": self.remaining}


class FailureInjector:
    """Ordered failure rules; the first matching rule that fires answers the call."""

    def __init__(self, random_seed: int) -> None:
        self._random_seed = random_seed
        # Not cryptographic: a seeded RNG makes rate-based failures repeatable from run to run.
        self._rng = random.Random(random_seed)  # noqa: S311
        self._rules: list[FailureRule] = []
        self._next_id = 1

    def add(self, spec: FailureSpec) -> FailureRule:
        """Append a rule built from ``spec``."""
        remaining = spec.count if spec.count is not None else (None if spec.rate is not None else 1)
        rule = FailureRule(self._next_id, spec, remaining)
        self._next_id += 1
        self._rules.append(rule)
        return rule

    def take(self, template: str, path: str) -> FailureSpec | None:
        """The spec of the rule that fails this call, if any, spending one of its ``count``."""
        if not self._rules:
            return None
        for rule in self._rules:
            if not rule.matches(template, path):
                continue
            if rule.spec.rate is not None and self._rng.random() >= rule.spec.rate:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._rules.remove(rule)
            return rule.spec
        return None

    def describe(self) -> list[dict[str, object]]:
        """Every active rule, in matching order."""
        return [rule.describe() for rule in self._rules]

    def clear(self) -> int:
        """Drop every rule and re-seed the RNG; returns how many rules were dropped."""
        dropped = len(self._rules)
        self._rules.clear()
        self._rng.seed(self._random_seed)
        return dropped


@dataclass(slots=True)
class Stats:
    """Counts since start or the last reset. Control calls under ``/_emulator/`` are not counted."""

    token_requests: int = 0
    tokens_issued: int = 0
    injected_failures: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    statuses_by_route: dict[str, Counter[str]] = field(default_factory=dict)

    def record(self, template: str, status: int) -> None:
        """Count one finished call of ``template`` that answered ``status``."""
        key = str(status)
        self.statuses[key] += 1
        by_route = self.statuses_by_route.get(template)
        if by_route is None:
            by_route = self.statuses_by_route[template] = Counter()
        by_route[key] += 1

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready copy."""
        return {
            "token_requests": self.token_requests,
            "tokens_issued": self.tokens_issued,
            "injected_failures": self.injected_failures,
            "calls": dict(self.calls),
            "statuses": dict(self.statuses),
            "statuses_by_route": {route: dict(counts) for route, counts in self.statuses_by_route.items()},
        }


class EmulatorState:
    """Everything a request may change, bundled for the handlers."""

    def __init__(
        self,
        token_lifetime: int,
        latency: float,
        random_seed: int,
        clock: Callable[[], float],
    ) -> None:
        self.initial_latency = latency
        self.latency = latency
        self.tokens = TokenStore(token_lifetime, clock)
        self.failures = FailureInjector(random_seed)
        self.rate_limits = RateLimits(clock)
        """Vehicles and the application answering 429 for a while (``POST /_emulator/rate-limits``)."""
        self.calls = CallLog()
        """Every API call: when, which route, which vehicle, what status (``GET /_emulator/calls``)."""
        self.stats = Stats()
        self.connections: list[Connection] = []
        """Connections made at run time (``POST /_emulator/connections``), beside the seed's."""

    def owns(self, user_id: str, vehicle_id: str) -> bool:
        """Whether a connection made at run time gives ``user_id`` the vehicle ``vehicle_id``."""
        return any(c.user_id == user_id and c.vehicle.id == vehicle_id for c in self.connections)

    def find_connections(self, user_id: str | None, vehicle_id: str | None, mode: str | None) -> list[Connection]:
        """Run-time connections matching every filter given (``None``: no filter), oldest first."""
        return [
            c
            for c in self.connections
            if user_id in (None, c.user_id) and vehicle_id in (None, c.vehicle.id) and mode in (None, c.vehicle.mode)
        ]

    def reset(self) -> None:
        """Back to the state right after start: no tokens, rules, rate limits, counts, call log or
        run-time connections; the configured latency."""
        self.tokens.clear()
        self.failures.clear()
        self.rate_limits.clear()
        self.calls.clear()
        self.stats = Stats()
        self.latency = self.initial_latency
        self.connections.clear()
