"""The one error tree of smartcar-ingest: every error the project raises on purpose.

The tree, and which layer turns errors into HTTP statuses, parked entries or exit statuses:
docs/architecture.md, "Errors".
"""

from __future__ import annotations

#: The reasons an entry of the parked stream can carry (the contract's list).
PARK_REASONS = (
    "unknown_user",
    "invalid_payload",
    "unknown_event_type",
    "legacy_v2",
    "upstream_rejected",
    "retries_exhausted",
)


class IngestError(Exception):
    """Root of every error this project raises on purpose."""

    #: Stable snake_case code: used in HTTP error bodies, parked reasons and metrics labels.
    code: str = "ingest_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigurationError(IngestError):
    """A setting is missing or invalid, or the process was not set up to do this (a job run outside
    ``smartcar-ingest worker``); the process should stop with this one-line message."""

    code = "configuration_error"


class TransientError(IngestError):
    """The operation may succeed if tried again later."""

    code = "transient_error"


class RedisUnavailable(TransientError):
    """Redis did not answer, or cannot serve us for now (loading, out of memory, read-only).

    Raised where a process gives up on Redis instead of waiting it out: an operator command
    (``status``, ``replay``, ``backfill``) and a worker whose Redis never answered at start.
    """

    code = "redis_unavailable"


class DatabaseUnavailable(TransientError):
    """The database did not answer (refused, timed out, dropped the connection, or locked)."""

    code = "database_unavailable"


class SmartcarUnavailable(TransientError):
    """Smartcar could not be reached or answered with a 5xx."""

    code = "smartcar_unavailable"


class SmartcarRateLimited(TransientError):
    """Smartcar answered 429; ``retry_after`` is how long it asked us to wait, if it said."""

    code = "smartcar_rate_limited"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EndpointUnavailable(TransientError):
    """The webhook endpoint that ``send-test-event`` posts to could not be reached."""

    code = "endpoint_unavailable"


class PermanentError(IngestError):
    """Retrying will not change the outcome."""

    code = "permanent_error"


class MalformedBody(PermanentError):
    """A validly signed body that is not UTF-8 JSON."""

    code = "malformed_json"


class InvalidPayload(PermanentError):
    """A validly signed JSON body that does not match the event schema."""

    code = "invalid_payload"


class UnknownEventType(PermanentError):
    """An ``eventType`` outside VERIFY, VEHICLE_STATE and VEHICLE_ERROR."""

    code = "unknown_event_type"


class LegacyPayload(PermanentError):
    """A legacy v2.0 webhook payload (top-level ``version``)."""

    code = "legacy_v2"


class UnknownUser(PermanentError):
    """No internal user has this Smartcar user id."""

    code = "unknown_user"


class InvalidJob(PermanentError):
    """A ``process_event`` job whose argument is not a job payload (``core.redis.jobs.JobPayload``).

    Only something other than this service writes such a job; it fails at once, never retried.
    """

    code = "invalid_job"


class SmartcarRejected(PermanentError):
    """The vehicle API refused the request for good (a 4xx other than 401 and 429)."""

    code = "upstream_refused"

    def __init__(self, message: str, status: int, error_type: str | None, error_code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.error_code = error_code


class SmartcarUnauthorized(PermanentError):
    """The vehicle API answered 401 even with a freshly issued application token."""

    code = "upstream_rejected"


class TokenRequestFailed(PermanentError):
    """The token endpoint refused the client credentials."""

    code = "token_request_failed"


class UserNotFound(PermanentError):
    """No user has this internal id."""

    code = "user_not_found"


class VehicleNotFound(PermanentError):
    """No vehicle has this internal id."""

    code = "vehicle_not_found"


class LinkConflict(PermanentError):
    """Linking would overwrite a user's Smartcar user id or take one that another user holds."""

    code = "link_conflict"


class InvalidConnectState(PermanentError):
    """The ``state`` of a Connect redirect is missing, malformed or not signed by this service."""

    code = "invalid_state"


class ExpiredConnectState(InvalidConnectState):
    """The ``state`` of a Connect redirect is genuine but older than ``CONNECT_STATE_TTL_SECONDS``."""

    code = "expired_state"


class ForeignConnectState(InvalidConnectState):
    """A ``state`` bound to a browser, redeemed without that browser's binding cookie."""

    code = "browser_mismatch"


class UsedConnectState(InvalidConnectState):
    """A ``state`` that was already redeemed: each one links at most once."""

    code = "state_used"


class UnverifiedConnection(PermanentError):
    """Smartcar lists no connection of the redirect's user made since the ``state`` was issued."""

    code = "unverified_user"


class UnverifiableConnection(PermanentError):
    """Smartcar's connections of the user carry no creation time, so a redirect cannot be checked."""

    code = "cannot_verify"


class RecordExists(PermanentError):
    """A user or vehicle with this id already exists."""

    code = "record_exists"


class InvalidValue(PermanentError):
    """A value does not fit its column (for example a Smartcar user id longer than 36 characters)."""

    code = "invalid_value"
