"""The SQL user store and its migrations, against real SQLite and real PostgreSQL.

Every store test runs twice: on a fresh SQLite file, and in a PostgreSQL schema made for that test
alone (``TEST_POSTGRES_URL``, default the local server's ``test`` database) and dropped after it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from core.errors import ConfigurationError, PermanentError, TransientError, Unreachable
from core.store import db
from core.store.users import Base, InvalidValue, LinkConflict, RecordNotFound, UserRecord, UserStore
from tests.databases import BACKENDS, empty_database

SMARTCAR_ALICE = "0d8f2f5e-6a41-4c1e-9a52-6a3c6b1f2d01"
SMARTCAR_BOB = "7b3e9c10-2f4d-4e8a-b1c2-9d8e7f6a5b02"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An empty database: a SQLite file, or a PostgreSQL schema that only this test sees."""
    with empty_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def store(database_url: str) -> Iterator[UserStore]:
    """A store on a freshly migrated database, with Alice (unlinked) and Bob (linked)."""
    db.upgrade(database_url)
    user_store = UserStore(database_url)
    user_store.add_user(1, "alice@example.com", "Alice")
    user_store.add_user(2, "bob@example.com", "Bob", smartcar_user_id=SMARTCAR_BOB)
    yield user_store
    user_store.dispose()


def assert_alice_unlinked(store: UserStore) -> None:
    """Alice is there as seeded, without a Smartcar user id: linking her now stores one and changes nothing else."""
    assert store.link(1, SMARTCAR_ALICE) is True
    assert store.find_by_smartcar_user_id(SMARTCAR_ALICE) == UserRecord(1, "alice@example.com", "Alice", SMARTCAR_ALICE)


def _tables(database_url: str) -> set[str]:
    engine = db.make_engine(database_url, pooled=False)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_creates_the_contract_schema_from_empty(database_url):
    """`upgrade` on an empty database creates users and vehicles with the contract's columns and keys."""
    assert db.current(database_url) is None
    db.upgrade(database_url)
    assert db.current(database_url) == "v3_schema"
    engine = db.make_engine(database_url, pooled=False)
    try:
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) == {"alembic_version", "users", "vehicles"}
        users = {column["name"]: column for column in inspector.get_columns("users")}
        # Set, not list: the phase-2 revision adds smartcar_user_id, and ALTER TABLE appends it.
        assert set(users) == {"id", "email", "name", "smartcar_user_id", "created_at"}
        assert users["smartcar_user_id"]["type"].length == 36
        assert users["email"]["type"].length == 255
        assert inspector.get_pk_constraint("users")["constrained_columns"] == ["id"]
        unique = inspector.get_unique_constraints("users")
        assert [(u["name"], u["column_names"]) for u in unique] == [("uq_users_smartcar_user_id", ["smartcar_user_id"])]
        vehicles = {column["name"]: column for column in inspector.get_columns("vehicles")}
        assert list(vehicles) == ["id", "user_id", "vin", "smartcar_vehicle_id"]
        assert vehicles["vin"]["type"].length == 17
        [foreign_key] = inspector.get_foreign_keys("vehicles")
        assert (foreign_key["constrained_columns"], foreign_key["referred_table"]) == (["user_id"], "users")
        assert [(i["name"], i["column_names"]) for i in inspector.get_indexes("vehicles")] == [
            ("ix_vehicles_smartcar_vehicle_id", ["smartcar_vehicle_id"])
        ]
    finally:
        engine.dispose()


def test_migrations_match_the_models(database_url):
    """After `upgrade`, autogenerate finds no difference between the database and core.store.users' models."""
    db.upgrade(database_url)
    engine = db.make_engine(database_url, pooled=False)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        engine.dispose()


def test_upgrade_twice_is_a_no_op(database_url):
    """Running `upgrade` on an up-to-date database changes nothing and does not fail."""
    db.upgrade(database_url)
    db.upgrade(database_url)
    assert db.current(database_url) == "v3_schema"


def test_downgrade_to_base_removes_the_schema_and_upgrade_recreates_it(database_url):
    """`downgrade base` leaves only Alembic's bookkeeping; a later `upgrade` rebuilds everything."""
    db.upgrade(database_url)
    db.downgrade(database_url, "base")
    assert db.current(database_url) is None
    assert _tables(database_url) <= {"alembic_version"}
    db.upgrade(database_url)
    assert db.current(database_url) == "v3_schema"
    assert {"users", "vehicles"} <= _tables(database_url)


def test_unknown_revision_is_a_configuration_error(database_url):
    """Asking for a revision that does not exist fails with one line naming it."""
    with pytest.raises(ConfigurationError, match="nope"):
        db.upgrade(database_url, "nope")
    with pytest.raises(ConfigurationError, match="nope"):
        db.downgrade(database_url, "nope")


def test_unreachable_database_is_unavailable_without_the_password():
    """Migrating an unreachable database is an outage (not a bad setting), in one line that masks the password."""
    url = "postgresql+psycopg://postgres:hunter2-secret@127.0.0.1:1/test"
    with pytest.raises(Unreachable, match="unreachable") as caught:
        db.upgrade(url)
    assert "hunter2-secret" not in caught.value.message
    assert "***" in caught.value.message


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://somewhere/x"])
def test_bad_url_is_a_configuration_error(url):
    """A DATABASE_URL that is not a URL or names no installed driver fails with one line."""
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        db.upgrade(url)


def test_bare_postgres_scheme_selects_psycopg():
    """`postgres://` and `postgresql://` URLs use psycopg 3, the driver that is installed."""
    for scheme in ("postgres", "postgresql"):
        engine = db.make_engine(f"{scheme}://u@localhost/x")
        assert engine.dialect.driver == "psycopg"
        engine.dispose()


def test_store_on_unreachable_database_raises_transient_error():
    """A lookup while the database is down raises Unreachable, which workers retry."""
    store = UserStore("postgresql+psycopg://postgres:hunter2-secret@127.0.0.1:1/test")
    with pytest.raises(db.Unreachable) as caught:
        store.find_by_smartcar_user_id(SMARTCAR_ALICE)
    assert isinstance(caught.value, TransientError)
    assert "hunter2-secret" not in caught.value.message
    store.dispose()


def test_store_on_unmigrated_database_says_to_upgrade(database_url):
    """A lookup on a database without tables tells the operator to run `db upgrade`."""
    store = UserStore(database_url)
    with pytest.raises(ConfigurationError, match="db upgrade"):
        store.find_by_smartcar_user_id(SMARTCAR_ALICE)
    store.dispose()


def test_find_by_smartcar_user_id_returns_the_linked_user(store):
    """The lookup workers make per event returns the user whose smartcar_user_id matches."""
    assert store.find_by_smartcar_user_id(SMARTCAR_BOB) == UserRecord(
        id=2, email="bob@example.com", name="Bob", smartcar_user_id=SMARTCAR_BOB
    )


@pytest.mark.parametrize("smartcar_user_id", [SMARTCAR_ALICE, "", "x" * 37])
def test_find_by_unknown_smartcar_user_id_returns_none(store, smartcar_user_id):
    """An id nobody is linked to, including one too long to be stored, finds no user."""
    assert store.find_by_smartcar_user_id(smartcar_user_id) is None


def test_link_stores_the_smartcar_user_id(store):
    """Linking an unlinked user stores the id, and the worker lookup then finds that user."""
    assert store.link(1, SMARTCAR_ALICE) is True
    assert store.find_by_smartcar_user_id(SMARTCAR_ALICE) == UserRecord(1, "alice@example.com", "Alice", SMARTCAR_ALICE)


def test_link_again_with_the_same_id_is_a_no_op(store):
    """Linking the pair that is already stored changes nothing and reports `already linked`."""
    assert store.link(2, SMARTCAR_BOB) is False
    assert store.find_by_smartcar_user_id(SMARTCAR_BOB) == UserRecord(2, "bob@example.com", "Bob", SMARTCAR_BOB)


def test_link_refuses_an_id_that_belongs_to_another_user(store):
    """A Smartcar user id held by another user is never moved: LinkConflict, nothing changes."""
    with pytest.raises(LinkConflict, match="already belongs to user 2") as caught:
        store.link(1, SMARTCAR_BOB)
    assert isinstance(caught.value, PermanentError)
    assert store.find_by_smartcar_user_id(SMARTCAR_BOB) == UserRecord(2, "bob@example.com", "Bob", SMARTCAR_BOB)
    assert_alice_unlinked(store)


def test_link_refuses_to_overwrite_a_different_id(store):
    """A user already linked to another Smartcar user id keeps it: LinkConflict, nothing changes."""
    with pytest.raises(LinkConflict, match="refusing to overwrite"):
        store.link(2, SMARTCAR_ALICE)
    assert store.find_by_smartcar_user_id(SMARTCAR_BOB) == UserRecord(2, "bob@example.com", "Bob", SMARTCAR_BOB)
    assert store.find_by_smartcar_user_id(SMARTCAR_ALICE) is None


def test_link_unknown_user_raises_user_not_found(store):
    """Linking an internal user id that does not exist raises RecordNotFound and stores nothing."""
    with pytest.raises(RecordNotFound, match="99"):
        store.link(99, SMARTCAR_ALICE)
    assert store.find_by_smartcar_user_id(SMARTCAR_ALICE) is None


@pytest.mark.parametrize("smartcar_user_id", ["x" * 37, "   "])
def test_link_rejects_an_id_that_cannot_be_stored(store, smartcar_user_id):
    """A blank Smartcar user id, or one over 36 characters, is refused with a clear message."""
    with pytest.raises(InvalidValue, match="Smartcar user id"):
        store.link(1, smartcar_user_id)
    assert_alice_unlinked(store)


def test_link_survives_a_second_store_seeing_the_same_database(store, database_url):
    """Two stores (two processes) linking the same pair agree: the second sees `already linked`."""
    other = UserStore(database_url)
    try:
        assert store.link(1, SMARTCAR_ALICE) is True
        assert other.link(1, SMARTCAR_ALICE) is False
    finally:
        other.dispose()


def test_add_user_refuses_a_taken_id_or_smartcar_user_id(store):
    """Seeding the same user id twice, or another user with a taken Smartcar id, is refused."""
    with pytest.raises(LinkConflict) as taken:
        store.add_user(1, "again@example.com", "Again")
    assert taken.value.code == "record_exists"
    with pytest.raises(LinkConflict) as linked:
        store.add_user(3, "carol@example.com", "Carol", smartcar_user_id=SMARTCAR_BOB)
    assert linked.value.code == "link_conflict"
    assert store.find_by_smartcar_user_id(SMARTCAR_BOB) == UserRecord(2, "bob@example.com", "Bob", SMARTCAR_BOB)
    assert_alice_unlinked(store)
    # Nothing of the refused Carol was stored: her id is still free.
    assert store.add_user(3, "carol@example.com", "Carol") == UserRecord(3, "carol@example.com", "Carol", None)


def test_add_vehicle_requires_an_existing_user(store):
    """Vehicles belong to existing users; a duplicate vehicle id is refused."""
    store.add_vehicle(10, 2, "1HGCM82633A004352", smartcar_vehicle_id="c1a2b3d4-0000-4000-8000-000000000010")
    with pytest.raises(RecordNotFound):
        store.add_vehicle(11, 99, "1HGCM82633A004353")
    with pytest.raises(LinkConflict) as taken:
        store.add_vehicle(10, 1, "1HGCM82633A004354")
    assert taken.value.code == "record_exists"
    with pytest.raises(InvalidValue, match="VIN"):
        store.add_vehicle(12, 1, "X" * 18)


def test_one_query_finds_many_users_and_never_fails_on_an_id_no_column_holds(store):
    """The worker's batched lookup: an id with a NUL (PostgreSQL refuses it in text), an empty one or
    one longer than the column is left out of the query, so the others in the batch are still found."""
    found = store.find_by_smartcar_user_ids([SMARTCAR_BOB, "bad\x00id", "", "x" * 300, SMARTCAR_ALICE])
    assert found == {SMARTCAR_BOB: UserRecord(2, "bob@example.com", "Bob", SMARTCAR_BOB)}
    assert store.find_by_smartcar_user_ids(["bad\x00id"]) == {}
    # Nor can one be stored: what the lookups leave out, a link refuses, on both databases alike.
    with pytest.raises(InvalidValue, match="NUL"):
        store.link(1, "bad\x00id")


def test_a_full_worker_user_cache_forgets_its_oldest_user_only(seeded_database, monkeypatch):
    """At its size, the worker's user cache drops the oldest entry for a new one instead of clearing
    itself (a clear sent every lookup of a 100,000-vehicle fleet to the database at once)."""
    import asyncio

    from emulator.seed import default_seed
    from workers import processor as processor_module
    from workers.processor import EventProcessor

    smartcar_ids = [user.id for user in default_seed()][:3]
    assert len(smartcar_ids) == 3
    store = UserStore(seeded_database)
    monkeypatch.setattr(processor_module, "USER_CACHE_SIZE", 2)
    processor = EventProcessor(store, None, None, None, None, None)  # type: ignore[arg-type]

    async def look_up_each() -> None:
        for smartcar_id in smartcar_ids:
            assert await processor._find_user(smartcar_id) is not None

    try:
        asyncio.run(look_up_each())
    finally:
        store.dispose()
    assert list(processor.known_users) == smartcar_ids[1:]


def test_the_worker_looks_up_the_users_of_concurrent_events_in_one_query(seeded_database):
    """Events in flight together share one query (and one thread hop); each gets its own user, an
    unknown id gets None, and an id no column could hold is never sent to the database."""
    import asyncio

    from sqlalchemy import event as sa_event

    from emulator.seed import default_seed
    from workers.processor import EventProcessor

    known = [user.id for user in default_seed()][:4]
    store = UserStore(seeded_database)
    queries: list[tuple[str, object]] = []
    sa_event.listen(store._engine, "before_cursor_execute", lambda *args: queries.append((args[2], args[3])))
    processor = EventProcessor(store, None, None, None, None, None)  # type: ignore[arg-type]
    asked = [*known, "no-such-user", "x" * 300, known[0]]

    async def look_up_all() -> list[UserRecord | None]:
        return await asyncio.gather(*(processor._find_user(i) for i in asked))

    try:
        found = asyncio.run(look_up_all())
    finally:
        store.dispose()
    assert [user.smartcar_user_id if user else None for user in found] == [*known, None, None, known[0]]
    selects = [(q, p) for q, p in queries if q.lstrip().upper().startswith("SELECT")]
    # The first caller finds the lookup idle and goes alone; the rest wait and go together.
    assert len(selects) == 2, selects
    assert "no-such-user" in repr(selects[1][1])
    assert "x" * 300 not in repr(selects)


def test_dev_seeding_again_skips_its_users_but_shows_a_smartcar_id_held_elsewhere(tmp_path):
    """Seeding a database seeded before adds nothing; one where another user holds a seed's Smartcar id
    stops on that conflict instead of going on to its vehicles."""
    from cli.processes import seed_users
    from emulator.seed import default_seed

    url = f"sqlite:///{tmp_path / 'users.db'}"
    db.upgrade(url)
    assert seed_users(url) > 0
    assert seed_users(url) == 0

    other = f"sqlite:///{tmp_path / 'other.db'}"
    db.upgrade(other)
    store = UserStore(other)
    try:
        store.add_user(99, None, None, smartcar_user_id=default_seed()[0].id)
    finally:
        store.dispose()
    with pytest.raises(LinkConflict) as raised:
        seed_users(other)
    assert raised.value.code == "link_conflict"
