"""Error bodies the emulator answers with, in the two shapes Smartcar uses.

- The vehicle API (``/v3/...``) answers in the v3 shape observed live (smartcar.md §4.7)::

      {"errors": [{"status": "404", "type": "RESOURCE_NOT_FOUND", "code": "VEHICLE_NOT_FOUND",
                   "title": "Not Found", "detail": "...", "resolution": {"type": null},
                   "meta": {"debug": {"requestId": "..."}}}]}

- The token endpoint answers RFC 6749 style: ``{"error": "...", "error_description": "..."}``.

``status`` is a string, as in the live captures. Codes that Smartcar does not document (the 401
codes, ``SIGNAL_NOT_FOUND``, the 503 code) are the emulator's own choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """The ``type``, ``code``, ``resolution.type`` and default ``detail`` for one HTTP status."""

    type: str
    code: str | None
    resolution: str | None
    detail: str


# What an injected failure of each status looks like unless the rule names its own type and code.
DEFAULT_KINDS: dict[int, ErrorKind] = {
    400: ErrorKind("VALIDATION", "PARAMETER", None, "A request parameter is invalid."),
    401: ErrorKind("AUTHENTICATION", "INVALID_TOKEN", "REAUTHENTICATE", "The access token is invalid."),
    403: ErrorKind("PERMISSION", None, "REAUTHENTICATE", "The application lacks a permission for this request."),
    404: ErrorKind("RESOURCE_NOT_FOUND", "VEHICLE_NOT_FOUND", None, "The vehicle was not found."),
    409: ErrorKind("VEHICLE_STATE", "ASLEEP", "RETRY_LATER", "The vehicle is asleep."),
    429: ErrorKind("RATE_LIMIT", "VEHICLE", "RETRY_LATER", "Too many requests for this vehicle."),
    430: ErrorKind("BILLING", "VEHICLE_REQUEST_LIMIT", "CONTACT_SUPPORT", "The vehicle's request quota is spent."),
    500: ErrorKind("SERVER", "INTERNAL", "RETRY_LATER", "Smartcar had an internal error."),
    501: ErrorKind("COMPATIBILITY", "VEHICLE_NOT_CAPABLE", None, "The vehicle cannot perform this request."),
    502: ErrorKind("UPSTREAM", "UNKNOWN_ISSUE", "RETRY_LATER", "The manufacturer's API failed."),
    503: ErrorKind("SERVER", "SERVICE_UNAVAILABLE", "RETRY_LATER", "Smartcar is temporarily unavailable."),
    504: ErrorKind("UPSTREAM", "NO_RESPONSE", "RETRY_LATER", "The manufacturer's API did not answer in time."),
}

_FALLBACK_SERVER = ErrorKind("SERVER", "INTERNAL", "RETRY_LATER", "Smartcar had an internal error.")
_FALLBACK_CLIENT = ErrorKind("VALIDATION", None, None, "The request was refused.")


def kind_for(status: int) -> ErrorKind:
    """The default error kind for ``status``; unlisted statuses fall back by class (4xx or 5xx)."""
    return DEFAULT_KINDS.get(status, _FALLBACK_SERVER if status >= 500 else _FALLBACK_CLIENT)


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # 430 and other Smartcar-only statuses have no standard phrase
        return "Error"


def v3_error(
    status: int,
    error_type: str,
    code: str | None,
    detail: str,
    request_id: str,
    resolution: str | None = None,
) -> bytes:
    """Serialise one v3 error document (a list holding one error)."""
    error = {
        "status": str(status),
        "type": error_type,
        "code": code,
        "title": _title(status),
        "detail": detail,
        "resolution": {"type": resolution},
        "meta": {"debug": {"requestId": request_id}},
    }
    return json.dumps({"errors": [error]}, separators=(",", ":")).encode()


def oauth_error(error: str, description: str) -> bytes:
    """Serialise an RFC 6749 token-endpoint error."""
    return json.dumps({"error": error, "error_description": description}, separators=(",", ":")).encode()


def oauth_error_name(status: int) -> str:
    """The RFC 6749 ``error`` value the token endpoint uses for an injected ``status``."""
    if status == 400:
        return "invalid_request"
    if status == 401:
        return "invalid_client"
    if status == 429 or status == 503:
        return "temporarily_unavailable"
    return "server_error"
