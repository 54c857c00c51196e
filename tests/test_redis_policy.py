"""The web refuses a Redis that may evict keys, unless told to run anyway."""

from __future__ import annotations

import asyncio

import pytest
import redis
from pydantic import SecretStr
from starlette.testclient import TestClient

from core.config import Settings
from core.errors import ConfigurationError
from service.app import create_admin_app, create_app
from tests.procs import role_user


@pytest.fixture
def evicting_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    yield redis_url
    client.config_set("maxmemory-policy", "noeviction")
    client.close()


TOKEN = SecretStr("policy-test-management-token")


def settings_for(url: str, **extra) -> Settings:
    return Settings(_env_file=None, redis_url=url, smartcar_management_token=TOKEN, **extra)  # type: ignore[call-arg]


def test_evicting_redis_is_refused_at_startup(evicting_redis):
    """allkeys-lru could silently drop queued events: the web does not start, naming the fix."""
    with pytest.raises(ConfigurationError, match="noeviction"), TestClient(create_app(settings_for(evicting_redis))):
        pass


def test_evicting_redis_is_refused_under_the_web_users_acl(evicting_redis):
    """The check reads INFO memory, which the web's restricted Redis user may run: it refuses there too."""
    with (
        role_user(evicting_redis, settings_for(evicting_redis), "web") as url,
        pytest.raises(ConfigurationError, match="noeviction"),
        TestClient(create_app(settings_for(url))),
    ):
        pass


def test_evicting_redis_is_accepted_with_the_override(evicting_redis):
    """ALLOW_EVICTING_REDIS=true starts anyway (with a loud log line)."""
    with TestClient(create_app(settings_for(evicting_redis, allow_evicting_redis=True))) as client:
        assert client.get("/healthz").status_code == 200


def test_unreachable_redis_at_startup_does_not_stop_the_web():
    """A Redis that is down at startup is not checked: the web starts and reports not ready."""
    settings = settings_for("redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client, TestClient(create_admin_app(settings)) as admin:
        assert client.get("/healthz").status_code == 200
        assert admin.get("/readyz").status_code == 503


def test_a_worker_redis_call_tries_twice_and_leaves_the_waiting_to_one_policy():
    """One call on the worker's client, against a Redis that drops every command, is sent twice at
    most (one immediate reconnect): every wait between tries is core.redis.outage's alone, so the
    waits of two retry layers never multiply (redis-py's own five retries with backoff, each up to
    a socket timeout, did)."""
    import socket
    import threading

    from core.redis.clients import worker_redis

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    commands: list[bytes] = []

    def drop_every_command() -> None:
        """Answer the connection's handshake (CLIENT SETINFO), hang up on the command itself."""
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(65536):
                    if b"PING" in data:
                        commands.append(data)
                        break
                    connection.sendall(b"+OK\r\n" * max(1, data.count(b"SETINFO")))

    threading.Thread(target=drop_every_command, daemon=True).start()

    async def one_call() -> None:
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        client = worker_redis(settings_for(url), max_connections=4)
        try:
            with pytest.raises(redis.ConnectionError):
                await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(one_call())
    finally:
        listener.close()
    print("commands sent:", len(commands))
    assert 1 <= len(commands) <= 2
