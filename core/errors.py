"""The one error tree of smartcar-ingest; what each class means and which layer turns it into an HTTP
status, a parked entry or an exit status: docs/architecture.md, "Errors"."""

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

    #: Stable snake_case code for HTTP error bodies, parked reasons and metrics labels.
    code: str = "ingest_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigurationError(IngestError):
    code = "configuration_error"


class TransientError(IngestError):
    code = "transient_error"


class Unreachable(TransientError):
    code = "unreachable"


class SmartcarUnavailable(TransientError):
    code = "smartcar_unavailable"


class SmartcarRateLimited(TransientError):
    code = "smartcar_rate_limited"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds Smartcar asked us to wait, if it said


class PermanentError(IngestError):
    code = "permanent_error"


class MalformedBody(PermanentError):
    code = "malformed_json"


class InvalidPayload(PermanentError):
    code = "invalid_payload"


class InvalidJob(PermanentError):
    code = "invalid_job"


class SmartcarRejected(PermanentError):
    code = "upstream_refused"

    def __init__(self, message: str, status: int, error_type: str | None, error_code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.error_code = error_code


class SmartcarUnauthorized(PermanentError):
    code = "upstream_rejected"


class TokenRequestFailed(PermanentError):
    code = "token_request_failed"


class RecordNotFound(PermanentError):
    code = "record_not_found"


class LinkConflict(PermanentError):
    code = "link_conflict"  # also record_exists, for an id that is taken


class InvalidConnectState(PermanentError):
    code = "invalid_state"


class InvalidValue(PermanentError):
    code = "invalid_value"
