"""What an operator sees first (issue 26, item 12): every line once, and a start-up that says what it serves.

Run as a new user would: ``dev`` (what ``make run`` runs), ``web``, ``worker``, then ``status``. Before the
fix, uvicorn's lines came twice from the web (its admin server is a second uvicorn server, saying the same
"Started server process", "Waiting for application startup.", "Application startup complete." and, at
shutdown, "Shutting down" ... "Finished server process"), seven of Alembic's "setup plugin ..." INFO lines
opened every web start (and a worker's first event), and ``status`` headed the jobs in flight ``JOBS``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import redis

from cli.samples import encode, sample_event
from core.logs import configure_logging
from tests.conftest import TOKEN, signed_headers
from tests.pipeline import outputs, worker_env
from tests.procs import WebProcess, free_port, service_env

#: Every test here starts a process of its own (tests/kinds.py).
pytestmark = pytest.mark.process

#: uvicorn's lines about a server's own life, not about what it serves: DEBUG lines since item 12.
LIFECYCLE = re.compile(
    r"(Started|Finished|Stopping) (server|parent) process"
    r"|Waiting for application (startup|shutdown)\.|Application (startup|shutdown) complete\."
)


def log_lines(output: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``output`` (LOG_FORMAT=json), each with ``logger`` whichever key named it."""
    lines = []
    for text in output.splitlines():
        if not text.startswith("{"):
            continue
        line = json.loads(text)
        line["logger"] = line.get("logger") or line.get("logger_name")
        lines.append(line)
    return lines


def repeated(lines: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """The lines (by logger and text) that appear more than once, with their counts."""
    counts = Counter((line["logger"], line["event"]) for line in lines)
    return {key: count for key, count in counts.items() if count > 1}


def web_env(redis_url: str, **extra: str) -> dict[str, str]:
    values = {
        "SMARTCAR_MANAGEMENT_TOKEN": TOKEN,
        "REDIS_URL": redis_url,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "ADMIN_HOST": "127.0.0.1",
        "ADMIN_PORT": str(free_port()),
    }
    return service_env(**(values | extra))


@pytest.mark.parametrize("processes", ["1", "2"])
def test_web_says_each_line_once_and_at_start_only_what_it_serves(redis_url, tmp_path, processes):
    """`web` (one process, or `--workers 2`) started and stopped: no line twice, no Alembic line, and the
    start-up's INFO lines are the admin endpoints and the public URL, nothing else."""
    env = web_env(redis_url)
    with WebProcess(env, "--workers", processes, cwd=tmp_path, capture=True) as web:
        admin = f"http://127.0.0.1:{env['ADMIN_PORT']}"
        deadline = time.monotonic() + 30
        while httpx.get(f"{admin}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the web never became ready"
            time.sleep(0.1)
        body = encode(sample_event())
        response = httpx.post(f"{web.url}/webhooks/smartcar", content=body, headers=signed_headers(body))
        assert response.status_code == 202
    lines = log_lines(web.stderr)
    assert lines, web.stderr

    # Each of `--workers 2`'s children checks Redis for itself, as a pod would, and may warn for itself.
    said = lines if processes == "1" else [line for line in lines if line["level"] == "info"]
    assert repeated(said) == {}, web.stderr
    assert [line["event"] for line in lines if line["logger"].startswith("alembic")] == []
    assert [line["event"] for line in lines if LIFECYCLE.match(line["event"])] == []
    started = [line["event"] for line in lines if line["level"] == "info" and line["event"] != "Shutting down"]
    assert started[: started.index(f"Uvicorn running on {web.url} (Press CTRL+C to quit)") + 1] == [
        "admin endpoints served",
        f"Uvicorn running on {web.url} (Press CTRL+C to quit)",
    ]


def test_web_lifecycle_lines_are_there_when_asked_for(redis_url, tmp_path):
    """At LOG_LEVEL=DEBUG uvicorn's lifecycle lines and Alembic's plugin lines are back, still once each."""
    with WebProcess(web_env(redis_url, LOG_LEVEL="DEBUG"), cwd=tmp_path, capture=True) as web:
        pass
    lines = log_lines(web.stderr)
    uvicorn = [line["event"] for line in lines if line["logger"] == "uvicorn.error"]
    for event in ("Waiting for application startup.", "Application startup complete.", "Shutting down"):
        assert uvicorn.count(event) == 1, web.stderr
    plugins = [line["event"] for line in lines if line["logger"] == "alembic.runtime.plugins"]
    assert "setup plugin alembic.autogenerate.schemas" in plugins
    assert len(plugins) == len(set(plugins))


def test_alembic_plugin_lines_only_when_asked_for(capsys):
    """Alembic announces each of its plugins at INFO as it is imported: DEBUG here, shown at LOG_LEVEL=DEBUG."""
    plugins = logging.getLogger("alembic.runtime.plugins")
    try:
        configure_logging("INFO", "json")
        plugins.info("setup plugin %s", "alembic.autogenerate.schemas")
        assert "setup plugin" not in capsys.readouterr().err
        configure_logging("DEBUG", "json")
        plugins.info("setup plugin %s", "alembic.autogenerate.schemas")
        assert "setup plugin alembic.autogenerate.schemas" in capsys.readouterr().err
    finally:
        configure_logging("WARNING", "json")


def stop_like(process: subprocess.Popen[str], how: str) -> None:
    """SIGTERM (Kubernetes, `kill`), or what Ctrl-C under `make run` sends: SIGINT to the whole process
    group from the terminal, then SIGTERM from `dev` stopping its children."""
    if how == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_worker_says_each_line_once(pipeline, redis_client, tmp_path, how):
    """A worker that ran an event and was stopped: its warm shutdown is told once, no line twice, no Alembic line."""
    from tests.test_pipeline import deliver

    deliver(pipeline, sample_event())
    env = worker_env(pipeline, LOG_LEVEL="INFO", LOG_FORMAT="json", METRICS_PORT=str(free_port()))
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not outputs(redis_client) and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not outputs(redis_client):
            worker.kill()
            pytest.fail("the worker published nothing:\n" + worker.communicate()[1])
        stop_like(worker, how)
        _, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    lines = log_lines(err)

    assert [line["event"] for line in lines].count("warm shutdown: finishing the jobs in flight") == 1, err
    assert repeated(lines) == {}, err
    assert [line["event"] for line in lines if line["logger"].startswith("alembic")] == []
    infos = [line["event"] for line in lines if line["level"] == "info"]
    assert infos[:2] == ["worker metrics served", "worker started"], err
    started = next(line for line in lines if line["event"] == "worker started")
    assert (started["queue"], started["concurrency"]) == (pipeline.ingest_queue, 256)


class Output:
    """A child's stdout and stderr, read as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._process = process
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self._process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    def join(self) -> str:
        self._thread.join(timeout=10)
        assert self._process.stdout is not None
        self._process.stdout.close()
        return "\n".join(self.lines)


def test_make_run_then_send_test_event_says_each_line_once(tmp_path):
    """`dev` (make run) with its own redis-server, a test event sent, then Ctrl-C: no line twice in all its
    output and its children's, no Alembic line, no uvicorn lifecycle line, and Redis's maxmemory set."""
    port = free_port()
    env = service_env(
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing there: dev starts its own redis-server
        DATABASE_URL=f"sqlite:///{tmp_path / 'users.db'}",
        ADMIN_PORT=str(free_port()),
        METRICS_PORT=str(free_port()),
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
    )
    dev = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "dev", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = Output(dev)
    try:
        redis_port = int(output.wait_for(r"started redis-server on port (\d+)", 60)[1])
        output.wait_for("Ctrl-C stops everything", 60)
        client = redis.Redis(port=redis_port, decode_responses=True)
        assert int(client.config_get("maxmemory")["maxmemory"]) > 0
        output.wait_for("worker metrics served", 60)
        url = f"http://127.0.0.1:{port}/webhooks/smartcar"
        sent = subprocess.run(
            [sys.executable, "-m", "cli.main", "send-test-event", "--url", url],
            env=env | {"SMARTCAR_MANAGEMENT_TOKEN": "dev-management-token"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        deadline = time.monotonic() + 60
        while not client.xlen("smartcar:vehicle-events"):
            assert time.monotonic() < deadline, "the worker published nothing"
            time.sleep(0.1)
        client.close()
        os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert dev.wait(timeout=60) == 0
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGTERM)
            dev.wait(timeout=30)
    text = output.join()
    lines = log_lines(text)
    plain = [line for line in text.splitlines() if line.strip() and not line.startswith("{")]

    assert repeated(lines) == {}, text
    assert [line for line, count in Counter(plain).items() if count > 1] == [], text
    # Nothing went wrong, so nothing warns: not even while stopping (Redis stops last).
    assert [line["event"] for line in lines if line["level"] not in ("info", "debug")] == [], text
    assert [line["event"] for line in lines if line["logger"].startswith("alembic")] == []
    assert [line["event"] for line in lines if LIFECYCLE.match(line["event"])] == []
    assert [line for line in plain if LIFECYCLE.search(line)] == [], text  # the emulator's own uvicorn
