"""The console script, run as a real process."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import sys

import httpx
import pytest

from cli.samples import encode, sample_event
from tests.conftest import TOKEN, signed_headers
from tests.procs import WebProcess, free_port, service_env

#: Every test here starts a process of its own (tests/kinds.py).
pytestmark = pytest.mark.process


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
    env = {"SMARTCAR_MANAGEMENT_TOKEN": TOKEN, "REDIS_URL": redis_url, "LOG_FORMAT": "json", "ADMIN_PORT": "0"}
    with WebProcess(service_env(**env), cwd=tmp_path, capture=True) as web:
        body = encode(sample_event())
        response = httpx.post(f"{web.url}/webhooks/smartcar", content=body, headers=signed_headers(body))
        assert response.status_code == 202
        url = f"{web.url}/webhooks/smartcar"
        for event_type in ("VEHICLE_STATE", "VEHICLE_ERROR", "VERIFY"):
            result = run_cli("send-test-event", "--url", url, "--type", event_type, env=env, cwd=tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "202" in result.stdout or "challenge answer matches" in result.stdout
    assert web.stdout + web.stderr
    assert TOKEN not in web.stdout + web.stderr


def test_send_test_event_to_nothing_fails_clearly(tmp_path):
    """`send-test-event` to a closed port is an endpoint that does not answer: exit 3, one line saying why."""
    url = f"http://127.0.0.1:{free_port()}/webhooks/smartcar"
    result = run_cli("send-test-event", "--url", url, env={"SMARTCAR_MANAGEMENT_TOKEN": TOKEN}, cwd=tmp_path)
    assert result.returncode == 3
    assert "could not reach" in result.stderr


def test_send_test_event_to_a_url_that_is_not_http_is_a_usage_error(tmp_path):
    """A --url that is not http(s) is the operator's to fix: exit 2, not an outage."""
    result = run_cli(
        "send-test-event", "--url", "ftp://example.invalid/x", env={"SMARTCAR_MANAGEMENT_TOKEN": TOKEN}, cwd=tmp_path
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "--url" in line


def test_worker_refuses_to_start_without_client_credentials(tmp_path):
    """`worker` without SMARTCAR_CLIENT_ID/SECRET exits 2 naming both variables in one line."""
    result = run_cli("worker", "--burst", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "SMARTCAR_CLIENT_ID" in line
    assert "SMARTCAR_CLIENT_SECRET" in line


@pytest.mark.parametrize("command", [["replay"], ["status"], ["backfill"]])
def test_unreachable_redis_is_one_line_and_exit_3(command, tmp_path):
    """A Redis that does not answer is an outage (exit 3), told in one line without the URL or a traceback."""
    env = {
        "REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        "SMARTCAR_CLIENT_ID": "client",
        "SMARTCAR_CLIENT_SECRET": "client-secret",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'users.db'}",
    }
    result = run_cli(*command, env=env, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"smartcar-ingest {command[0]}: Redis at REDIS_URL could not be ")
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_redis_refusing_the_credentials_is_a_bad_setting(redis_url, tmp_path):
    """Credentials Redis refuses are the operator's to fix: exit 2, one line, the password not repeated."""
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    result = run_cli("status", env={"REDIS_URL": f"redis://nobody:hunter2@127.0.0.1:{port}/0"}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "REDIS_URL" in line
    assert "hunter2" not in result.stderr


def test_a_redis_url_redis_cannot_read_is_a_bad_setting(tmp_path):
    """A REDIS_URL of another scheme is exit 2, one line, without echoing the value."""
    result = run_cli("replay", env={"REDIS_URL": "http://user:hunter2@127.0.0.1:6379/0"}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "REDIS_URL is not a Redis URL" in line
    assert "hunter2" not in line


def test_unreachable_database_is_exit_3_and_a_missing_user_exit_1(tmp_path):
    """`users link`: a database that does not answer is an outage (3); a user that does not exist a failure (1)."""
    link = ("users", "link", "--user-id", "99", "--smartcar-user-id", "7f0b1c44-8a5c-4a8e-9a0e-2b0b8d7c3e11")
    down = run_cli(
        *link, env={"DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"}, cwd=tmp_path
    )
    assert down.returncode == 3, down.stderr
    assert "did not answer" in down.stderr
    database = {"DATABASE_URL": f"sqlite:///{tmp_path / 'users.db'}"}
    assert run_cli("db", "upgrade", env=database, cwd=tmp_path).returncode == 0
    missing = run_cli(*link, env=database, cwd=tmp_path)
    assert missing.returncode == 1, missing.stderr
    [line] = missing.stderr.strip().splitlines()
    assert "no user with id 99" in line


def test_smartcar_refusing_the_credentials_is_exit_4(redis_url, emulator, tmp_path):
    """`backfill` with a client secret the token endpoint refuses exits 4, without the secret in the line."""
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'users.db'}",
        "SMARTCAR_CLIENT_ID": "client_emulator",
        "SMARTCAR_CLIENT_SECRET": "not-the-emulator-secret",
        "SMARTCAR_API_URL": f"{emulator}/v3",
        "SMARTCAR_TOKEN_URL": f"{emulator}/oauth2/token",
    }
    assert run_cli("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    result = run_cli("backfill", "--dry-run", env=env, cwd=tmp_path)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "not-the-emulator-secret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_replay_progress_on_a_terminal_uses_a_carriage_return(redis_url, redis_client, tmp_path):
    """On a terminal, `replay` rewrites its progress line with a real carriage return, never a printed backslash-r."""
    for n in range(3):
        body = encode(sample_event())
        fields = {"event_id": f"evt-tty-{n}", "reason": "unknown_user", "detail": "test", "payload": body}
        redis_client.xadd("smartcar:parked", fields)  # type: ignore[arg-type]
    leader, follower = pty.openpty()
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTCAR_", "REDIS_", "DATABASE_"))}
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "replay"],
            stdout=subprocess.PIPE,
            stderr=follower,
            env=base | {"REDIS_URL": redis_url, "PYTHONPATH": os.getcwd()},
            cwd=tmp_path,
        )
        os.close(follower)
        follower = -1
        terminal = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal: everything was read
                break
            if not chunk:
                break
            terminal += chunk
        out, _ = process.communicate(timeout=60)
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert process.returncode == 0, terminal
    assert b"re-enqueued 3 of 3 entries parked" in out
    assert b"\\r" not in terminal
    assert b"\r  scanned 3, re-enqueued 3" in terminal


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

    admin = free_port()
    env = {
        "SMARTCAR_MANAGEMENT_TOKEN": TOKEN,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        "ADMIN_PORT": str(admin),
        "ADMIN_HOST": "127.0.0.1",
    }
    with WebProcess(service_env(**env), "--workers", "2", cwd=tmp_path) as web:
        for _ in range(40):  # new connections, so both processes take some
            body = encode(sample_event())
            response = httpx.post(f"{web.url}/webhooks/smartcar", content=body, headers=signed_headers(body))
            assert response.status_code == 202
        assert httpx.get(f"{web.url}/metrics").status_code == 404
        for _ in range(6):
            text = httpx.get(f"http://127.0.0.1:{admin}/metrics").text
            [value] = re.findall(r'^smartcar_ingest_deliveries_total\{outcome="accepted"\} (\S+)$', text, re.M)
            assert float(value) == 40
        ready = httpx.get(f"http://127.0.0.1:{admin}/readyz").json()
        assert ready == {"status": "ok", "checks": {"web": "ok", "redis": "ok"}}


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


def test_output_cut_short_by_the_reader_is_not_a_traceback(tmp_path):
    """`smartcar-ingest … | head`: a reader that closed the pipe ends the command quietly, exit 0, no traceback."""
    env = os.environ | {"PYTHONPATH": os.getcwd(), "PW": "x" * 40}
    command = [sys.executable, "-m", "cli.main", "redis-acl", "worker", "--password-env", "PW"]
    process = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # the reader is gone before the command writes its first line
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr
    assert "BrokenPipe" not in stderr
    assert process.returncode == 0
