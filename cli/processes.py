"""The commands that run the service's processes: ``web``, ``worker`` and ``emulator`` (``dev``: cli/dev.py)."""

from __future__ import annotations

import os
import shutil
import tempfile

from core.config import Settings


def web(settings: Settings, host: str, port: int, workers: int, max_connections: int, keep_alive_timeout: int) -> int:
    from core.logs import configure_logging
    from service.server import ServeOptions, serve

    settings.require_management_token()
    configure_logging(settings.log_level, settings.log_format)
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each uvicorn process counts for itself; a shared directory lets /metrics sum them all.
        metrics_dir = tempfile.mkdtemp(prefix="smartcar-ingest-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        options = ServeOptions(
            host=host,
            port=port,
            workers=workers,
            max_connections=max_connections,
            keep_alive_seconds=keep_alive_timeout,
        )
        serve(settings, options)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def worker(settings: Settings, burst: bool, concurrency: int) -> int:
    from cli.operations import redis_errors
    from core.logs import configure_logging
    from workers.process import run_worker

    settings.require_client_credentials()
    configure_logging(settings.log_level, settings.log_format)
    # The worker waits out Redis trouble; this only ends a start whose Redis never answered.
    with redis_errors("reached", os_errors=False):
        run_worker(settings, burst=burst, concurrency=concurrency)
    return 0


def emulator(settings: Settings, host: str, port: int, latency: float) -> int:
    from emulator.app import EmulatorConfig
    from emulator.server import serve

    config = EmulatorConfig(latency_seconds=latency)
    print(f"Smartcar emulator on http://{host}:{port}")
    print(f"  SMARTCAR_API_URL=http://{host}:{port}/v3")
    print(f"  SMARTCAR_TOKEN_URL=http://{host}:{port}/oauth2/token")
    print(f"  SMARTCAR_CLIENT_ID={config.client_id} SMARTCAR_CLIENT_SECRET={config.client_secret}")
    serve(host=host, port=port, config=config)
    return 0
