"""The ``smartcar-ingest`` console script.

Each subcommand builds :class:`~core.config.Settings` once and passes it down. Bad settings or
bad input end the command with one actionable line on stderr and exit status 2; a failed
operation (a refused test event, say) exits 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from core.config import Settings, load_settings
from core.errors import ConfigurationError, IngestError

Handler = Callable[[argparse.Namespace, Settings], int]


def _web(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from core.logs import configure_logging

    settings.require_management_token()
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        access_log=False,
        # Smartcar waits 15 s at most; a sender slower than this is not Smartcar.
        timeout_keep_alive=15,
        server_header=False,
    )
    return 0


def _send_test_event(args: argparse.Namespace, settings: Settings) -> int:
    from service.testevent import send_test_event

    return send_test_event(settings, url=args.url, event_type=args.type)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartcar-ingest",
        description="Receive signed Smartcar webhooks, queue them durably, publish enriched events.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    web = sub.add_parser("web", help="serve the webhook endpoint with uvicorn")
    web.add_argument("--host", default="0.0.0.0", help="interface to bind (default 0.0.0.0)")
    web.add_argument("--port", type=_port, default=8000, help="port to bind (default 8000)")
    web.add_argument("--workers", type=_positive, default=1, help="uvicorn worker processes (default 1)")
    web.set_defaults(handler=_web)

    test_event = sub.add_parser("send-test-event", help="sign a sample event with the management token and post it")
    test_event.add_argument(
        "--url", default="http://127.0.0.1:8000/webhooks/smartcar", help="the webhook endpoint to post to"
    )
    test_event.add_argument(
        "--type",
        choices=["VEHICLE_STATE", "VEHICLE_ERROR", "VERIFY"],
        default="VEHICLE_STATE",
        help="which event to send (default VEHICLE_STATE)",
    )
    test_event.set_defaults(handler=_send_test_event)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number up to 65535, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        settings = load_settings()
        return handler(args, settings)
    except ConfigurationError as exc:
        print(f"smartcar-ingest {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except IngestError as exc:
        print(f"smartcar-ingest {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
