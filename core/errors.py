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

    #: Stable snake_case code for HTTP error bodies, parked reasons and metrics labels; a case of a
    #: leaf may be raised with its own.
    code: str = "ingest_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigurationError(IngestError):
    """A setting or the setup is wrong: the process stops with this one-line message."""

    code = "configuration_error"


class TransientError(IngestError):
    """The operation may succeed if tried again later."""

    code = "transient_error"


class Unreachable(TransientError):
    """The database, Redis (where a process gives up on it) or a webhook endpoint did not answer."""

    code = "unreachable"


class SmartcarUnavailable(TransientError):
    """Smartcar could not be reached or answered with a 5xx."""

    code = "smartcar_unavailable"


class SmartcarRateLimited(TransientError):
    """Smartcar answered 429; ``retry_after`` is how long it asked us to wait, if it said."""

    code = "smartcar_rate_limited"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(IngestError):
    """Retrying will not change the outcome."""

    code = "permanent_error"


class MalformedBody(PermanentError):
    """A validly signed body that is not UTF-8 JSON."""

    code = "malformed_json"


class InvalidPayload(PermanentError):
    """A signed event parked with its code: ``invalid_payload``, ``legacy_v2``, ``unknown_event_type``,
    ``unknown_user``."""

    code = "invalid_payload"


class InvalidJob(PermanentError):
    """A ``process_event`` job whose argument is not a job payload: failed at once, never retried."""

    code = "invalid_job"


class SmartcarRejected(PermanentError):
    """The vehicle API answered a 4xx other than 401 and 429."""

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


class RecordNotFound(PermanentError):
    """No user or vehicle has this internal id."""

    code = "record_not_found"


class LinkConflict(PermanentError):
    """Linking would overwrite a stored Smartcar id or take one that another user holds."""

    code = "link_conflict"


class InvalidConnectState(PermanentError):
    """A Connect ``state`` that is not ours (``invalid_state``), ``expired_state`` or ``browser_mismatch``."""

    code = "invalid_state"


class UnverifiedConnection(PermanentError):
    """Smartcar lists no new connection of the redirect's user (``unverified_user``, ``cannot_verify``)."""

    code = "unverified_user"


class RecordExists(PermanentError):
    """A user or vehicle with this id already exists."""

    code = "record_exists"


class InvalidValue(PermanentError):
    """A value does not fit its column."""

    code = "invalid_value"
