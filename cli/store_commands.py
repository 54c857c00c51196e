"""The user store's commands: ``db`` (migrations), ``users link`` and ``connect-url`` (``backfill``: cli/backfill.py)."""

from __future__ import annotations

import datetime as dt
import sys

from core.config import Settings
from core.errors import ConfigurationError
from core.store import db
from core.store.users import UserStore


def migrate(settings: Settings, action: str, revision: str | None, drop_tokens: bool) -> None:
    examples = {
        "downgrade": "`db downgrade base`",
        "stamp": '`db stamp v2_schema` for a database in the guide\'s "before" shape',
    }
    if action == "upgrade":
        adopted = db.upgrade(settings.database_url, revision or "head", drop_tokens=drop_tokens)
        if adopted is not None:
            print(f"found tables without an Alembic version in the {adopted} shape: stamped them {adopted}")
    elif not revision:
        raise ConfigurationError(f"db {action} needs a revision, e.g. {examples[action]}.")
    elif action == "downgrade":
        db.downgrade(settings.database_url, revision)
    else:
        db.stamp(settings.database_url, revision)
    print(f"database at revision {db.current(settings.database_url) or 'base (empty)'}")


def users_link(settings: Settings, user_id: int, smartcar_user_id: str) -> None:
    store = UserStore(settings.database_url)
    try:
        stored = store.link(user_id, smartcar_user_id)
    finally:
        store.dispose()
    print(f"user {user_id} {'linked' if stored else 'already linked'} to Smartcar user {smartcar_user_id.strip()}")
    if stored:
        print("Events parked as unknown_user can now be delivered: smartcar-ingest replay --reason unknown_user")


def connect_url(settings: Settings, user_id: int, mode: str | None) -> None:
    from service.connect import connect_link  # the web's routes module: imported by this command alone

    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.connect_state_ttl_seconds)
    url, note = connect_link(settings, user_id, mode=mode)
    if note:
        print(f"note: {note}", file=sys.stderr)
    # No browser asked for this URL: whoever holds it may link, once, a Smartcar account connecting after now.
    print(
        f"valid until {expires.isoformat(timespec='seconds')} (CONNECT_STATE_TTL_SECONDS), usable once; "
        "not tied to a browser, so give it only to that user",
        file=sys.stderr,
    )
    print(url)
