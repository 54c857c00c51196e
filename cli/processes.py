"""The commands that run the service's processes: ``web``, ``worker``, ``dev`` and ``emulator``."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from cli.arguments import Subcommands, port_number, positive
from core.config import Settings
from core.errors import ConfigurationError


def _web(args: argparse.Namespace, settings: Settings) -> int:
    from core.logs import configure_logging
    from service.server import serve

    settings.require_management_token()
    configure_logging(settings.log_level, settings.log_format)
    metrics_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each uvicorn process counts for itself; a shared directory lets /metrics sum them all.
        metrics_dir = tempfile.mkdtemp(prefix="smartcar-ingest-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        serve(settings, args.host, args.port, args.workers, args.max_connections, args.keep_alive_timeout)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from cli.operations import redis_errors
    from core.logs import configure_logging
    from workers.worker import run_worker

    settings.require_client_credentials()
    configure_logging(settings.log_level, settings.log_format)
    # The worker waits out Redis trouble; this only ends a start whose Redis never answered.
    with redis_errors("reached", os_errors=False):
        run_worker(settings, burst=args.burst, concurrency=args.concurrency)
    return 0


def _emulator_absent(exc: ModuleNotFoundError, hint: str = "") -> ConfigurationError:
    """The one-line refusal when the emulator package is missing (it is left out of the wheel)."""
    if exc.name is None or not (exc.name == "emulator" or exc.name.startswith("emulator.")):
        raise exc
    return ConfigurationError(
        "the Smartcar emulator is not installed: it ships with the source checkout only, for tests and "
        f"`make run`; run this from a clone of the repository{hint}."
    )


def _emulator(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from emulator.app import EmulatorConfig
        from emulator.server import serve
    except ModuleNotFoundError as exc:
        raise _emulator_absent(exc) from None

    config = EmulatorConfig(latency_seconds=args.latency)
    print(f"Smartcar emulator on http://{args.host}:{args.port}")
    print(f"  SMARTCAR_API_URL=http://{args.host}:{args.port}/v3")
    print(f"  SMARTCAR_TOKEN_URL=http://{args.host}:{args.port}/oauth2/token")
    print(f"  SMARTCAR_CLIENT_ID={config.client_id} SMARTCAR_CLIENT_SECRET={config.client_secret}")
    serve(host=args.host, port=args.port, config=config)
    return 0


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from cli.dev import run_dev

    try:
        return run_dev(settings, port=args.port)
    except ModuleNotFoundError as exc:
        hint = ", or set SMARTCAR_CLIENT_ID and SMARTCAR_CLIENT_SECRET to use Smartcar itself"
        raise _emulator_absent(exc, hint) from None


def add_commands(sub: Subcommands) -> None:
    web = sub.add_parser("web", help="serve the webhook endpoint with uvicorn")
    web.add_argument("--host", default="0.0.0.0", help="interface to bind (default 0.0.0.0)")
    web.add_argument("--port", type=port_number, default=8000, help="port to bind (default 8000)")
    web.add_argument("--workers", type=positive, default=1, help="uvicorn worker processes (default 1)")
    web.add_argument(
        "--max-connections",
        type=positive,
        default=1000,
        help="open connections held at most per process; past it, 503 (default 1000)",
    )
    web.add_argument(
        "--keep-alive-timeout",
        type=positive,
        default=15,
        help="seconds an idle kept-alive connection is held (default 15)",
    )
    web.set_defaults(handler=_web)
    worker = sub.add_parser("worker", help="run an RQ worker on the ingest queue")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument(
        "--concurrency", type=positive, default=256, help="jobs in flight in this process (default 256)"
    )
    worker.set_defaults(handler=_worker)
    dev = sub.add_parser("dev", help="run the whole pipeline locally (what `make run` runs)")
    dev.add_argument("--port", type=port_number, default=8000, help="web port (default 8000)")
    dev.set_defaults(handler=_dev)
    emulator = sub.add_parser("emulator", help="run the Smartcar API emulator alone")
    emulator.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    emulator.add_argument("--port", type=port_number, default=8787, help="port to bind (default 8787)")
    emulator.add_argument("--latency", type=float, default=0.0, help="seconds added to every API call")
    emulator.set_defaults(handler=_emulator)
