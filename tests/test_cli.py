"""The console script, run as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest

from cli.samples import encode, sample_event
from tests.conftest import TOKEN, signed_headers
from tests.procs import free_port, wait_for_port


def run_cli(*args: str, env: dict[str, str] | None = None, cwd=None, timeout: float = 60):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTCAR_", "REDIS_", "DATABASE_"))}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        env=base | {"PYTHONPATH": os.getcwd()},
        cwd=cwd,
        timeout=timeout,
    )


def test_web_refuses_to_start_without_a_management_token(tmp_path):
    """`web` without SMARTCAR_MANAGEMENT_TOKEN exits 2 with one actionable line."""
    result = run_cli("web", "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "SMARTCAR_MANAGEMENT_TOKEN" in lines[0]


def test_bad_setting_is_one_line_naming_the_variable(tmp_path):
    """An invalid value names the variable and exits 2 without a traceback."""
    result = run_cli("web", env={"MAX_BODY_BYTES": "lots", "SMARTCAR_MANAGEMENT_TOKEN": "x"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "MAX_BODY_BYTES" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_secret_values_never_appear_in_setting_errors(tmp_path):
    """A bad setting error does not echo the management token."""
    result = run_cli("web", env={"SMARTCAR_MANAGEMENT_TOKEN": "s3cr3t-amt", "DEDUPE_TTL_SECONDS": "-1"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "s3cr3t-amt" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["web", "--port", "0"],
        ["web", "--workers", "many"],
        ["web", "--max-connections", "0"],
        ["web", "--keep-alive-timeout", "-1"],
        ["nope"],
        [],
    ],
)
def test_bad_arguments_exit_2(args, tmp_path):
    """Bad arguments exit 2 with a usage message."""
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr


def test_web_serves_the_endpoint_and_send_test_event_reaches_it(redis_url, tmp_path):
    """`smartcar-ingest web` serves the webhook; `send-test-event` posts signed events to it."""
    port = free_port()
    env = {"SMARTCAR_MANAGEMENT_TOKEN": TOKEN, "REDIS_URL": redis_url, "LOG_FORMAT": "json", "ADMIN_PORT": "0"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTCAR_", "REDIS_"))}
    web = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "web", "--host", "127.0.0.1", "--port", str(port)],
        env=base | env | {"PYTHONPATH": os.getcwd()},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, timeout=30)
        body = encode(sample_event())
        response = httpx.post(f"http://127.0.0.1:{port}/webhooks/smartcar", content=body, headers=signed_headers(body))
        assert response.status_code == 202
        url = f"http://127.0.0.1:{port}/webhooks/smartcar"
        for event_type in ("VEHICLE_STATE", "VEHICLE_ERROR", "VERIFY"):
            result = run_cli("send-test-event", "--url", url, "--type", event_type, env=env, cwd=tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "202" in result.stdout or "challenge answer matches" in result.stdout
    finally:
        web.terminate()
        output, _ = web.communicate(timeout=20)
    assert TOKEN not in output


def test_send_test_event_to_nothing_fails_clearly(tmp_path):
    """`send-test-event` to a closed port exits non-zero with one line saying why."""
    url = f"http://127.0.0.1:{free_port()}/webhooks/smartcar"
    result = run_cli("send-test-event", "--url", url, env={"SMARTCAR_MANAGEMENT_TOKEN": TOKEN}, cwd=tmp_path)
    assert result.returncode == 2
    assert "could not reach" in result.stderr


def test_worker_refuses_to_start_without_client_credentials(tmp_path):
    """`worker` without SMARTCAR_CLIENT_ID/SECRET exits 2 naming both variables in one line."""
    result = run_cli("worker", "--burst", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "SMARTCAR_CLIENT_ID" in line
    assert "SMARTCAR_CLIENT_SECRET" in line


def test_replay_with_unreachable_redis_is_one_line(tmp_path):
    """`replay` against a Redis that does not answer exits non-zero with one line, no URL or traceback."""
    result = run_cli("replay", env={"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}, cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["users", "link", "--user-id", "x", "--smartcar-user-id", "u"],
        ["replay", "--reason", "nope"],
        ["worker", "--concurrency", "0"],
    ],
)
def test_more_bad_arguments_exit_2(args, tmp_path):
    """Malformed ids, unknown parked reasons and zero concurrency are refused with usage."""
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "usage" in result.stderr


def test_web_with_two_processes_reports_metrics_of_both(redis_url, tmp_path):
    """`web --workers 2`: one admin port, whose /metrics counts the deliveries both processes accepted."""
    import re

    port, admin = free_port(), free_port()
    env = {
        "SMARTCAR_MANAGEMENT_TOKEN": TOKEN,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        "ADMIN_PORT": str(admin),
        "ADMIN_HOST": "127.0.0.1",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTCAR_", "REDIS_", "PROMETHEUS_", "ADMIN_"))}
    web = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "web", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=base | env | {"PYTHONPATH": os.getcwd()},
        cwd=tmp_path,
    )
    try:
        wait_for_port(port, timeout=30)
        url = f"http://127.0.0.1:{port}"
        for _ in range(40):  # new connections, so both processes take some
            body = encode(sample_event())
            assert httpx.post(f"{url}/webhooks/smartcar", content=body, headers=signed_headers(body)).status_code == 202
        assert httpx.get(f"{url}/metrics").status_code == 404
        for _ in range(6):
            text = httpx.get(f"http://127.0.0.1:{admin}/metrics").text
            [value] = re.findall(r'^smartcar_ingest_deliveries_total\{outcome="accepted"\} (\S+)$', text, re.M)
            assert float(value) == 40
        ready = httpx.get(f"http://127.0.0.1:{admin}/readyz").json()
        assert ready == {"status": "ok", "checks": {"web": "ok", "redis": "ok"}}
    finally:
        web.terminate()
        web.wait(timeout=30)


def test_web_stops_in_one_line_when_the_admin_port_cannot_be_bound(tmp_path):
    """A taken ADMIN_PORT, or one equal to the public port, stops `web` with exit 2 and one line naming ADMIN_PORT."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        env = {"SMARTCAR_MANAGEMENT_TOKEN": TOKEN, "ADMIN_HOST": "127.0.0.1", "ADMIN_PORT": busy}
        clash = run_cli("web", "--host", "127.0.0.1", "--port", str(free_port()), env=env, cwd=tmp_path)
    port = free_port()
    same = run_cli("web", "--port", str(port), env=env | {"ADMIN_PORT": str(port)}, cwd=tmp_path)
    for result in (clash, same):
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("smartcar-ingest web: ADMIN_PORT")
