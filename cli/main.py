"""The ``smartcar-ingest`` console script: the parser, and the exit statuses (README, "Exit codes").
Each command is a function ``(settings, **options)``, imported when it runs, that returns None or its exit status."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from core.config import load_settings
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


def positive(text: str) -> int:
    value = int(text)  # argparse turns a ValueError into "invalid positive value: 'TEXT'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    value = positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number up to 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartcar-ingest",
        description="Receive signed Smartcar webhooks, queue them durably, publish enriched events.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: str, help: str, group: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help)  # run: "module:function"
        sub.set_defaults(run=run)
        return sub

    web = command("web", "cli.processes:web", "serve the webhook endpoint with uvicorn")
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
    worker = command("worker", "cli.processes:worker", "run an RQ worker on the ingest queue")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument(
        "--concurrency", type=positive, default=256, help="jobs in flight in this process (default 256)"
    )
    dev = command("dev", "cli.processes:run_dev", "run the whole pipeline locally (what `make run` runs)")
    dev.add_argument("--port", type=port_number, default=8000, help="web port (default 8000)")
    emulator = command("emulator", "cli.processes:emulator", "run the Smartcar API emulator alone")
    emulator.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    emulator.add_argument("--port", type=port_number, default=8787, help="port to bind (default 8787)")
    emulator.add_argument("--latency", type=float, default=0.0, help="seconds added to every API call")

    test_event = command(
        "send-test-event", "cli.samples:send_test_event", "sign a sample event with the management token and post it"
    )
    test_event.add_argument(
        "--url", default="http://127.0.0.1:8000/webhooks/smartcar", help="the webhook endpoint to post to"
    )
    test_event.add_argument(
        "--type",
        dest="event_type",
        choices=["VEHICLE_STATE", "VEHICLE_ERROR", "VERIFY"],
        default="VEHICLE_STATE",
        help="which event to send (default VEHICLE_STATE)",
    )
    replay = command("replay", "cli.operations:replay", "re-enqueue parked events")
    replay.add_argument("--reason", choices=list(PARK_REASONS), help="only entries parked for this reason")
    replay.add_argument("--limit", type=positive, help="re-enqueue at most this many")
    status = command(
        "status",
        "cli.status:status",
        "queue depth and oldest age, workers, parked by reason, output stream and consumer lag",
    )
    status.add_argument("--json", dest="as_json", action="store_true", help="print the report as JSON")
    vehicle_state = command(
        "vehicle-state",
        "cli.vehicle_state:vehicle_state",
        "the latest state of one vehicle, signal by signal, with ages (changes nothing)",
    )
    vehicle_state.add_argument("vehicle_id", metavar="VEHICLE_ID", help="the Smartcar vehicle id")
    vehicle_state.add_argument("--json", dest="as_json", action="store_true", help="print the state as JSON")

    database = command("db", "cli.store_commands:migrate", "schema migrations (Alembic)")
    database.add_argument(
        "action", choices=["upgrade", "downgrade", "stamp"], help="direction, or stamp to adopt an existing database"
    )
    database.add_argument("revision", nargs="?", help="target revision (upgrade: default head)")
    database.add_argument(
        "--drop-tokens",
        action="store_true",
        help="let an upgrade to v3_schema drop stored per-vehicle access tokens (no downgrade restores them)",
    )
    users = commands.add_parser("users", help="manage the user store").add_subparsers(required=True, metavar="ACTION")
    link = command("link", "cli.store_commands:users_link", "store a user's Smartcar user id", users)
    link.add_argument("--user-id", type=positive, required=True, help="internal user id (users.id)")
    link.add_argument("--smartcar-user-id", required=True, help="Smartcar user id (the Connect user_id)")
    backfill = command(
        "backfill", "cli.backfill:run_backfill", "fill smartcar_user_id / smartcar_vehicle_id from GET /v3/connections"
    )
    backfill.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    backfill.add_argument("--smartcar-user-id", help="only the connections of this Smartcar user")
    connect_url = command(
        "connect-url",
        "cli.store_commands:connect_url",
        "a single-use Smartcar Connect URL whose signed state names the internal user",
    )
    connect_url.add_argument("--user-id", type=positive, required=True, help="internal user id (users.id)")
    connect_url.add_argument(
        "--mode", choices=["live", "simulated", "test"], help="Connect's mode (default: CONNECT_MODE, else Smartcar's)"
    )

    command(
        "redis-setup",
        "cli.redis_admin:redis_setup",
        "load the service's Redis functions and check its persistence settings (an admin REDIS_URL; run on every"
        " install and upgrade)",
    )
    acl = command(
        "redis-acl",
        "cli.redis_admin:redis_acl",
        "print one Redis aclfile line for a role's user (see docs/security.md)",
    )
    acl.add_argument("role", choices=["web", "worker"])
    acl.add_argument("--user", help="the Redis user name (default smartcar-ROLE)")
    acl.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the user's password (stored hashed)"
    )
    acl.add_argument("--connect", action="store_true", help="web only: also the keys the Connect callback needs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = vars(build_parser().parse_args(argv))
    command = options.pop("command")
    module, _, name = options.pop("run").partition(":")
    try:
        return int(getattr(importlib.import_module(module), name)(load_settings(), **options) or EXIT_OK)
    except ModuleNotFoundError as exc:  # the emulator is left out of the wheel
        if (exc.name or "").partition(".")[0] != "emulator":
            raise
        hint = ", or set SMARTCAR_CLIENT_ID and SMARTCAR_CLIENT_SECRET to use Smartcar itself"
        error: IngestError = ConfigurationError(
            "the Smartcar emulator is not installed: it ships with the source checkout only, for tests and "
            f"`make run`; run this from a clone of the repository{hint if command == 'dev' else ''}."
        )
    except IngestError as exc:
        error = exc
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`status | head`); devnull lets the interpreter's final flush pass.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    print(f"smartcar-ingest {command}: {error.message}", file=sys.stderr)
    return exit_status(error)


if __name__ == "__main__":
    sys.exit(main())
