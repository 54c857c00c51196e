"""v3 schema: users and vehicles keyed by Smartcar's user and vehicle ids (the contract's user store).

Revision ID: v3_schema
Revises: (none)
Create Date: 2026-11-28

The revision id names a *state*, not the steps that reach it: "the schema Smartcar API v3 needs"
(``users.smartcar_user_id``, ``vehicles.smartcar_vehicle_id``, no per-vehicle tokens). Today it is
the first revision and creates that state from nothing.

How the migration guide's history is prepended later, without touching databases already here:

1. ``v2_schema`` (``down_revision = None``): creates the "before" schema, i.e. ``users`` without
   ``smartcar_user_id`` and ``vehicles`` with ``vehicle_access_token`` and ``token_created_at``.
   Databases that already hold that schema (made by the application, not by Alembic) run
   ``alembic stamp v2_schema`` once, then ``db upgrade``.
2. ``v2_v3_bridge`` (``down_revision = "v2_schema"``), phase 2: adds ``smartcar_user_id`` (with
   ``uq_users_smartcar_user_id``) and ``smartcar_vehicle_id`` (with its index); both token systems
   work.
3. This file, phase 3: ``down_revision`` becomes ``"v2_v3_bridge"``; ``upgrade()`` drops the two
   token columns (``op.batch_alter_table``, for SQLite) and ``downgrade()`` adds them back.

A database stamped ``v3_schema`` before that change already holds exactly the phase-3 state, so
it needs nothing; fresh databases walk v2_schema → v2_v3_bridge → v3_schema to the same tables.
Revision ids must fit ``alembic_version.version_num`` (32 characters).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "v3_schema"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Constraint names follow core.users.NAMING_CONVENTION, so later revisions can address them.
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("smartcar_user_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("smartcar_user_id", name=op.f("uq_users_smartcar_user_id")),
    )
    op.create_table(
        "vehicles",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("vin", sa.String(length=17), nullable=True),
        sa.Column("smartcar_vehicle_id", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_vehicles_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vehicles")),
    )
    op.create_index(op.f("ix_vehicles_smartcar_vehicle_id"), "vehicles", ["smartcar_vehicle_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_vehicles_smartcar_vehicle_id"), table_name="vehicles")
    op.drop_table("vehicles")
    op.drop_table("users")
