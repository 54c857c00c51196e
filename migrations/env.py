"""Alembic environment: how the migrations in ``versions/`` reach a database.

``core.store.db`` builds the Alembic configuration in code and hands over an open connection (inside a
transaction it owns) in ``config.attributes["connection"]``. Run from the ``alembic`` command line
instead (``uv run alembic revision --autogenerate -m ...`` with the repository's ``alembic.ini``),
this file connects to ``sqlalchemy.url`` if set, else to ``DATABASE_URL`` from the settings.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from core.config import load_settings
from core.store.db import make_engine
from core.store.users import Base

config = context.config
target_metadata = Base.metadata


def _configure(**options: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        # Revisions must run on SQLite, which cannot ALTER most things in place; batch operations
        # copy the table there and are plain ALTERs on PostgreSQL, so autogenerate always emits them.
        render_as_batch=True,
        compare_type=True,
        **options,  # type: ignore[arg-type]
    )


def _database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or load_settings().database_url


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run on the connection core.store.db handed over, or on a fresh one from the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(_database_url(), pooled=False)
    try:
        with engine.connect() as fresh:
            _run_on(fresh)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
