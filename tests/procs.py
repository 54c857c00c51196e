"""Real processes for tests: a private redis-server, a uvicorn server and ``smartcar-ingest web`` on free ports.

Ports come from :func:`free_port`, a band of its own per test process; :func:`wait_for_port` is the CLI's.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
import uvicorn

from cli import processes
from cli.processes import wait_for_port
from cli.redis_admin import load_functions
from core.config import Settings
from core.redis.acl import Role, acl_rules
from tests.kinds import DRILL, needs

__all__ = ["LiveServer", "RedisServer", "WebProcess", "env", "free_port", "service_env", "wait_for_port"]

#: Prefixes of the service's settings in the environment: a child process a test starts sees only
#: the ones the test gives it, whatever the shell running the tests has set.
SETTING_PREFIXES = ("SMARTCAR_", "REDIS_", "DATABASE_", "ADMIN_", "PROMETHEUS_")
#: Test ports come from a band below Linux's ephemeral range (32768-60999 by default), split between
#: pytest-xdist's worker processes: a port handed out here cannot be taken in the meantime by another
#: test process, nor by the kernel as the source port of some outgoing connection.
PORT_BAND_START = 20_000
PORTS_PER_PROCESS = 1_000
#: Where in its band this test process starts: random, so that two test sessions on one machine
#: (a developer's and a helper's) rarely reach for the same port at the same moment.
_next_port = itertools.count(random.randrange(PORTS_PER_PROCESS))
_port_lock = threading.Lock()
#: How long a test waits for a child process to listen.
STARTUP_SECONDS = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now, from this test process's own band."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = PORT_BAND_START + (int(worker) % 12 if worker.isdigit() else 0) * PORTS_PER_PROCESS
    for _ in range(PORTS_PER_PROCESS):
        with _port_lock:
            port = start + next(_next_port) % PORTS_PER_PROCESS
        if processes.free_port(host, port) == port:
            return port
    raise RuntimeError(f"no free port in {start}-{start + PORTS_PER_PROCESS - 1}")


def service_env(**values: str) -> dict[str, str]:
    """This process's environment without the service's settings, plus ``values``; the checkout
    on ``PYTHONPATH`` so that ``python -m cli.main`` runs this code from any working directory."""
    base = {key: value for key, value in os.environ.items() if not key.startswith(SETTING_PREFIXES)}
    return base | {"PYTHONPATH": os.getcwd(), **values}


class RedisServer:
    """A redis-server of our own on a free port, which a test may stop and start again."""

    def __init__(
        self,
        appendonly: bool = False,
        fsync_always: bool = False,
        launcher: Sequence[str] = (),
        options: Sequence[str] = (),
        start_seconds: float = 10,
    ) -> None:
        """``launcher``: a command the server runs under (valgrind, for the benchmarks that count
        Redis's instructions); ``options``: more redis-server options."""
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed; `make test` installs it")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="smartcar-ingest-redis-"))
        self.appendonly = appendonly
        self.fsync_always = fsync_always
        self.launcher, self.options, self.start_seconds = list(launcher), list(options), start_seconds
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [*self.launcher, "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.dir), "--appendonly", "yes" if self.appendonly else "no", *self.options]
        if self.fsync_always:
            args += ["--appendfsync", "always"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_seconds
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def stop(self, kill: bool = False) -> None:
        """Stop the server under the test: an outage, which only a drill may cause."""
        needs(DRILL, "stops a redis-server under the test")
        self._stop(kill)

    def _stop(self, kill: bool) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=max(10, self.start_seconds))
        self.process = None

    def cleanup(self) -> None:
        self._stop(kill=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def as_role(admin_url: str, settings: Settings, role: Role, connect: bool = False) -> str:
    """The URL of a ``smartcar-<role>`` user with ``role``'s rules (core.redis.acl) and a fresh password,
    made or replaced with the admin at ``admin_url`` after it loaded the functions (a role may not),
    as a deployment with one Redis user per role has it: for the benchmarks and the tests."""
    load_functions(admin_url)
    user, password = _user(role), secrets.token_hex(8)
    with redis.Redis.from_url(admin_url) as admin:
        admin.execute_command(
            "ACL", "SETUSER", user, "reset", "on", f">{password}", *acl_rules(settings, role, connect)
        )
    scheme, rest = admin_url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.rsplit('@', 1)[-1]}"


@contextlib.contextmanager
def role_user(admin_url: str, settings: Settings, role: Role, connect: bool = False) -> Iterator[str]:
    """:func:`as_role`'s URL, its user deleted again on exit: for a test on a Redis other tests share."""
    url = as_role(admin_url, settings, role, connect)
    try:
        yield url
    finally:
        with redis.Redis.from_url(admin_url) as admin:
            admin.execute_command("ACL", "DELUSER", _user(role))


def _user(role: Role) -> str:
    return f"smartcar-{role}"


class LiveServer:
    """A uvicorn server in a background thread, serving an ASGI app over real HTTP."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Temporarily set environment variables."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class WebProcess:
    """``smartcar-ingest web`` in a child process on a free port, with exactly the environment ``env``.

    As a context manager: waits until the web listens, and stops it on exit. ``capture`` collects
    its stdout and stderr (text), in :attr:`stdout` and :attr:`stderr` once it has stopped.
    """

    def __init__(
        self, env: Mapping[str, str], *args: str, cwd: Path | str | None = None, capture: bool = False
    ) -> None:
        self.port = free_port()
        self.stdout = ""
        self.stderr = ""
        self._stopped = False
        output = subprocess.PIPE if capture else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "web", "--host", "127.0.0.1", "--port", str(self.port), *args],
            env=dict(env),
            cwd=cwd,
            stdout=output,
            stderr=output,
            text=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> WebProcess:
        try:
            wait_for_port(self.port, STARTUP_SECONDS, process=self.process, what="the web process")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, then wait for it to exit (killed if it takes more than 30 s)."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()
        try:
            out, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        self.stdout, self.stderr = out or "", err or ""
