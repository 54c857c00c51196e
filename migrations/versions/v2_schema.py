"""v2 schema: the migration guide's "before" state, with one access token per vehicle (phase 1).

Revision ID: v2_schema
Revises: (none)
Create Date: 2026-11-28

``users`` without ``smartcar_user_id``; ``vehicles`` with the Smartcar v2 ``vehicle_access_token``
and ``token_created_at``. This is where an application built on per-vehicle tokens starts.

A database that already holds these tables, made by the application rather than by Alembic, is
adopted instead of created: ``smartcar-ingest db upgrade`` recognises the shape and stamps it, or
``smartcar-ingest db stamp v2_schema`` does so by hand (see docs/migration.md).

Downgrade drops both tables with their rows: it is the way back to an empty database only.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "v2_schema"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Constraint names follow core.store.users.NAMING_CONVENTION, so later revisions can address them.
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
    )
    op.create_table(
        "vehicles",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("vin", sa.String(length=17), nullable=True),
        sa.Column("vehicle_access_token", sa.Text(), nullable=True),
        sa.Column("token_created_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_vehicles_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vehicles")),
    )


def downgrade() -> None:
    op.drop_table("vehicles")
    op.drop_table("users")
