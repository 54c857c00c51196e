"""Running the emulator: blocking in the foreground, or in a background thread for tests.

::

    with running_emulator() as base_url:          # e.g. "http://127.0.0.1:41234"
        settings = Settings(smartcar_api_url=f"{base_url}/v3",
                            smartcar_token_url=f"{base_url}/oauth2/token", ...)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from emulator.app import EmulatorConfig, create_app

DEFAULT_PORT = 8787


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, config: EmulatorConfig | None = None) -> None:
    """Serve the emulator with uvicorn until interrupted (Ctrl-C or SIGTERM). The caller says where it
    serves; uvicorn's lines about its own life would only repeat the web's, so only its warnings show."""
    uvicorn.run(
        create_app(config), host=host, port=port, lifespan="off", ws="none", access_log=False, log_level="warning"
    )


@contextmanager
def running_emulator(config: EmulatorConfig | None = None, startup_timeout: float = 10.0) -> Iterator[str]:
    """Run a fresh emulator on a free 127.0.0.1 port in a thread; yield its base URL; stop it on exit.

    Raises :class:`RuntimeError` if the server fails or does not start within ``startup_timeout``.
    """
    # Binding here, before the thread starts, hands uvicorn a port no other process can take
    # between "find a free port" and "listen on it".
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            lifespan="off",
            ws="none",
            access_log=False,
            log_level="warning",
            log_config=None,  # leave the host process's logging configuration alone
            timeout_graceful_shutdown=2,
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"emulator-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the emulator server stopped during startup")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the emulator did not start within {startup_timeout} s")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=startup_timeout)
        sock.close()
