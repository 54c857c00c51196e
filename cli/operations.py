"""Operator commands that act on Redis: ``replay``, and how every command reports a Redis failure:
one line that never names the URL (it may carry a password), exit 2 or 3 (README.md, "Exit codes")."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError, RedisError

from core.config import Settings
from core.errors import ConfigurationError, Unreachable
from core.redis.clients import command_redis_async
from core.redis.jobs import JobOptions
from core.redis.outage import redis_unavailable
from core.redis.parked import ReplayReport, replay_parked

C = TypeVar("C")
R = TypeVar("R")


@contextmanager
def redis_errors(action: str = "used", *, os_errors: bool = True) -> Iterator[None]:
    """Refused credentials (exit 2) or an outage (exit 3) in the block as one line without the URL; other Redis
    errors pass. A bare OSError (a socket error redis-py did not wrap) is an outage unless ``os_errors`` is false."""
    try:
        yield
    except (AuthenticationError, AuthorizationError, NoPermissionError) as exc:
        # Checked first: redis-py raises refused credentials as connection errors.
        raise ConfigurationError(
            f"Redis at REDIS_URL refused this command ({type(exc).__name__}); check the user and password in "
            "REDIS_URL and that user's ACL."
        ) from None
    except (RedisError, OSError) as exc:
        if not (redis_unavailable(exc) if isinstance(exc, RedisError) else os_errors):
            raise
        raise Unreachable(
            f"Redis at REDIS_URL could not be {action} ({type(exc).__name__}); check that Redis is up and "
            "REDIS_URL points at it."
        ) from None


def open_command_redis(factory: Callable[[Settings], C], settings: Settings) -> C:
    """``factory(settings)`` (:mod:`core.redis.clients`), with an unparsable ``REDIS_URL`` as a bad setting."""
    try:
        return factory(settings)
    except ValueError:  # the value is not repeated: it may carry a password
        raise ConfigurationError(
            "REDIS_URL is not a Redis URL: it must start with redis://, rediss:// or unix:// and name a numeric "
            "database."
        ) from None


@contextmanager
def progress_line(stream: TextIO, render: Callable[[R], str]) -> Iterator[Callable[[R], None]]:
    """A function showing ``render(progress)`` as one line of ``stream``, rewritten at each call; on a tty only."""
    shown = False

    def show(progress: R) -> None:
        nonlocal shown
        stream.write(f"\r{render(progress)}")
        stream.flush()
        shown = True

    try:
        yield show if stream.isatty() else lambda progress: None
    finally:
        if shown:  # end the line, so what follows starts on a line of its own
            stream.write("\n")


def _replay_progress(report: ReplayReport) -> str:
    return f"  scanned {report.scanned}, re-enqueued {report.requeued}"


def replay(settings: Settings, reason: str | None, limit: int | None) -> None:
    async def run(show: Callable[[ReplayReport], None]) -> ReplayReport:
        async with open_command_redis(command_redis_async, settings) as client:
            return await replay_parked(
                client, JobOptions.from_settings(settings), settings.parked_stream, reason, limit, show
            )

    with progress_line(sys.stderr, _replay_progress) as show, redis_errors():
        report = asyncio.run(run(show))
    what = f"parked for {reason}" if reason else "parked"
    print(f"re-enqueued {report.requeued} of {report.scanned} entries {what}", end="")
    left = []
    if report.busy:
        left.append(f"{report.busy} whose job is still queued or running")
    if report.without_event_id:
        left.append(f"{report.without_event_id} without an eventId")
    print(f"; left in place: {', '.join(left)}" if left else "")
