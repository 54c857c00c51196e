"""The web refuses a Redis that may evict keys, unless told to run anyway."""

from __future__ import annotations

import pytest
import redis
from pydantic import SecretStr
from starlette.testclient import TestClient

from core.config import Settings
from core.errors import ConfigurationError
from service.admin import create_admin_app
from service.app import create_app


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
