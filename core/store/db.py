"""Database plumbing for the user store: the engine, error translation and Alembic migrations.
Why: docs/architecture.md, "The user store"; adopting tables made outside Alembic: docs/migration.md."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import URL, Connection, Engine, create_engine, inspect, make_url, text
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import NullPool

import migrations
from core.errors import ConfigurationError, Unreachable

# Any constant shared by every migrating process; "smartcar" as bytes, recognisable in pg_locks.
_MIGRATION_LOCK_ID = 0x736D61727463617


def safe_url(url: URL) -> str:
    """The URL as text with its password replaced by ``***``: the only form that goes in messages."""
    return url.render_as_string(hide_password=True)


def make_engine(database_url: str, *, pooled: bool = True) -> Engine:
    """Not yet connected; ``pooled=False`` for one-shot work such as migrations."""
    try:
        url = make_url(database_url)
    except (ArgumentError, ValueError):
        # The raw string may carry a password, so it stays out of the message.
        raise ConfigurationError(
            "DATABASE_URL is not a database URL: use e.g. sqlite:///./smartcar-ingest.db or "
            "postgresql+psycopg://user:password@host:5432/dbname."
        ) from None
    if url.drivername in ("postgres", "postgresql"):  # as hosted PostgreSQL often hands them out
        url = url.set(drivername="postgresql+psycopg")
    backend = url.get_backend_name()
    connect_args: dict[str, Any] = {"check_same_thread": False} if backend == "sqlite" else {}
    if backend == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 5  # seconds before a server counts as unreachable
    # Pool sizes stay at SQLAlchemy's defaults; the ping turns a restarted PostgreSQL into a reconnect.
    options = {"pool_pre_ping": backend == "postgresql"} if pooled else {"poolclass": NullPool}
    try:
        return create_engine(url, connect_args=connect_args, **options)
    except (NoSuchModuleError, ModuleNotFoundError, ArgumentError, TypeError) as exc:  # e.g. no installed driver
        raise ConfigurationError(
            f"DATABASE_URL {safe_url(url)} is not usable ({_driver_reason(exc, url)}): "
            "use sqlite:/// or postgresql+psycopg:// URLs."
        ) from None


def _driver_reason(exc: BaseException, url: URL) -> str:
    """The first line of a driver error, with the URL's password scrubbed, for one-line messages."""
    original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(original).strip().splitlines()
    reason = lines[0].rstrip(".") if lines else type(original).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return reason


def _missing(exc: SQLAlchemyError, sqlstate: str, sqlite_says: str) -> bool:
    if isinstance(exc, ProgrammingError):
        return getattr(exc.orig, "sqlstate", None) == sqlstate
    return isinstance(exc, OperationalError) and sqlite_says in str(exc.orig)


@contextmanager
def translate_errors(url: URL) -> Iterator[None]:
    """A missing table or column is a :class:`ConfigurationError`, a connection failure :class:`Unreachable`."""
    try:
        yield
    except (OperationalError, ProgrammingError, InterfaceError, PoolTimeoutError) as exc:
        if _missing(exc, "42P01", "no such table"):
            raise ConfigurationError(
                f"the user store at {safe_url(url)} has no tables: run `smartcar-ingest db upgrade`."
            ) from None
        if _missing(exc, "42703", "no such column"):
            # The guide's "before" shape: the bridge revision, as head would drop the per-vehicle tokens.
            raise ConfigurationError(
                f"the user store at {safe_url(url)} lacks the Smartcar id columns: run "
                "`smartcar-ingest db upgrade v2_v3_bridge` (see docs/migration.md)."
            ) from None
        if isinstance(exc, ProgrammingError):
            raise
        raise Unreachable(f"the database at {safe_url(url)} did not answer: {_driver_reason(exc, url)}.") from None


@contextmanager
def _migrating(database_url: str, action: str) -> Iterator[tuple[Connection, Config]]:
    """One connection in one transaction and Alembic's configuration; failures are one-line errors."""
    engine = make_engine(database_url, pooled=False)
    url = engine.url
    try:
        try:
            opened = engine.connect()
        except (OperationalError, InterfaceError) as exc:
            if url.get_backend_name() == "sqlite":
                raise  # a file that cannot be opened is a setting to fix, reported below
            raise Unreachable(
                f"cannot {action}: the database at {safe_url(url)} is unreachable "
                f"({_driver_reason(exc, url)}); check DATABASE_URL and that the server is running."
            ) from None
        with opened as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                # Pods migrating at once take turns; the later ones find the work done.
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            config = Config()
            # The scripts as an importable package (a wheel works); ConfigParser needs % doubled.
            config.set_main_option("script_location", migrations.__path__[0].replace("%", "%%"))
            config.attributes["connection"] = connection  # env.py migrates on it instead of its own
            yield connection, config
    except CommandError as exc:
        message = str(exc).rstrip(".")
        if "Can't locate revision" in message or "not a valid" in message or "No such revision" in message:
            raise ConfigurationError(
                f"cannot {action}: {message}; use `head`, `base` or a revision id from migrations/versions."
            ) from None
        raise ConfigurationError(f"cannot {action} on {safe_url(url)}: {message}.") from None
    except DBAPIError as exc:
        hint = "; check DATABASE_URL" if isinstance(exc, OperationalError | InterfaceError) else ""
        raise ConfigurationError(f"cannot {action} on {safe_url(url)}: {_driver_reason(exc, url)}{hint}.") from None
    finally:
        engine.dispose()


def upgrade(database_url: str, revision: str = "head", *, drop_tokens: bool = False) -> str | None:
    """All or nothing on PostgreSQL; unversioned tables are first stamped with the revision they match (returned)."""
    with _migrating(database_url, f"upgrade the database to {revision}") as (connection, config):
        adopted, at = None, MigrationContext.configure(connection).get_current_revision()
        if at is None and (adopted := detect_revision(connection)) is not None:
            command.stamp(config, adopted)
            at = adopted
        if at is not None and not drop_tokens:
            _refuse_to_drop_tokens(connection, config, at, revision)
        command.upgrade(config, revision)
    return adopted


def stamp(database_url: str, revision: str) -> None:
    """Record ``revision`` without running anything (``base`` forgets the record)."""
    with _migrating(database_url, f"stamp the database as {revision}") as (_, config):
        command.stamp(config, revision)


def downgrade(database_url: str, revision: str) -> None:
    """``base`` removes every table the migrations made."""
    with _migrating(database_url, f"downgrade the database to {revision}") as (_, config):
        command.downgrade(config, revision)


def current(database_url: str) -> str | None:
    """``None`` for a database that was never migrated."""
    with _migrating(database_url, "read the database revision") as (connection, _):
        return MigrationContext.configure(connection).get_current_revision()


#: Columns every adoptable shape has, and the columns that tell the shapes apart.
_BASE_COLUMNS = {"users": {"id", "email", "name", "created_at"}, "vehicles": {"id", "user_id", "vin"}}
_TOKEN_COLUMNS = {"vehicle_access_token", "token_created_at"}


def detect_revision(connection: Connection) -> str | None:
    """The revision (shape: docs/migration.md) an unversioned database's tables match, ``None`` without tables."""
    inspector = inspect(connection)
    present = {"users", "vehicles"} & set(inspector.get_table_names())
    if not present:
        return None
    columns = {table: {c["name"] for c in inspector.get_columns(table)} for table in present}
    found: str | None = None
    if present == {"users", "vehicles"} and all(_BASE_COLUMNS[t] <= columns[t] for t in present):
        has_ids = ("smartcar_user_id" in columns["users"], "smartcar_vehicle_id" in columns["vehicles"])
        has_tokens = tuple(name in columns["vehicles"] for name in _TOKEN_COLUMNS)
        unique: list[list[str | None]] = [list(u["column_names"]) for u in inspector.get_unique_constraints("users")]
        unique += [list(i["column_names"]) for i in inspector.get_indexes("users") if i.get("unique")]
        if has_ids == (False, False) and all(has_tokens):
            found = "v2_schema"
        elif has_ids == (True, True) and ["smartcar_user_id"] in unique:
            found = "v2_v3_bridge" if all(has_tokens) else "v3_schema" if not any(has_tokens) else None
    if found is None:
        shape = "; ".join(f"{table}({', '.join(sorted(columns[table]))})" for table in sorted(present))
        raise ConfigurationError(
            f"the database has tables but no Alembic version, and they match no known schema ({shape}): "
            "bring them to the v2_schema, v2_v3_bridge or v3_schema shape by hand, then run "
            "`smartcar-ingest db stamp REV` (see docs/migration.md)."
        )
    return found


def _refuse_to_drop_tokens(connection: Connection, config: Config, current: str, revision: str) -> None:
    try:
        path = {r.revision for r in ScriptDirectory.from_config(config).iterate_revisions(revision, current)}
    except RevisionError:
        return  # an unknown target: command.upgrade reports it in its own words
    if "v3_schema" not in path:  # v3_schema drops the tokens (phase 3)
        return
    count = connection.execute(
        text("SELECT count(*) FROM vehicles WHERE vehicle_access_token IS NOT NULL")
    ).scalar_one()
    if count:
        raise ConfigurationError(
            f"upgrading to {revision} drops {count} stored per-vehicle access token(s), which no downgrade "
            "brings back: stay at phase 2 with `db upgrade v2_v3_bridge`, or once nothing uses the tokens, "
            "rerun with `db upgrade --drop-tokens` (see docs/migration.md)."
        )
