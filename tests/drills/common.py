"""Shared pieces of the drills: real processes, and the figures they report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import httpx

from core.config import Settings
from core.samples import encode
from tests.conftest import signed_headers
from tests.pipeline import worker_env

TOKEN = "test-management-token"


def start_worker(settings: Settings, *args: str, **extra: str) -> subprocess.Popen[bytes]:
    """A worker in its own process group, as in a pod: killing the group kills its scheduler too."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", *args],
        env=worker_env(settings, **extra),
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    process.wait(timeout=30)


def post(url: str, document: dict[str, Any]) -> httpx.Response:
    body = encode(document)
    return httpx.post(f"{url}/webhooks/smartcar", content=body, headers=signed_headers(body, TOKEN), timeout=10)


def report(name: str, **figures: object) -> None:
    """Print a drill's figures; `make test` shows them with -rA, and the closing note quotes them."""
    print(f"DRILL {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
