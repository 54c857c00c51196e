"""An asyncio Redis client whose concurrent commands share round trips, packed by hiredis (why:
docs/architecture.md, "Redis Functions, shared calls and round trips"; docs/performance.md)."""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.connection import AbstractConnection

from core.redis.group import GroupCommit

#: Commands that wait on the server, sent alone.
BLOCKING = frozenset({"BLMOVE", "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP", "WAIT"})
MAX_BATCH = 512


class BatchingRedis(AsyncRedis):
    """A ``redis.asyncio.Redis`` whose commands issued during a round trip go in the next one, as one
    pipeline (not a transaction); blocking commands are sent alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._commands: GroupCommit[tuple[tuple[Any, ...], dict[str, Any]], Any] = GroupCommit(
            self._round_trip, MAX_BATCH, direct=False
        )

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = str(args[0]).upper()
        if name in BLOCKING or (name.startswith("XREAD") and any(str(a).upper() == "BLOCK" for a in args)):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        return await self._commands.submit((args, options))

    async def _round_trip(self, batch: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        pipe = self.pipeline(transaction=False)
        for args, options in batch:
            pipe.execute_command(*args, **options)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


class HiredisPacking:
    """A connection mixin: each command packed by ``hiredis.pack_command`` in one call; what
    hiredis cannot pack (``None``, a bool) is left to redis-py, which raises its own error."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if (isinstance(first, str) and " " in first) or (isinstance(first, bytes) and b" " in first):
            args = (*first.split(), *args[1:])  # "FUNCTION LOAD" is two words, as redis-py sends it
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)  # type: ignore[misc,no-any-return]


def hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` (plain, TLS or Unix socket, as the URL chose) packing with hiredis."""
    return type(f"Hiredis{connection_class.__name__}", (HiredisPacking, connection_class), {})
