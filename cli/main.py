"""The ``smartcar-ingest`` console script.

Each subcommand builds :class:`~core.config.Settings` once and passes it down. A command that
cannot finish ends with one actionable line on stderr; its exit status says which kind of trouble
it met (README, "Exit codes"), so scripts and orchestrators can tell "fix the settings" from
"try again later":

====  =====================  ==============================================================
code  name                   when
====  =====================  ==============================================================
0     ``EXIT_OK``            the command did what it was asked
1     ``EXIT_FAILED``        it ran but failed or found problems (a refused test event,
                             backfill connections left undone, a user not found, a conflict)
2     ``EXIT_USAGE``         bad settings or arguments (:class:`ConfigurationError`, argparse)
3     ``EXIT_UNAVAILABLE``   a dependency did not answer: Redis, the database, Smartcar, the
                             webhook endpoint (any :class:`TransientError`); retry later
4     ``EXIT_REFUSED``       Smartcar refused the application's credentials or the request
130   ``EXIT_INTERRUPTED``   stopped with Ctrl-C
====  =====================  ==============================================================
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence

from cli.redis_admin import add_commands
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

Handler = Callable[[argparse.Namespace, Settings], int]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # also what argparse exits with on bad arguments
EXIT_UNAVAILABLE = 3
EXIT_REFUSED = 4
EXIT_INTERRUPTED = 130


def exit_status(exc: IngestError) -> int:
    """The exit status a command ends with when ``exc`` stops it."""
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, TransientError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, TokenRequestFailed | SmartcarUnauthorized | SmartcarRejected):
        return EXIT_REFUSED
    return EXIT_FAILED


def _web(args: argparse.Namespace, settings: Settings) -> int:
    from core.logs import configure_logging

    settings.require_management_token(dev=settings.dev_mode)
    configure_logging(settings.log_level, settings.log_format)
    metrics_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each uvicorn process counts for itself; a shared directory lets /metrics sum them all.
        metrics_dir = tempfile.mkdtemp(prefix="smartcar-ingest-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _serve(args, settings)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    from service.server import ServeOptions, serve

    options = ServeOptions(
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_connections=args.max_connections,
        keep_alive_seconds=args.keep_alive_timeout,
    )
    serve(settings, options)


def _send_test_event(args: argparse.Namespace, settings: Settings) -> int:
    from cli.testevent import send_test_event

    return send_test_event(settings, url=args.url, event_type=args.type)


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


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from core.store import db

    if args.action == "upgrade":
        adopted = db.upgrade(settings.database_url, args.revision or "head", drop_tokens=args.drop_tokens)
        if adopted is not None:
            print(f"found tables without an Alembic version in the {adopted} shape: stamped them {adopted}")
    elif args.action == "downgrade":
        if not args.revision:
            raise ConfigurationError("db downgrade needs a revision, e.g. `db downgrade base`.")
        db.downgrade(settings.database_url, args.revision)
    elif args.action == "stamp":
        if not args.revision:
            raise ConfigurationError(
                'db stamp needs a revision, e.g. `db stamp v2_schema` for a database in the guide\'s "before" shape.'
            )
        db.stamp(settings.database_url, args.revision)
    print(f"database at revision {db.current(settings.database_url) or 'base (empty)'}")
    return 0


def _users_link(args: argparse.Namespace, settings: Settings) -> int:
    from core.store.users import UserStore

    store = UserStore(settings.database_url)
    try:
        result = store.link(args.user_id, args.smartcar_user_id)
    finally:
        store.dispose()
    print(result.message)
    if not result.already_linked:
        print("Events parked as unknown_user can now be delivered: smartcar-ingest replay --reason unknown_user")
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from cli.operations import replay

    return replay(settings, reason=args.reason, limit=args.limit)


def _backfill(args: argparse.Namespace, settings: Settings) -> int:
    from cli.backfill import run_backfill

    return run_backfill(settings, dry_run=args.dry_run, smartcar_user_id=args.smartcar_user_id)


def _connect_url(args: argparse.Namespace, settings: Settings) -> int:
    import datetime as dt

    from service.connect_state import connect_link

    link = connect_link(settings, args.user_id, mode=args.mode)
    if link.note:
        print(f"note: {link.note}", file=sys.stderr)
    expires = dt.datetime.fromtimestamp(link.expires_at, dt.UTC).isoformat(timespec="seconds")
    # No browser asked for this URL, so its state is bound to none: whoever holds the URL can
    # use it, once, and only to link a Smartcar account that connects after this moment.
    print(
        f"valid until {expires} (CONNECT_STATE_TTL_SECONDS), usable once; not tied to a browser, "
        "so give it only to that user",
        file=sys.stderr,
    )
    print(link.url)
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from cli.status import status

    return status(settings, as_json=args.json)


def _vehicle_state(args: argparse.Namespace, settings: Settings) -> int:
    from cli.vehicle_state import vehicle_state

    return vehicle_state(settings, args.vehicle_id, as_json=args.json)


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from cli.dev import run_dev

    try:
        return run_dev(settings, port=args.port)
    except ModuleNotFoundError as exc:
        hint = ", or set SMARTCAR_CLIENT_ID and SMARTCAR_CLIENT_SECRET to use Smartcar itself"
        raise _emulator_absent(exc, hint) from None


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
    web.add_argument(
        "--max-connections",
        type=_positive,
        default=1000,
        help="open connections held at most per process; past it, 503 (default 1000)",
    )
    web.add_argument(
        "--keep-alive-timeout",
        type=_positive,
        default=15,
        help="seconds an idle kept-alive connection is held (default 15)",
    )
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

    worker = sub.add_parser("worker", help="run an RQ worker on the ingest queue")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument(
        "--concurrency", type=_positive, default=256, help="jobs in flight in this process (default 256)"
    )
    worker.set_defaults(handler=_worker)

    dev = sub.add_parser("dev", help="run the whole pipeline locally (what `make run` runs)")
    dev.add_argument("--port", type=_port, default=8000, help="web port (default 8000)")
    dev.set_defaults(handler=_dev)

    emulator = sub.add_parser("emulator", help="run the Smartcar API emulator alone")
    emulator.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    emulator.add_argument("--port", type=_port, default=8787, help="port to bind (default 8787)")
    emulator.add_argument("--latency", type=float, default=0.0, help="seconds added to every API call")
    emulator.set_defaults(handler=_emulator)

    database = sub.add_parser("db", help="schema migrations (Alembic)")
    database.add_argument(
        "action", choices=["upgrade", "downgrade", "stamp"], help="direction, or stamp to adopt an existing database"
    )
    database.add_argument("revision", nargs="?", help="target revision (upgrade: default head)")
    database.add_argument(
        "--drop-tokens",
        action="store_true",
        help="let an upgrade to v3_schema drop stored per-vehicle access tokens (no downgrade restores them)",
    )
    database.set_defaults(handler=_db)

    users = sub.add_parser("users", help="manage the user store")
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    link = users_sub.add_parser("link", help="store a user's Smartcar user id")
    link.add_argument("--user-id", type=_positive, required=True, help="internal user id (users.id)")
    link.add_argument("--smartcar-user-id", required=True, help="Smartcar user id (the Connect user_id)")
    link.set_defaults(handler=_users_link)

    replay = sub.add_parser("replay", help="re-enqueue parked events")
    replay.add_argument("--reason", choices=list(PARK_REASONS), help="only entries parked for this reason")
    replay.add_argument("--limit", type=_positive, help="re-enqueue at most this many")
    replay.set_defaults(handler=_replay)

    backfill = sub.add_parser("backfill", help="fill smartcar_user_id / smartcar_vehicle_id from GET /v3/connections")
    backfill.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    backfill.add_argument("--smartcar-user-id", help="only the connections of this Smartcar user")
    backfill.set_defaults(handler=_backfill)

    connect_url = sub.add_parser(
        "connect-url", help="a single-use Smartcar Connect URL whose signed state names the internal user"
    )
    connect_url.add_argument("--user-id", type=_positive, required=True, help="internal user id (users.id)")
    connect_url.add_argument(
        "--mode", choices=["live", "simulated", "test"], help="Connect's mode (default: CONNECT_MODE, else Smartcar's)"
    )
    connect_url.set_defaults(handler=_connect_url)

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

    add_commands(sub)
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
