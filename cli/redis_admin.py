"""The Redis administrator's commands: ``redis-setup`` (load the service's functions, check persistence) and
``redis-acl`` (one aclfile line per role). docs/security.md says how the two fit together."""

from __future__ import annotations

import importlib
import os
import sys

import redis

from cli.operations import redis_errors
from core.config import Settings
from core.errors import ConfigurationError
from core.redis import durability
from core.redis.acl import Role, acl_file_line
from core.redis.dedupe import start_without_legacy_window
from core.redis.functions import FUNCTIONS, MissingFunction, load_all

#: Every module that defines Lua functions (tests/test_redis_functions.py checks the list is whole).
FUNCTION_MODULES = (
    "core.redis.inbox",
    "core.redis.parked",
    "core.redis.published",
    "core.smartcar.limiter",
    "core.smartcar.reads",
    "workers.batch",
    "workers.reaper",
)


def all_functions() -> list[str]:
    """The names of every function the service runs, its modules imported."""
    for module in FUNCTION_MODULES:
        importlib.import_module(module)
    return sorted(FUNCTIONS)


def _admin(redis_url: str) -> redis.Redis:
    """A client for the admin's one-off commands (a function load may take a while)."""
    return redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=30)


def load_functions(redis_url: str) -> str:
    """Load every function into the Redis at ``redis_url`` (a user allowed ``FUNCTION LOAD``); says what it did."""
    names = all_functions()
    try:
        with redis_errors("reached"), _admin(redis_url) as client:
            loaded, present = load_all(client, [FUNCTIONS[name] for name in names])
    except MissingFunction:  # what a refused FUNCTION LOAD becomes (core.redis.functions.load)
        raise ConfigurationError(
            "This Redis user may not load functions: run redis-setup with an admin REDIS_URL."
        ) from None
    except redis.exceptions.ResponseError as exc:
        raise ConfigurationError(f"Redis refused the functions ({exc}); they need Redis 7.0 or newer.") from None
    return f"Redis functions: {loaded} loaded, {present} already there ({len(names)} in all)"


def check_persistence(redis_url: str) -> None:
    """Says on stderr which of Redis's persistence settings differ from docs/deploy.md's (nothing if none)."""
    with redis_errors("reached"), _admin(redis_url) as client:
        for line in durability.report(client):
            print(f"warning: {line}", file=sys.stderr)


def start_marks(redis_url: str) -> str | None:
    """On a Redis new to this service, the marks' registries start without a legacy window; says so."""
    with redis_errors("reached"), _admin(redis_url) as client:
        written = start_without_legacy_window(client)
    if not written:
        return None
    return f"dedupe marks: {' and '.join(written)} started without a legacy window (no earlier release in this Redis)"


def prepare(redis_url: str) -> list[str]:
    """What ``redis-setup`` does to Redis (functions, marks' registries), the lines it prints."""
    return [line for line in (load_functions(redis_url), start_marks(redis_url)) if line]


def redis_setup(settings: Settings) -> None:
    for line in prepare(settings.redis_url):
        print(line)
    check_persistence(settings.redis_url)


def redis_acl(settings: Settings, role: Role, user: str | None, password_env: str | None, connect: bool) -> None:
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if not password:
            raise ConfigurationError(f"{password_env} is empty or not set: put the user's password in it.")
    else:
        print("# no --password-env: the user is written switched off; give it a password before use", file=sys.stderr)
    print(acl_file_line(settings, role, user or f"smartcar-{role}", password, connect=connect))
