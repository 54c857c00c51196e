"""Shared pieces of the drills: real processes, a sender that behaves like Smartcar, and the figures they report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from rq import Worker

from cli.samples import encode, sample_event
from core.config import Settings
from core.redis.keys import dequeued_key, rq_intermediate_key
from tests.conftest import signed_headers
from tests.pipeline import outputs, worker_env
from tests.procs import free_port

TOKEN = "test-management-token"
#: The generous bound every drill waits within; the figures report how long it really took.
SETTLE_SECONDS = 120.0


def start_worker(settings: Settings, *args: str, halt: str | None = None, **extra: str) -> subprocess.Popen[bytes]:
    """A worker in its own process group, as in a pod: killing the group kills its scheduler too.

    ``halt`` (``<point>:<n>[:stop]``) runs it as :mod:`tests.drills.halting_worker`, which kills or
    freezes it the n-th time it reaches that point."""
    entry = ["cli.main"] if halt is None else ["tests.drills.halting_worker", halt]
    return subprocess.Popen(
        [sys.executable, "-m", *entry, "worker", *args],
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


def published_figures(published: list[str]) -> dict[str, int]:
    """What a drill reports of the entries it found: how many, and how many were repeats."""
    return {"published": len(published), "duplicates": len(published) - len(set(published))}


def report(name: str, **figures: object) -> None:
    """Print a drill's figures; `make drills` shows them with -rA, and the closing note quotes them."""
    print(f"DRILL {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def wait_until(condition: Callable[[], bool], timeout: float = SETTLE_SECONDS, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


class Sender:
    """Posts events like Smartcar: a non-2xx is retried (here every 0.3 s) until it gets a 2xx."""

    def __init__(self, url: str, count: int, pause: float = 0.02) -> None:
        self.url = url
        self.events = [sample_event() for _ in range(count)]
        self.pause = pause
        self.acknowledged: dict[str, str] = {}
        self.refusals = 0
        self.slowest = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            for event in self.events:
                if self.stop.is_set():
                    return
                self._deliver(client, event)
                time.sleep(self.pause)

    def _deliver(self, client: httpx.Client, event: dict[str, Any]) -> None:
        body = encode(event)
        headers = signed_headers(body, TOKEN)
        while True:
            started = time.monotonic()
            try:
                response = client.post("/webhooks/smartcar", content=body, headers=headers)
            except Exception:  # connection trouble counts as a failed attempt, as for Smartcar
                response = None
            self.slowest = max(self.slowest, time.monotonic() - started)
            if response is not None and response.status_code == 202:
                self.acknowledged[event["eventId"]] = response.json()["status"]
                return
            self.refusals += 1
            time.sleep(0.3)


def published_ids(client: redis.Redis) -> list[str]:
    return [entry["event_id"] for entry in outputs(client)]


def settle(client: redis.Redis, expected: int, timeout: float = SETTLE_SECONDS) -> float:
    """Wait until ``expected`` entries are on the output stream; returns the seconds it took."""
    started = time.monotonic()
    wait_until(lambda: client.xlen("smartcar:vehicle-events") >= expected, timeout)
    return time.monotonic() - started


def worker_names(client: redis.Redis) -> list[str]:
    return sorted(worker.name for worker in Worker.all(connection=client))


def frozen(process: subprocess.Popen[bytes]) -> bool:
    """True once ``process`` is stopped (SIGSTOP), as the drill hook leaves it."""
    try:
        state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in {"T", "t"}


def whereabouts(client: redis.Redis, job_ids: list[str], queue: str = "smartcar-events") -> dict[str, Any]:
    """Where each job is, for the failure message of a drill that lost one."""
    dequeued = {
        name: [raw.decode() for raw in client.lrange(dequeued_key(queue, name), 0, -1)] for name in worker_names(client)
    }
    found: dict[str, Any] = {}
    for job_id in job_ids:
        found[job_id] = {
            "status": client.hget(f"rq:job:{job_id}", "status"),
            "queued": client.lpos(f"rq:queue:{queue}", job_id),
            "rq_intermediate": client.lpos(rq_intermediate_key(queue), job_id),
            "dequeued_by": [name for name, ids in dequeued.items() if job_id in ids],
            "started": [k for k in client.zrange(f"rq:wip:{queue}", 0, -1) if job_id.encode() in k],
            "failed": client.zscore(f"rq:failed:{queue}", job_id),
            "scheduled": client.zscore(f"rq:scheduled:{queue}", job_id),
            "exc": (client.hget(f"rq:job:{job_id}", "exc_info") or b"")[:300],
        }
    return found


def metrics_port_env() -> tuple[int, dict[str, str]]:
    """A free port for a worker's /metrics, and the environment that sets it."""
    port = free_port()
    return port, {"METRICS_PORT": str(port)}


def reruns(port: int) -> int:
    """Jobs a worker re-ran after their event was already published (caught by the idempotent publish)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return -1
    for line in text.splitlines():
        if line.startswith('smartcar_ingest_jobs_total{outcome="already_published"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0
