"""Operator commands that act on Redis: ``replay``, and how every command reports a Redis failure:
one line that never names the URL (it may carry a password), exit 2 or 3 (README.md, "Exit codes")."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError, RedisError

from core.config import Settings
from core.errors import ConfigurationError, Unreachable
from core.redis.clients import command_redis, command_redis_async
from core.redis.jobs import JobOptions
from core.redis.outage import redis_unavailable
from core.redis.parked import ReplayReport, replay_parked


@contextmanager
def redis_errors(action: str = "used", *, os_errors: bool = True) -> Iterator[None]:
    """Turn a Redis failure inside the block into one line of the error tree, without the URL.

    ``action`` completes "Redis at REDIS_URL could not be …". A Redis error that is neither a
    refusal of the credentials nor an outage (a wrong type, a script bug) is a fault and passes
    through unchanged. A bare :class:`OSError` (a socket error redis-py did not wrap) counts as
    an outage unless ``os_errors`` is false, for blocks that also do other I/O.
    """
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


def _unusable_redis_url() -> ConfigurationError:
    """The one line for a ``REDIS_URL`` that redis-py cannot parse (the value is not repeated)."""
    return ConfigurationError(
        "REDIS_URL is not a Redis URL: it must start with redis://, rediss:// or unix:// and name a numeric database."
    )


def open_command_redis(settings: Settings) -> redis.Redis:
    """:func:`core.redis.clients.command_redis`, with an unparsable ``REDIS_URL`` as a bad setting."""
    try:
        return command_redis(settings)
    except ValueError:
        raise _unusable_redis_url() from None


def open_command_redis_async(settings: Settings) -> AsyncRedis:
    """:func:`core.redis.clients.command_redis_async`, with an unparsable ``REDIS_URL`` as a bad setting."""
    try:
        return command_redis_async(settings)
    except ValueError:
        raise _unusable_redis_url() from None


def replay(settings: Settings, reason: str | None, limit: int | None) -> int:
    """Re-enqueue parked entries and print what happened; progress on a terminal."""
    interactive = sys.stderr.isatty()
    shown = False

    def progress(report: ReplayReport) -> None:
        nonlocal shown
        if interactive:
            print(f"\r  scanned {report.scanned}, re-enqueued {report.requeued}", end="", file=sys.stderr, flush=True)
            shown = True

    async def run() -> ReplayReport:
        client = open_command_redis_async(settings)
        try:
            options = JobOptions.from_settings(settings)
            return await replay_parked(client, options, settings.parked_stream, reason, limit, progress)
        finally:
            await client.aclose()

    try:
        with redis_errors():
            report = asyncio.run(run())
    finally:
        if shown:  # end the progress line, so what follows starts on a line of its own
            print(file=sys.stderr)
    what = f"parked for {reason}" if reason else "parked"
    print(f"re-enqueued {report.requeued} of {report.scanned} entries {what}", end="")
    left = []
    if report.busy:
        left.append(f"{report.busy} whose job is still queued or running")
    if report.without_event_id:
        left.append(f"{report.without_event_id} without an eventId")
    print(f"; left in place: {', '.join(left)}" if left else "")
    return 0
