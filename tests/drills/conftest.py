"""Fixtures of the drills: a Redis of their own that they may kill and restart from its AOF."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import RedisServer


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A private redis-server with AOF on (fsync always), so a kill -9 and restart keeps every acknowledged write."""
    server = RedisServer(appendonly=True, fsync_always=True)
    server.start()
    yield server
    server.cleanup()
