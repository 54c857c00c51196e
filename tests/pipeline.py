"""Helpers for end-to-end tests: settings pointing at the emulator, a seeded user store, a worker."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import httpx
import redis
from pydantic import SecretStr
from rq import Queue
from rq.serializers import JSONSerializer

from core.config import Settings
from core.redis.functions import FunctionsRedis
from core.redis.keys import TOKEN_KEY
from core.smartcar.tokens import TokenSeal
from tests.contracts import check_output_entry, check_parked_entry
from workers.housekeeping import awaiting
from workers.worker import AsyncWorker

CLIENT_ID = "client_emulator"
#: The longest a burst worker in a test may take.
BURST_LIMIT_SECONDS = 180
CLIENT_SECRET = "emulator-secret"


def pipeline_settings(redis_url: str, emulator_url: str, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "database_url": database_url,
        "smartcar_management_token": SecretStr("test-management-token"),
        "smartcar_client_id": CLIENT_ID,
        "smartcar_client_secret": SecretStr(CLIENT_SECRET),
        "smartcar_api_url": f"{emulator_url}/v3",
        "smartcar_token_url": f"{emulator_url}/oauth2/token",
        "job_retries": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a worker (or web) subprocess pointed at ``settings``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTCAR_", "REDIS_", "DATABASE_"))}
    assert settings.smartcar_client_secret is not None
    return env | {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "SMARTCAR_CLIENT_ID": str(settings.smartcar_client_id),
        "SMARTCAR_CLIENT_SECRET": settings.smartcar_client_secret.get_secret_value(),
        "SMARTCAR_API_URL": settings.smartcar_api_url,
        "SMARTCAR_TOKEN_URL": settings.smartcar_token_url,
        "PYTHONPATH": os.getcwd(),
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def run_worker_burst(settings: Settings, concurrency: int = 4) -> None:
    """Work the queue in this process until it is empty."""
    connection = FunctionsRedis.from_url(settings.redis_url)  # as the worker's (core.redis.clients.rq_redis)

    async def work(worker: AsyncWorker) -> None:
        # A bound, so that a worker that never ends fails the test saying what it awaits.
        runner = asyncio.create_task(worker.run(burst=True))
        done, _ = await asyncio.wait({runner}, timeout=BURST_LIMIT_SECONDS)
        if not done:
            raise AssertionError(f"the burst worker did not end; it awaits:\n{awaiting()}")
        runner.result()

    try:
        queue = Queue(settings.ingest_queue, connection=connection, serializer=JSONSerializer)
        asyncio.run(work(AsyncWorker(settings, connection, queue, concurrency=concurrency)))
    finally:
        connection.close()


def stream_entries(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    """The entries of ``stream``, each checked against its published schema (tests/contracts.py):
    the parked stream's (any stream whose name says ``parked``) or the output stream's."""
    entries = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in client.xrange(stream)]
    check = check_parked_entry if "parked" in stream else check_output_entry
    for entry in entries:
        check(entry)
    return entries


def outputs(client: redis.Redis, stream: str = "smartcar:vehicle-events") -> list[dict[str, Any]]:
    entries = stream_entries(client, stream)
    for entry in entries:
        entry["document"] = json.loads(entry["payload"])
    return entries


def cached_token(client: redis.Redis) -> str:
    """The application token the workers cached in Redis, opened with the test credentials."""
    opened = TokenSeal(CLIENT_ID, CLIENT_SECRET).open(client.get(TOKEN_KEY) or b"")
    assert opened is not None, "no sealed application token in Redis"
    return opened.access_token


def emulator_stats(emulator_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{emulator_url}/_emulator/stats").json())


def inject(emulator_url: str, **rule: Any) -> None:
    response = httpx.post(f"{emulator_url}/_emulator/failures", json=rule)
    assert response.status_code == 201, response.text
