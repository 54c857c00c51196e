"""The user store's commands: ``db`` (migrations), ``users link``, ``backfill`` and ``connect-url``."""

from __future__ import annotations

import argparse
import sys

from cli.arguments import Subcommands, positive
from core.config import Settings
from core.errors import ConfigurationError


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


def add_commands(sub: Subcommands) -> None:
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
    link.add_argument("--user-id", type=positive, required=True, help="internal user id (users.id)")
    link.add_argument("--smartcar-user-id", required=True, help="Smartcar user id (the Connect user_id)")
    link.set_defaults(handler=_users_link)
    backfill = sub.add_parser("backfill", help="fill smartcar_user_id / smartcar_vehicle_id from GET /v3/connections")
    backfill.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    backfill.add_argument("--smartcar-user-id", help="only the connections of this Smartcar user")
    backfill.set_defaults(handler=_backfill)
    connect_url = sub.add_parser(
        "connect-url", help="a single-use Smartcar Connect URL whose signed state names the internal user"
    )
    connect_url.add_argument("--user-id", type=positive, required=True, help="internal user id (users.id)")
    connect_url.add_argument(
        "--mode", choices=["live", "simulated", "test"], help="Connect's mode (default: CONNECT_MODE, else Smartcar's)"
    )
    connect_url.set_defaults(handler=_connect_url)
