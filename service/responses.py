"""The one error body shape: ``{"error": {"code": "<snake_case>", "message": "<one sentence>"}}``."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.logs import get_logger

log = get_logger("smartcar_ingest.http")


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405, in the contract's error shape."""
    assert isinstance(exc, HTTPException)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    return error_response(exc.status_code, code, f"{exc.detail.rstrip('.')}.", headers=exc.headers)


async def unexpected_exception(request: Request, exc: Exception) -> Response:
    """A bug must not become a 500: answer 503 so Smartcar retries, and log it loudly."""
    log.error("unhandled error", path=request.url.path, error=type(exc).__name__, exc_info=exc)
    return error_response(
        503, "internal_error", "The request could not be handled; retry later.", headers={"Retry-After": "5"}
    )
