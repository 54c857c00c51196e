"""Shared fixtures: one private redis-server per session, flushed around every test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr
from starlette.testclient import TestClient

from core.config import Settings
from core.signatures import sign
from service.app import create_app
from tests.kinds import (  # noqa: F401 (the hooks and fixture that keep each test in its kind)
    _stays_in_its_kind,
    infrastructure,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_protocol,
)
from tests.procs import RedisServer

TOKEN = "test-management-token"
OLD_TOKEN = "previous-management-token"
# The captured deliveries kept in the repository: the only source of fixture cases, so every
# checkout runs the same ones.
CAPTURED_DIR = Path(__file__).resolve().parent / "fixtures" / "captured"
# The team's shared captures beside the checkout, where there is one; never read as cases, only
# checked to be all copied into CAPTURED_DIR (tests/test_fixtures.py).
SHARED_CAPTURED_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "captured"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    with infrastructure():
        server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=redis_url,
        database_url=f"sqlite:///{tmp_path / 'users.db'}",
        smartcar_management_token=SecretStr(f"{TOKEN},{OLD_TOKEN}"),
        max_body_bytes=65_536,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def command_calls(client: redis.Redis, command: str) -> int:
    """How many times Redis ran ``command`` (as ``INFO commandstats`` names it, e.g. ``function|load``)
    since its counters were last reset; a function's inner calls count too."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def signed_headers(body: bytes, token: str = TOKEN) -> dict[str, str]:
    return {"content-type": "application/json", "sc-signature": sign(token.encode(), body)}


def fixture_paths() -> list[Path]:
    return sorted(CAPTURED_DIR.glob("*.json"))


def load_fixture(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def emulator_url() -> Iterator[str]:
    from emulator.server import running_emulator

    with running_emulator() as url:
        yield url


@pytest.fixture
def emulator(emulator_url: str) -> Iterator[str]:
    import httpx

    httpx.post(f"{emulator_url}/_emulator/reset").raise_for_status()
    yield emulator_url
    httpx.post(f"{emulator_url}/_emulator/reset").raise_for_status()


@pytest.fixture
def seeded_database(tmp_path: Path) -> str:
    from cli.processes import seed_users
    from core.store import db

    url = f"sqlite:///{tmp_path / 'users.db'}"
    db.upgrade(url)
    seed_users(url)
    return url


@pytest.fixture
def pipeline(redis_url: str, emulator: str, seeded_database: str) -> Iterator[Settings]:
    import stamina

    from tests.pipeline import pipeline_settings

    # No waits between retries in this process: the Smartcar calls' and the Redis waits
    # (core.redis.outage) alike. A worker started as a subprocess is not affected and waits for real.
    stamina.set_testing(True, attempts=3)
    yield pipeline_settings(redis_url, emulator, seeded_database)
    stamina.set_testing(False)
