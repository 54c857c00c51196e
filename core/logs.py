"""Structured logging with structlog (JSON lines, or console lines for humans). Callers log identifiers,
never values; :func:`redact` is a last line of defence. Lifecycle lines: docs/security.md, 26.12."""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_WORDS = ("token", "secret", "password", "authorization", "signature", "challenge")


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key != "event" and any(word in key.lower() for word in _SECRET_WORDS):
            event_dict[key] = "[redacted]"
    return event_dict


#: uvicorn's INFO lines about a server's own life (matched on the template, or the formatted message).
_UVICORN_LIFECYCLE = re.compile(
    r"(Started|Finished|Stopping) (server|parent) process"
    r"|Waiting for application (startup|shutdown)\.|Application (startup|shutdown) complete\."
    r"|(Waiting for|Terminated) child process"
)
_uvicorn_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("uvicorn_quiet", default=False)


def quiet_uvicorn() -> None:
    """Drop uvicorn's INFO lines in the current context and the tasks it starts from now on."""
    _uvicorn_quiet.set(True)


def _noise(record: logging.LogRecord) -> bool:
    """uvicorn's lifecycle and Alembic's plugin INFO lines become DEBUG; a quiet server's uvicorn INFO go."""
    if record.levelno != logging.INFO:
        return True
    if record.name == "uvicorn.error":
        if _uvicorn_quiet.get():
            return False
        if not _UVICORN_LIFECYCLE.match(str(record.msg)):
            return True
    elif record.name != "alembic.runtime.plugins":
        return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Structlog and the standard library's root logger (uvicorn, RQ) alike."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    # structlog's lines go through the same stdlib handler as RQ's and uvicorn's, so one lock
    # orders every write: two writers on one stream interleave partial lines under threads.
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_noise)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # httpx logs every request URL at INFO; our own lines already say what was called and why.
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(logger_name=name)
    return logger
