"""The migration guide as an Alembic history, on real SQLite and real PostgreSQL.

``v2_schema`` (the "before" state, per-vehicle tokens) → ``v2_v3_bridge`` (phase 2: Smartcar ids
added, tokens kept) → ``v3_schema`` (phase 3: tokens dropped). Every step downgrades; databases
made outside Alembic are adopted; rows survive every step in both directions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from cli.main import main
from core.errors import ConfigurationError
from core.store import db
from core.store.users import Base, UserStore
from tests.databases import BACKENDS, columns, empty_database, execute, query, tables
from tests.procs import free_port

USERS_BEFORE = {"id", "email", "name", "created_at"}
VEHICLES_BEFORE = {"id", "user_id", "vin", "vehicle_access_token", "token_created_at"}
VEHICLES_AFTER = {"id", "user_id", "vin", "smartcar_vehicle_id"}
CREATED = dt.datetime(2025, 3, 1, 12, 0, 0)
SMARTCAR_USER = "2fbd0033-83e7-43b8-a367-776d6dff1134"
SMARTCAR_VEHICLE = "a1d50709-3502-4faa-ba43-a5c7565e6a09"

# What an application on per-vehicle tokens made by itself: no Alembic, unnamed constraints, and
# a column of its own that every migration must carry along.
APP_MADE_USERS = (
    "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(255), name VARCHAR(255), "
    "created_at TIMESTAMP, plan VARCHAR(20))"
)
APP_MADE_VEHICLES = (
    "CREATE TABLE vehicles (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users(id), vin VARCHAR(17), "
    "vehicle_access_token TEXT, token_created_at TIMESTAMP)"
)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    with empty_database(request.param, tmp_path) as url:
        yield url


def insert_before_rows(url: str, *, plan: bool = False) -> None:
    """Three users and four vehicles with tokens, as the "before" application stored them."""
    users = [
        {"id": 1, "email": "ada@example.test", "name": "Ada", "created_at": CREATED},
        {"id": 2, "email": "bo@example.test", "name": "Bo", "created_at": CREATED},
        {"id": 3, "email": None, "name": "Cy", "created_at": None},
    ]
    if plan:
        for user in users:
            user["plan"] = "pro"
    execute(
        url,
        "INSERT INTO users (id, email, name, created_at, plan) VALUES (:id, :email, :name, :created_at, :plan)"
        if plan
        else "INSERT INTO users (id, email, name, created_at) VALUES (:id, :email, :name, :created_at)",
        users,
    )
    execute(
        url,
        "INSERT INTO vehicles (id, user_id, vin, vehicle_access_token, token_created_at) "
        "VALUES (:id, :user_id, :vin, :token, :at)",
        [
            {"id": 10, "user_id": 1, "vin": "1FAKEVIN00TEST001", "token": "tok-10", "at": CREATED},
            {"id": 11, "user_id": 1, "vin": "1FAKEVIN00TEST002", "token": "tok-11", "at": CREATED},
            {"id": 12, "user_id": 2, "vin": "1FAKEVIN00TEST003", "token": "tok-12", "at": CREATED},
            {"id": 13, "user_id": None, "vin": None, "token": None, "at": None},
        ],
    )


def user_rows(url: str) -> list[tuple[object, ...]]:
    return query(url, "SELECT id, email, name, created_at FROM users ORDER BY id")


def vehicle_rows(url: str) -> list[tuple[object, ...]]:
    return query(url, "SELECT id, user_id, vin FROM vehicles ORDER BY id")


def test_empty_database_goes_straight_to_head(database_url):
    """`upgrade` on an empty database runs all three revisions and ends in the contract's schema."""
    assert db.upgrade(database_url) is None
    assert db.current(database_url) == "v3_schema"
    assert columns(database_url, "users") == USERS_BEFORE | {"smartcar_user_id"}
    assert columns(database_url, "vehicles") == VEHICLES_AFTER


def test_each_revision_upgrades_and_downgrades_one_step(database_url):
    """Each revision's upgrade and downgrade move exactly one step between the guide's shapes."""
    shapes = {
        "v2_schema": (USERS_BEFORE, VEHICLES_BEFORE),
        "v2_v3_bridge": (USERS_BEFORE | {"smartcar_user_id"}, VEHICLES_BEFORE | {"smartcar_vehicle_id"}),
        "v3_schema": (USERS_BEFORE | {"smartcar_user_id"}, VEHICLES_AFTER),
    }
    for revision, (users, vehicles) in shapes.items():
        db.upgrade(database_url, revision)
        assert db.current(database_url) == revision
        assert (columns(database_url, "users"), columns(database_url, "vehicles")) == (users, vehicles)
    for revision in ("v2_v3_bridge", "v2_schema"):
        db.downgrade(database_url, revision)
        assert db.current(database_url) == revision
        users, vehicles = shapes[revision]
        assert (columns(database_url, "users"), columns(database_url, "vehicles")) == (users, vehicles)
    db.downgrade(database_url, "base")
    assert db.current(database_url) is None
    assert tables(database_url) <= {"alembic_version"}


def test_populated_database_keeps_every_row_up_to_head_and_back(database_url):
    """Users, vehicles and stored Smartcar ids survive every upgrade and downgrade step."""
    db.upgrade(database_url, "v2_schema")
    insert_before_rows(database_url)
    users, vehicles = user_rows(database_url), vehicle_rows(database_url)

    db.upgrade(database_url, "v2_v3_bridge")
    assert (user_rows(database_url), vehicle_rows(database_url)) == (users, vehicles)
    assert query(database_url, "SELECT vehicle_access_token FROM vehicles WHERE id = 10") == [("tok-10",)]
    execute(database_url, "UPDATE users SET smartcar_user_id = :sc WHERE id = 1", [{"sc": SMARTCAR_USER}])
    execute(database_url, "UPDATE vehicles SET smartcar_vehicle_id = :sc WHERE id = 10", [{"sc": SMARTCAR_VEHICLE}])

    db.upgrade(database_url, drop_tokens=True)
    assert db.current(database_url) == "v3_schema"
    assert (user_rows(database_url), vehicle_rows(database_url)) == (users, vehicles)
    store = UserStore(database_url)
    try:
        found = store.find_by_smartcar_user_id(SMARTCAR_USER)
    finally:
        store.dispose()
    assert found is not None
    assert found.id == 1

    db.downgrade(database_url, "v2_v3_bridge")
    assert (user_rows(database_url), vehicle_rows(database_url)) == (users, vehicles)
    assert query(database_url, "SELECT smartcar_vehicle_id FROM vehicles WHERE id = 10") == [(SMARTCAR_VEHICLE,)]

    db.downgrade(database_url, "v2_schema")
    assert (user_rows(database_url), vehicle_rows(database_url)) == (users, vehicles)
    assert "smartcar_user_id" not in columns(database_url, "users")


def test_phase_3_downgrade_brings_the_columns_back_but_not_the_tokens(database_url):
    """Dropped tokens are gone for good: a downgrade restores empty token columns only."""
    db.upgrade(database_url, "v2_schema")
    insert_before_rows(database_url)
    db.upgrade(database_url, drop_tokens=True)
    db.downgrade(database_url, "v2_v3_bridge")
    assert query(database_url, "SELECT count(*) FROM vehicles WHERE vehicle_access_token IS NOT NULL") == [(0,)]
    assert query(database_url, "SELECT count(*) FROM vehicles") == [(4,)]


def test_upgrade_refuses_to_drop_stored_tokens_without_consent(database_url):
    """Reaching v3_schema while tokens are stored needs --drop-tokens; refusing changes nothing."""
    db.upgrade(database_url, "v2_schema")
    insert_before_rows(database_url)
    with pytest.raises(ConfigurationError, match="drops 3 stored per-vehicle access token") as caught:
        db.upgrade(database_url)
    assert "--drop-tokens" in caught.value.message
    assert "v2_v3_bridge" in caught.value.message
    assert db.current(database_url) == "v2_schema"  # not even phase 2 was applied
    db.upgrade(database_url, "v2_v3_bridge")
    with pytest.raises(ConfigurationError, match="--drop-tokens"):
        db.upgrade(database_url, "v3_schema")
    assert query(database_url, "SELECT vehicle_access_token FROM vehicles WHERE id = 12") == [("tok-12",)]
    execute(database_url, "UPDATE vehicles SET vehicle_access_token = NULL")
    db.upgrade(database_url)  # no token left: nothing to protect
    assert db.current(database_url) == "v3_schema"


def test_upgrade_adopts_an_application_made_before_database(database_url):
    """Tables in the "before" shape without Alembic are stamped v2_schema, then migrated with every row."""
    execute(database_url, APP_MADE_USERS)
    execute(database_url, APP_MADE_VEHICLES)
    insert_before_rows(database_url, plan=True)
    users, vehicles = user_rows(database_url), vehicle_rows(database_url)

    assert db.upgrade(database_url, "v2_v3_bridge") == "v2_schema"
    assert db.current(database_url) == "v2_v3_bridge"
    assert (user_rows(database_url), vehicle_rows(database_url)) == (users, vehicles)

    assert db.upgrade(database_url, drop_tokens=True) is None  # already versioned now
    assert (user_rows(database_url), vehicle_rows(database_url)) == (users, vehicles)
    assert query(database_url, "SELECT DISTINCT plan FROM users") == [("pro",)]
    assert columns(database_url, "vehicles") == VEHICLES_AFTER

    db.downgrade(database_url, "v2_schema")
    assert (user_rows(database_url), vehicle_rows(database_url)) == (users, vehicles)


@pytest.mark.parametrize("revision", ["v2_v3_bridge", "v3_schema"])
def test_upgrade_recognises_later_shapes_without_a_version(database_url, revision):
    """An unversioned database in the phase-2 or phase-3 shape is stamped as that revision."""
    db.upgrade(database_url, revision)
    execute(database_url, "DROP TABLE alembic_version")
    assert db.upgrade(database_url, revision) == revision
    assert db.current(database_url) == revision


def test_upgrade_refuses_tables_of_an_unknown_shape(database_url):
    """Tables that match no revision stop `upgrade` with one line pointing at `db stamp`, changing nothing."""
    execute(database_url, "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(255))")
    with pytest.raises(ConfigurationError, match="db stamp REV"):
        db.upgrade(database_url)
    assert tables(database_url) == {"users"}


def test_stamp_adopts_a_database_by_hand(database_url):
    """`stamp v2_schema` records the "before" state without touching the tables; upgrades follow."""
    execute(database_url, APP_MADE_USERS)
    execute(database_url, APP_MADE_VEHICLES)
    insert_before_rows(database_url, plan=True)
    db.stamp(database_url, "v2_schema")
    assert db.current(database_url) == "v2_schema"
    assert columns(database_url, "vehicles") == VEHICLES_BEFORE
    db.upgrade(database_url, "v2_v3_bridge")
    assert query(database_url, "SELECT count(*) FROM vehicles") == [(4,)]
    db.stamp(database_url, "base")
    assert db.current(database_url) is None


def test_database_stamped_by_the_old_single_revision_needs_nothing(database_url):
    """A database made when v3_schema was the only revision is already at head, matching the models."""
    engine = db.make_engine(database_url, pooled=False)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()
    db.stamp(database_url, "v3_schema")
    db.upgrade(database_url)
    assert db.current(database_url) == "v3_schema"
    engine = db.make_engine(database_url, pooled=False)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        engine.dispose()


def test_store_on_a_before_database_names_the_bridge_revision(database_url):
    """Using the store before phase 2 fails with one line saying to run `db upgrade v2_v3_bridge`."""
    db.upgrade(database_url, "v2_schema")
    store = UserStore(database_url)
    try:
        with pytest.raises(ConfigurationError, match="db upgrade v2_v3_bridge"):
            store.find_by_smartcar_user_id(SMARTCAR_USER)
    finally:
        store.dispose()


def test_cli_db_upgrade_reports_the_adoption_and_stamp_needs_a_revision(tmp_path, monkeypatch, capsys):
    """`db upgrade` says which shape it found and stamped; `db stamp` without a revision exits 2."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    execute(url, APP_MADE_USERS)
    execute(url, APP_MADE_VEHICLES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["db", "upgrade", "v2_v3_bridge"]) == 0
    out = capsys.readouterr().out
    assert "in the v2_schema shape: stamped them v2_schema" in out
    assert "database at revision v2_v3_bridge" in out
    assert main(["db", "stamp"]) == 2
    assert "db stamp needs a revision" in capsys.readouterr().err


def test_db_upgrade_against_a_server_that_does_not_answer_is_exit_3(monkeypatch, capsys):
    """An unreachable PostgreSQL is an outage (exit 3, retry later), not a bad setting (exit 2)."""
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg://app:s3cret-pw@127.0.0.1:{port}/test")
    assert main(["db", "upgrade"]) == 3
    err = capsys.readouterr().err
    assert "unreachable" in err
    assert "s3cret-pw" not in err


def test_db_upgrade_on_a_sqlite_file_that_cannot_be_opened_is_exit_2(tmp_path, monkeypatch, capsys):
    """A SQLite path in a directory that does not exist is a setting to fix."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'missing' / 'app.db'}")
    assert main(["db", "upgrade"]) == 2
    assert "DATABASE_URL" in capsys.readouterr().err
