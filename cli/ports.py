"""Ports on this machine: a free one, whether one is free, and waiting for a process to listen
(for ``dev``, and the tests and benchmarks that start servers the same way)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from typing import Any

from core.errors import ConfigurationError

LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST) -> int:
    """A port nothing listens on at ``host`` right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def bindable(host: str, port: int) -> bool:
    """True when a server could listen on ``host:port`` now."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(
    port: int,
    timeout: float = 10.0,
    *,
    process: subprocess.Popen[Any] | None = None,
    what: str = "the process",
    host: str = LOCALHOST,
) -> None:
    """Return once something accepts connections on ``host:port``.

    Raises :class:`ConfigurationError` (one line, as the CLI reports it) after ``timeout`` seconds,
    or as soon as ``process``, the one expected to listen, has exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ConfigurationError(f"{what} exited during startup (status {process.returncode}).")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise ConfigurationError(f"{what} did not start listening on port {port} within {timeout:.0f} s.")
