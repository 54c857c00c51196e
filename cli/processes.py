"""The commands that run the service's processes: ``web``, ``worker``, ``emulator`` and ``dev`` (README.md,
the command table; docs/architecture.md, "Design notes"). The ports helpers are the tests' too."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from core.config import DEV_MANAGEMENT_TOKEN, Settings
from core.errors import ConfigurationError, LinkConflict
from core.redis import durability
from core.redis.clients import probe_redis


def free_port(host: str = "127.0.0.1", wanted: int = 0) -> int:
    """``wanted`` if nothing listens there at ``host`` right now, else a port nothing does (the kernel's pick)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, wanted))
        except OSError:
            sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int,
    timeout: float = 30.0,
    *,
    process: subprocess.Popen[Any] | None = None,
    what: str = "the process",
) -> None:
    """Return once ``127.0.0.1:port`` listens; ConfigurationError after ``timeout`` s or once ``process`` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ConfigurationError(f"{what} exited during startup (status {process.returncode}).")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise ConfigurationError(f"{what} did not start listening on port {port} within {timeout:.0f} s.")


def seed_users(database_url: str) -> int:
    """Create one internal user (and vehicle) per emulator user; returns how many were added."""
    from core.store.users import UserStore
    from emulator.seed import default_seed

    store = UserStore(database_url)
    added = 0
    vehicle_ids = itertools.count(1)
    try:
        for index, user in enumerate(default_seed(), start=1):
            try:
                store.add_user(index, f"driver{index}@example.test", f"Driver {index}", smartcar_user_id=user.id)
                added += 1
            except LinkConflict as exc:
                if exc.code != "record_exists":  # seeded before; a Smartcar id held elsewhere is shown
                    raise
            for vehicle in user.vehicles:
                with contextlib.suppress(LinkConflict):
                    store.add_vehicle(next(vehicle_ids), index, vehicle.vin, smartcar_vehicle_id=vehicle.id)
    finally:
        store.dispose()
    return added


def web(settings: Settings, host: str, port: int, workers: int, max_connections: int, keep_alive_timeout: int) -> None:
    from core.logs import configure_logging
    from service.server import serve

    settings.require_management_token()
    configure_logging(settings.log_level, settings.log_format)
    with contextlib.ExitStack() as stack:
        if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Each uvicorn process counts for itself; a shared directory lets /metrics sum them all.
            shared = tempfile.TemporaryDirectory(prefix="smartcar-ingest-metrics-", ignore_cleanup_errors=True)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = stack.enter_context(shared)
        serve(settings, host, port, workers, max_connections, keep_alive_timeout)


def worker(settings: Settings, burst: bool, concurrency: int) -> None:
    from cli.operations import redis_errors
    from core.logs import configure_logging
    from workers.worker import run_worker

    settings.require_client_credentials()
    configure_logging(settings.log_level, settings.log_format)
    # The worker waits out Redis trouble; this only ends a start whose Redis never answered.
    with redis_errors("reached", os_errors=False):
        run_worker(settings, burst=burst, concurrency=concurrency)


def emulator(settings: Settings, host: str, port: int, latency: float) -> None:
    from emulator.app import EmulatorConfig
    from emulator.server import serve

    config = EmulatorConfig(latency_seconds=latency)
    print(f"Smartcar emulator on http://{host}:{port}")
    print(f"  SMARTCAR_API_URL=http://{host}:{port}/v3")
    print(f"  SMARTCAR_TOKEN_URL=http://{host}:{port}/oauth2/token")
    print(f"  SMARTCAR_CLIENT_ID={config.client_id} SMARTCAR_CLIENT_SECRET={config.client_secret}")
    serve(host=host, port=port, config=config)


def run_dev(settings: Settings, port: int) -> None:
    env = dict(os.environ)
    env.setdefault("LOG_FORMAT", "console")
    # Deliveries survive a Redis outage in dev too, in a directory that outlives the run.
    env.setdefault("SPOOL_DIR", str(Path("var/spool").resolve()))
    if not settings.management_tokens:
        env["SMARTCAR_MANAGEMENT_TOKEN"] = DEV_MANAGEMENT_TOKEN
    env["DEV_MODE"] = "true"
    # Locally, captured deliveries from months ago are replayed on purpose: accept their age.
    env.setdefault("MAX_DELIVERY_AGE_SECONDS", str(10 * 365 * 24 * 3600))
    # Everything dev starts listens on this machine only; a busy ADMIN_PORT gives way to a free one.
    admin_host = env.setdefault("ADMIN_HOST", "127.0.0.1")
    admin_port = settings.admin_port and free_port(admin_host, settings.admin_port)
    env["ADMIN_PORT"] = str(admin_port)
    scratch = Path(tempfile.mkdtemp(prefix="smartcar-ingest-dev-"))
    # Each child has a session of its own: docs/architecture.md, "dev stops its children one at a time".
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)

    def start(name: str, args: list[str], port: int | None = None) -> None:
        children.append((name, subprocess.Popen(args, env=env, start_new_session=True)))
        if port is not None:
            wait_for_port(port, process=children[-1][1], what=name)

    cli = [sys.executable, "-m", "cli.main"]
    try:
        answers = False
        with probe_redis(settings.redis_url) as probe, contextlib.suppress(redis.RedisError, OSError):
            answers = bool(probe.ping())
        if answers:
            print(f"using Redis at {settings.redis_url}")
            env["REDIS_URL"] = settings.redis_url
        else:
            if shutil.which("redis-server") is None:
                raise ConfigurationError("REDIS_URL does not answer and redis-server is not installed.")
            redis_port = free_port()
            redis_log = Path("var/redis-server.log").resolve()
            redis_log.parent.mkdir(parents=True, exist_ok=True)
            # Persistence as docs/deploy.md asks of every Redis (redis-setup checks it) and a memory limit, as
            # docs/capacity.md does; Redis's notes go to a file that outlives the run.
            args = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(scratch)]
            args += [*durability.server_options(), "--logfile", str(redis_log)]
            args += ["--maxmemory", "256mb", "--maxmemory-policy", "noeviction"]
            start("redis-server", args, redis_port)
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            print(f"started redis-server on port {redis_port} (AOF in {scratch}, log in {redis_log})")

        emulated = not (settings.smartcar_client_id and settings.smartcar_client_secret)
        if not emulated:
            print(f"using Smartcar at {settings.smartcar_api_url}")
        else:
            from emulator.app import EmulatorConfig

            emulator_port = free_port()
            start("the emulator", [*cli, "emulator", "--port", str(emulator_port)], emulator_port)
            env.update(
                SMARTCAR_API_URL=f"http://127.0.0.1:{emulator_port}/v3",
                SMARTCAR_TOKEN_URL=f"http://127.0.0.1:{emulator_port}/oauth2/token",
                SMARTCAR_CLIENT_ID=EmulatorConfig().client_id,
                SMARTCAR_CLIENT_SECRET=EmulatorConfig().client_secret,
            )
            print(f"started the Smartcar emulator on port {emulator_port}")

        from cli.redis_admin import check_persistence, load_functions
        from core.store import db

        db.upgrade(settings.database_url)
        print(load_functions(env["REDIS_URL"]))
        check_persistence(env["REDIS_URL"])
        if emulated:
            added = seed_users(settings.database_url)
            print(f"user store {settings.database_url} migrated; {added} emulator users added")

        start("the web process", [*cli, "web", "--host", "127.0.0.1", "--port", str(port)], port)
        start("the worker", [*cli, "worker"])
        admin = f"http://127.0.0.1:{admin_port}"
        print(
            f"""
smartcar-ingest is running: web on http://127.0.0.1:{port}, one worker, Redis at {env["REDIS_URL"]}

  send a signed test event:   uv run smartcar-ingest send-test-event --url http://127.0.0.1:{port}/webhooks/smartcar
  read the enriched output:   redis-cli -u {env["REDIS_URL"]} XRANGE {settings.output_stream} - +
  parked events:              redis-cli -u {env["REDIS_URL"]} XRANGE {settings.parked_stream} - +
  readiness and metrics:      {f"{admin}/readyz  {admin}/metrics" if admin_port else "off (ADMIN_PORT=0)"}

Ctrl-C stops everything.""",
            flush=True,
        )
        while True:
            for name, process in children:
                if process.poll() is not None:
                    raise ConfigurationError(f"{name} stopped unexpectedly (status {process.returncode}).")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping…")
    finally:
        hurry = False  # a second Ctrl-C kills what is left
        for name, process in reversed(children):
            if not hurry:
                process.terminate()
                try:
                    process.wait(timeout=15)
                    continue
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in time; killing it", file=sys.stderr)
                except KeyboardInterrupt:
                    hurry = True
            process.kill()
            process.wait()
        shutil.rmtree(scratch, ignore_errors=True)
