"""Every Lua step the service runs in Redis, as Redis Functions (Redis ≥ 7.0), loaded by ``redis-setup``
(why no role may ``EVAL``: docs/security.md, finding 26.2; versioned libraries and loading on a
miss: docs/architecture.md, "Redis Functions, shared calls and round trips")."""

from __future__ import annotations

import asyncio
import hashlib
import re
import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import NoPermissionError, ResponseError
from rq.scripts import ACQUIRE_OR_REFRESH_LOCK_SCRIPT, RELEASE_LOCK_SCRIPT

PREFIX = "smartcar_ingest_"

#: Lua, for a script or a prelude to begin with: ``now_ms()``, Redis's clock in whole epoch milliseconds.
NOW_MS = """local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""


class MissingFunction(ResponseError):
    """Redis does not have this version of a function, and this user may not load it."""


class LuaFunction:
    """One Lua script (``KEYS`` and ``ARGV`` as for ``EVAL``), run in Redis as a function. Its
    ``prelude`` (helpers it calls) is run once, when Redis loads the library, not on every call."""

    def __init__(self, name: str, source: str, read_only: bool = False, arity: int = 0, prelude: str = "") -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"a function name is lower-case letters, digits and _: {name!r}")
        self.name = name
        #: The arguments of one item, for a function that runs its script once per item (core.redis.group).
        self.arity = arity
        if prelude and not prelude.endswith("\n"):
            prelude += "\n"
        # A function without a prelude keeps the name it had before preludes existed.
        digest = hashlib.sha256(f"{read_only}\n{prelude}{source}".encode()).hexdigest()[:12]
        self.redis_name = f"{PREFIX}{name}_{digest}"
        flags = "'no-writes'" if read_only else ""
        self.code = (
            f"#!lua name={self.redis_name}\n{prelude}"
            f"redis.register_function{{function_name='{self.redis_name}', flags={{{flags}}},"
            f" callback=function(KEYS, ARGV)\n{source}\nend}}\n"
        )
        self._loading: weakref.WeakKeyDictionary[Any, asyncio.Future[Any]] = weakref.WeakKeyDictionary()

    def bind(self, client: Any) -> Any:
        """A callable for ``client`` (``keys=``, ``args=``; for a synchronous one also ``client=`` a
        pipeline, as redis-py's ``Script``) that loads a function Redis does not have."""
        return partial(self._call_async if isinstance(client, AsyncRedis) else self._call, client)

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("FCALL", self.redis_name, len(keys), *keys, *args)

    def _call(self, bound: Any, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        target = bound if client is None else client
        command = self.command(keys, args)
        try:  # a pipeline queues the call, answered by its execute()
            return target.execute_command(*command)
        except ResponseError as exc:
            if not is_missing(exc):
                raise
        self.load(target)
        return target.execute_command(*command)

    async def _call_async(self, client: Any, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        command = self.command(keys, args)
        try:
            return await client.execute_command(*command)
        except ResponseError as exc:
            if not is_missing(exc):
                raise
        await self.load_async(client)
        return await client.execute_command(*command)

    def load(self, client: redis.Redis) -> bool:
        """False when it was loaded already."""
        try:
            client.function_load(self.code)
        except ResponseError as exc:
            return self.refused(exc)
        return True

    async def load_async(self, client: Any) -> None:
        """One load shared by the callers that find it missing together (Redis compiles every ``FUNCTION LOAD``)."""
        loading = self._loading.get(client)
        if loading is None or loading.done():
            loading = self._loading[client] = asyncio.ensure_future(client.function_load(self.code))
        try:
            await asyncio.shield(loading)
        except ResponseError as exc:
            self.refused(exc)

    def refused(self, exc: ResponseError) -> bool:
        """False when a failed ``FUNCTION LOAD`` means the library is there (a peer loaded it
        meanwhile); :class:`MissingFunction` when this user may not load it; else ``exc``."""
        if isinstance(exc, NoPermissionError):
            raise MissingFunction(
                f"Redis has no function {self.redis_name} and this Redis user may not load it:"
                f" run `smartcar-ingest redis-setup` with an admin REDIS_URL ({exc})."
            ) from None
        if "already exists" in str(exc):
            return False
        raise exc


#: Every function by name; a module defines its own with :func:`lua_function` at import.
FUNCTIONS: dict[str, LuaFunction] = {}


def lua_function(name: str, source: str, read_only: bool = False, arity: int = 0, prelude: str = "") -> LuaFunction:
    function = LuaFunction(name, source, read_only, arity, prelude)
    known = FUNCTIONS.setdefault(name, function)
    if known.code != function.code:
        raise ValueError(f"two Lua functions are named {name!r}")
    return known


def is_missing(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("Function not found")


#: RQ's own scripts (its scheduler's locks), run as functions of ours on the worker's RQ connection.
RQ_SCRIPTS = {
    ACQUIRE_OR_REFRESH_LOCK_SCRIPT: lua_function("rq_acquire_or_refresh_lock", ACQUIRE_OR_REFRESH_LOCK_SCRIPT),
    RELEASE_LOCK_SCRIPT: lua_function("rq_release_lock", RELEASE_LOCK_SCRIPT),
}


class FunctionsRedis(redis.Redis):
    """The worker's RQ connection: RQ's scripts that the worker runs are called as functions (the
    worker role may not ``EVAL``); any other script is left to redis-py."""

    def register_script(self, script: str | bytes) -> Any:  # type: ignore[override]
        function = RQ_SCRIPTS.get(script.decode() if isinstance(script, bytes) else script)
        return function.bind(self) if function is not None else super().register_script(script)


def load_all(client: redis.Redis, functions: Sequence[LuaFunction]) -> tuple[int, int]:
    """``redis-setup``: how many were loaded and how many were there."""
    loaded = sum(function.load(client) for function in functions)
    return loaded, len(functions) - loaded
