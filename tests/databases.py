"""Real databases for tests: a SQLite file, or a PostgreSQL schema that only one test sees.

``TEST_POSTGRES_URL`` (default: the local server's ``test`` database) names the server; when it
does not answer, PostgreSQL cases are skipped with the reason. Rows are read and written with raw
SQL here, so tests can build the guide's "before" database the way an application would have.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateSchema, DropSchema

from core.store import db

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


def postgres_or_skip() -> str:
    engine = create_engine(POSTGRES_URL, poolclass=NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        pytest.skip(
            f"PostgreSQL at {db.safe_url(make_url(POSTGRES_URL))} is unreachable ({exc.orig}); set TEST_POSTGRES_URL"
        )
    finally:
        engine.dispose()
    return POSTGRES_URL


@contextmanager
def empty_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on ``backend``, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'users.db'}"
        return
    admin_url = postgres_or_skip()
    schema = f"test_mig_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, poolclass=NullPool)
    with admin.begin() as connection:
        connection.execute(CreateSchema(schema))
    # search_path puts every unqualified table, alembic_version included, into the test's schema.
    url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(DropSchema(schema, cascade=True))
        admin.dispose()


def execute(database_url: str, statement: str, rows: list[dict[str, Any]] | None = None) -> None:
    engine = db.make_engine(database_url, pooled=False)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement), rows or [{}])
    finally:
        engine.dispose()


def query(database_url: str, statement: str) -> list[tuple[Any, ...]]:
    engine = db.make_engine(database_url, pooled=False)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(statement))]
    finally:
        engine.dispose()


def columns(database_url: str, table: str) -> set[str]:
    engine = db.make_engine(database_url, pooled=False)
    try:
        return {column["name"] for column in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def tables(database_url: str) -> set[str]:
    engine = db.make_engine(database_url, pooled=False)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
