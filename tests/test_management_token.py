"""Outside `dev`, the web refuses management tokens that make signatures worthless."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from core.config import DEV_MANAGEMENT_TOKEN, Settings
from core.errors import ConfigurationError
from service.app import create_app
from tests.procs import free_port
from tests.test_cli import run_cli


def settings_with(token: str, **extra: object) -> Settings:
    return Settings(_env_file=None, smartcar_management_token=SecretStr(token), **extra)  # type: ignore[call-arg]


@pytest.mark.process
@pytest.mark.parametrize(
    ("token", "says"),
    [
        (DEV_MANAGEMENT_TOKEN, "public dev default"),
        ("short-amt", "shorter than 16"),
        (f"a-real-looking-management-token,{DEV_MANAGEMENT_TOKEN}", "entry 2 is the public dev default"),
    ],
)
def test_web_refuses_weak_management_tokens(tmp_path, token, says):
    """`web` with the dev default or a short token (in any rotation slot) exits 2 with one line."""
    result = run_cli("web", "--port", str(free_port()), env={"SMARTCAR_MANAGEMENT_TOKEN": token}, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert says in line
    assert token not in line


def test_create_app_refuses_the_dev_token_outside_dev():
    """The app factory applies the same rule, whoever serves it."""
    with pytest.raises(ConfigurationError, match="dev default"):
        create_app(settings_with(DEV_MANAGEMENT_TOKEN))


def test_dev_mode_accepts_the_dev_token(redis_url):
    """DEV_MODE (set by `dev` for its children) takes the documented dev default."""
    app = create_app(settings_with(DEV_MANAGEMENT_TOKEN, dev_mode=True, redis_url=redis_url))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
