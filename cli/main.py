"""The ``smartcar-ingest`` console script: the parser, the operator commands and exit statuses.

Each subcommand builds :class:`~core.config.Settings` once and passes it down; a command that cannot
finish ends with one line on stderr and an exit status that says which kind of trouble it met
(README, "Exit codes").
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cli import processes, redis_admin, store_commands
from cli.arguments import Handler, positive
from core.config import Settings, load_settings
from core.errors import (
    PARK_REASONS,
    ConfigurationError,
    IngestError,
    SmartcarRejected,
    SmartcarUnauthorized,
    TokenRequestFailed,
    TransientError,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # also what argparse exits with on bad arguments
EXIT_UNAVAILABLE = 3
EXIT_REFUSED = 4
EXIT_INTERRUPTED = 130


def exit_status(exc: IngestError) -> int:
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, TransientError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, TokenRequestFailed | SmartcarUnauthorized | SmartcarRejected):
        return EXIT_REFUSED
    return EXIT_FAILED


def _send_test_event(args: argparse.Namespace, settings: Settings) -> int:
    from cli.samples import send_test_event

    return send_test_event(settings, url=args.url, event_type=args.type)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from cli.operations import replay

    return replay(settings, reason=args.reason, limit=args.limit)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from cli.status import status

    return status(settings, as_json=args.json)


def _vehicle_state(args: argparse.Namespace, settings: Settings) -> int:
    from cli.vehicle_state import vehicle_state

    return vehicle_state(settings, args.vehicle_id, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartcar-ingest",
        description="Receive signed Smartcar webhooks, queue them durably, publish enriched events.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    processes.add_commands(sub)

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

    replay = sub.add_parser("replay", help="re-enqueue parked events")
    replay.add_argument("--reason", choices=list(PARK_REASONS), help="only entries parked for this reason")
    replay.add_argument("--limit", type=positive, help="re-enqueue at most this many")
    replay.set_defaults(handler=_replay)

    status = sub.add_parser(
        "status", help="queue depth and oldest age, workers, parked by reason, output stream and consumer lag"
    )
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(handler=_status)

    vehicle_state = sub.add_parser(
        "vehicle-state", help="the latest state of one vehicle, signal by signal, with ages (changes nothing)"
    )
    vehicle_state.add_argument("vehicle_id", metavar="VEHICLE_ID", help="the Smartcar vehicle id")
    vehicle_state.add_argument("--json", action="store_true", help="print the state as JSON")
    vehicle_state.set_defaults(handler=_vehicle_state)

    for module in (store_commands, redis_admin):
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        settings = load_settings()
        return handler(args, settings)
    except IngestError as exc:
        print(f"smartcar-ingest {args.command}: {exc.message}", file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`status | head`): not an error of ours. Point stdout at devnull so
        # the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
