"""Group commit: what concurrent callers submit while a call is under way goes in the next call
(guarantees: docs/architecture.md, "Redis Functions, shared calls and round trips")."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError

from core.redis.functions import NOW_MS, LuaFunction, lua_function

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Calls ``call`` (one result or exception per item, in order) with batches of submitted items, one call
    at a time; with ``direct`` a caller finding it idle makes the call itself, else a sender task does."""

    def __init__(
        self,
        call: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        max_batch: int,
        direct: bool = True,
    ) -> None:
        self._call = call
        self._max_batch = max_batch
        self._direct = direct
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._busy = False
        self._sender: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """``item``'s result, once a call carrying it has returned."""
        if self._direct and not self._busy and not self._pending:
            self._busy = True
            try:
                (result,) = await self._call([item])
            finally:
                self._busy = False
                self._start_sender()
            if isinstance(result, BaseException):
                raise result
            return result
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._start_sender()
        return await future

    def _start_sender(self) -> None:
        if self._pending and not self._busy:
            self._busy = True
            # Kept: the loop holds only a weak reference to a task.
            self._sender = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._pending:
                batch = [entry for entry in self._pending[: self._max_batch] if not entry[1].done()]
                del self._pending[: self._max_batch]
                if not batch:
                    continue
                try:
                    results: Sequence[R | BaseException] = await self._call([item for item, _ in batch])
                except Exception as exc:
                    results = [copy.copy(exc).with_traceback(None) for _ in batch]
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        except BaseException as exc:  # stopped with callers waiting: they must not wait for ever
            for _, future in [*batch, *self._pending]:
                if not future.done():
                    future.set_exception(RedisConnectionError(f"the call was stopped ({type(exc).__name__})"))
            self._pending = []
            raise
        finally:
            self._busy = False


def grouped_function(name: str, source: str, arity: int, read_only: bool = False) -> LuaFunction:
    """A function running ``source`` (one key, ``arity`` arguments) once per item of a call, each
    under its own ``pcall``; ``now_ms()`` is Redis's clock in epoch ms, read once per call."""
    wrapper = f"""{NOW_MS}local read_clock, clock = now_ms, nil
local function now_ms()
  clock = clock or read_clock()
  return clock
end
local function one(KEYS, ARGV)
{source}
end
local replies = {{}}
for i = 1, #ARGV, {arity + 1} do
  local ok, reply = pcall(one, {{ARGV[i]}}, {{unpack(ARGV, i + 1, i + {arity})}})
  if not ok then
    if type(reply) ~= 'table' or not reply.err then reply = {{err = tostring(reply)}} end
  elseif reply == nil then
    reply = false
  end
  replies[#replies + 1] = reply
end
return replies
"""
    return lua_function(name, wrapper, read_only, arity)


class GroupedCall(GroupCommit[tuple[str, Sequence[Any]], Any]):
    """A :func:`grouped_function` bound to an asyncio client: calls made meanwhile share one ``FCALL``."""

    def __init__(self, function: LuaFunction, client: Any, max_batch: int = 256) -> None:
        fcall = function.bind(client)
        super().__init__(lambda items: fcall(args=[value for key, args in items for value in (key, *args)]), max_batch)
        self._function = function

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if len(keys) != 1 or len(args) != self._function.arity:
            raise ValueError(f"{self._function.name} takes one key and {self._function.arity} arguments")
        return await self.submit((keys[0], args))
