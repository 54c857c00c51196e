"""The user store: internal users and their vehicles, keyed by Smartcar's ids (SQL); workers look
users up, ``users link``, Connect and ``backfill`` write links. docs/architecture.md, "The user store"."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import (
    ColumnElement,
    Connection,
    DateTime,
    ForeignKey,
    MetaData,
    String,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, InstrumentedAttribute, Mapped, mapped_column

from core.errors import InvalidValue, LinkConflict, RecordNotFound
from core.store.db import make_engine, translate_errors

#: Column widths from the contract; Smartcar user and vehicle ids are UUIDs.
SMARTCAR_ID_LENGTH = 36
VIN_LENGTH = 17
TEXT_LENGTH = 255
_LINKED_CONCURRENTLY = "Smartcar user {} was linked to another user concurrently; it stays with that user."

# Deterministic constraint names, so later migrations can drop or alter them by name (SQLite's
# batch mode cannot address an unnamed constraint) and autogenerate compares cleanly.
NAMING_CONVENTION = {
    "pk": "pk_%(table_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """``users``: an internal user; ``smartcar_user_id`` is ``data.user.id`` in webhooks."""

    __tablename__ = "users"

    # The id is the internal application's user id, assigned there, so no sequence.
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(String(TEXT_LENGTH))
    name: Mapped[str | None] = mapped_column(String(TEXT_LENGTH))
    # The UNIQUE constraint's index serves the per-event lookup (a second index would slow writes).
    smartcar_user_id: Mapped[str | None] = mapped_column(String(SMARTCAR_ID_LENGTH), unique=True)
    # The contract's column is a plain TIMESTAMP: naive UTC, so every backend agrees.
    created_at: Mapped[datetime | None] = mapped_column(
        DateTime(), default=lambda: datetime.now(UTC).replace(tzinfo=None)
    )


class Vehicle(Base):
    """``vehicles``: a vehicle of an internal user; ``smartcar_vehicle_id`` is Smartcar's id."""

    __tablename__ = "vehicles"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    vin: Mapped[str | None] = mapped_column(String(VIN_LENGTH))
    smartcar_vehicle_id: Mapped[str | None] = mapped_column(String(SMARTCAR_ID_LENGTH), index=True)


class UserRecord(NamedTuple):
    id: int
    email: str | None
    name: str | None
    smartcar_user_id: str | None


class VehicleRecord(NamedTuple):
    id: int
    user_id: int | None
    vin: str | None
    smartcar_vehicle_id: str | None
    owner_smartcar_user_id: str | None  # None when the owner is unlinked or there is none


def _checked(value: str | None, column: str, limit: int = SMARTCAR_ID_LENGTH) -> str | None:
    """``value`` stripped, or ``None`` for blank; :class:`InvalidValue` when it exceeds ``limit`` or
    holds a NUL (PostgreSQL's text refuses it; the worker's lookups never ask for one)."""
    value = (value or "").strip() or None
    if value is not None and len(value) > limit:
        raise InvalidValue(f"{column} must be at most {limit} characters, got {len(value)}.")
    if value is not None and "\x00" in value:
        raise InvalidValue(f"{column} must not hold a NUL character.")
    return value


def _smartcar_id(value: str, column: str) -> str:
    if (checked := _checked(value, column)) is None:
        raise InvalidValue(f"{column} must not be blank.")
    return checked


def _claim(
    connection: Connection, column: InstrumentedAttribute[str | None], row_id: int, current: str | None, wanted: str
) -> bool:
    """Whether ``wanted`` was stored in ``column`` of row ``row_id`` (holding ``current``); never overwrites."""
    table, what = column.class_, column.class_.__tablename__.removesuffix("s")
    if current == wanted:
        return False
    if current is not None:
        raise LinkConflict(
            f"{what} {row_id} is already linked to Smartcar {what} {current}; refusing to overwrite it with {wanted}."
        )
    # The IS NULL guard makes a concurrent writer's link win cleanly (no row matches) instead of
    # being overwritten; the transaction then rolls back unless that writer stored the same id.
    update_ = update(table).where(table.id == row_id, column.is_(None)).values({column.key: wanted})
    if connection.execute(update_).rowcount == 1:
        return True
    if connection.execute(select(column).where(table.id == row_id)).scalar_one_or_none() != wanted:
        raise LinkConflict(f"{what} {row_id} changed while it was being linked; try again.")
    return False


def _link_user(connection: Connection, user_id: int, wanted: str) -> bool:
    row = connection.execute(select(User.smartcar_user_id).where(User.id == user_id)).one_or_none()
    if row is None:
        raise RecordNotFound(f"no user with id {user_id}: check the internal user id.")
    owner = select(User.id).where(User.smartcar_user_id == wanted)
    if row.smartcar_user_id is None and (owner_id := connection.execute(owner).scalar()) is not None:
        raise LinkConflict(
            f"Smartcar user {wanted} already belongs to user {owner_id}; refusing to link it to user {user_id}."
        )
    return _claim(connection, User.smartcar_user_id, user_id, row.smartcar_user_id, wanted)


class UserStore:
    """``users`` and ``vehicles``; construction does not connect. Thread-safe; raises like ``translate_errors``."""

    def __init__(self, database_url: str) -> None:
        self._engine = make_engine(database_url)
        if self._engine.dialect.name == "sqlite":  # it ignores REFERENCES unless asked per connection
            event.listen(self._engine, "connect", lambda connection, _: connection.execute("PRAGMA foreign_keys=ON"))

    @contextmanager
    def _transaction(self, clash: str = "", code: str = "link_conflict") -> Iterator[Connection]:
        """A constraint that a concurrent writer won raises :class:`LinkConflict` ``clash`` (reads pass none)."""
        try:
            with translate_errors(self._engine.url), self._engine.begin() as connection:
                yield connection
        except IntegrityError:
            if not clash:
                raise
            raise LinkConflict(clash, code) from None

    def _find_vehicles(self, criterion: ColumnElement[bool]) -> list[VehicleRecord]:
        statement = (
            select(Vehicle.id, Vehicle.user_id, Vehicle.vin, Vehicle.smartcar_vehicle_id, User.smartcar_user_id)
            .select_from(Vehicle)
            .outerjoin(User, Vehicle.user_id == User.id)
            .where(criterion)
            .order_by(Vehicle.id)
        )
        with self._transaction() as connection:
            return [VehicleRecord(*row) for row in connection.execute(statement)]

    def find_by_smartcar_user_id(self, smartcar_user_id: str) -> UserRecord | None:
        """``None`` also, with no query, for an id that could never be stored."""
        return self.find_by_smartcar_user_ids([smartcar_user_id]).get(smartcar_user_id)

    def find_by_smartcar_user_ids(self, smartcar_user_ids: Collection[str]) -> dict[str, UserRecord]:
        """The users linked to any of ``smartcar_user_ids``, by Smartcar id, in one query (none asked
        for ids that could never be stored)."""
        # A NUL no text column holds (PostgreSQL refuses it): one such id must not fail the others' query.
        wanted = {i for i in smartcar_user_ids if i and len(i) <= SMARTCAR_ID_LENGTH and "\x00" not in i}
        if not wanted:
            return {}
        statement = select(User.id, User.email, User.name, User.smartcar_user_id)
        statement = statement.where(User.smartcar_user_id.in_(wanted))
        with self._transaction() as connection:
            return {row.smartcar_user_id: UserRecord(*row) for row in connection.execute(statement)}

    def find_vehicles_by_smartcar_id(self, smartcar_vehicle_id: str) -> list[VehicleRecord]:
        """Several for a shared car."""
        if not smartcar_vehicle_id or len(smartcar_vehicle_id) > SMARTCAR_ID_LENGTH:
            return []
        return self._find_vehicles(Vehicle.smartcar_vehicle_id == smartcar_vehicle_id)

    def find_vehicles_by_vin(self, vin: str) -> list[VehicleRecord]:
        """Ignoring case and surrounding blanks (a sold car may be listed under two users)."""
        wanted = vin.strip().upper()
        if not wanted or len(wanted) > VIN_LENGTH:
            return []
        return self._find_vehicles(func.upper(func.trim(Vehicle.vin)) == wanted)

    def link(self, user_id: int, smartcar_user_id: str) -> bool:
        """``False`` if already stored; :class:`LinkConflict` if either side is linked elsewhere (or a race lost)."""
        wanted = _smartcar_id(smartcar_user_id, "the Smartcar user id")
        with self._transaction(_LINKED_CONCURRENTLY.format(wanted)) as connection:
            return _link_user(connection, user_id, wanted)

    def link_vehicle(self, vehicle_id: int, smartcar_vehicle_id: str, smartcar_user_id: str) -> None:
        """Smartcar's vehicle id on the vehicle and its user id on the owner, both or neither, like :meth:`link`."""
        wanted_vehicle = _smartcar_id(smartcar_vehicle_id, "the Smartcar vehicle id")
        wanted_user = _smartcar_id(smartcar_user_id, "the Smartcar user id")
        with self._transaction(_LINKED_CONCURRENTLY.format(wanted_user)) as connection:
            statement = select(Vehicle.user_id, Vehicle.smartcar_vehicle_id).where(Vehicle.id == vehicle_id)
            if (vehicle := connection.execute(statement).one_or_none()) is None:
                raise RecordNotFound(f"no vehicle with id {vehicle_id}: check the internal vehicle id.")
            if vehicle.user_id is None:
                raise LinkConflict(f"vehicle {vehicle_id} has no owner, so no user can be linked through it.")
            _claim(connection, Vehicle.smartcar_vehicle_id, vehicle_id, vehicle.smartcar_vehicle_id, wanted_vehicle)
            _link_user(connection, vehicle.user_id, wanted_user)

    def add_user(self, id: int, email: str | None, name: str | None, smartcar_user_id: str | None = None) -> UserRecord:
        """For dev seeding and tests: :class:`LinkConflict` (``record_exists`` for a taken id)."""
        email, name = _checked(email, "email", TEXT_LENGTH), _checked(name, "name", TEXT_LENGTH)
        wanted = _checked(smartcar_user_id, "the Smartcar user id")
        clash = f"a user with id {id} already exists (or its Smartcar user id was just taken)."
        with self._transaction(clash, "record_exists") as connection:
            connection.execute(insert(User).values(id=id, email=email, name=name))
            if wanted is not None:
                _link_user(connection, id, wanted)
        return UserRecord(id, email, name, wanted)

    def add_vehicle(self, id: int, user_id: int, vin: str | None, smartcar_vehicle_id: str | None = None) -> None:
        """For dev seeding and tests: :class:`RecordNotFound` without the user; ``record_exists``."""
        vin, wanted = _checked(vin, "the VIN", VIN_LENGTH), _checked(smartcar_vehicle_id, "the Smartcar vehicle id")
        clash = f"a vehicle with id {id} already exists (or its user was just removed)."
        with self._transaction(clash, "record_exists") as connection:
            if connection.execute(select(User.id).where(User.id == user_id)).first() is None:
                raise RecordNotFound(f"no user with id {user_id}: add the user before its vehicles.")
            connection.execute(insert(Vehicle).values(id=id, user_id=user_id, vin=vin, smartcar_vehicle_id=wanted))

    def dispose(self) -> None:
        self._engine.dispose()
