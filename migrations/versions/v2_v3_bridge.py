"""v2 → v3 bridge: Smartcar user and vehicle ids next to the per-vehicle tokens (phase 2).

Revision ID: v2_v3_bridge
Revises: v2_schema
Create Date: 2026-11-28

Adds ``users.smartcar_user_id`` (``uq_users_smartcar_user_id``: one internal user per Smartcar
user, and the index the per-event lookup uses) and ``vehicles.smartcar_vehicle_id`` (indexed, not
unique: a shared car is one Smartcar vehicle connected by several users). The token columns stay,
so an application still on per-vehicle tokens keeps working while Connect captures ``user_id`` and
``smartcar-ingest backfill`` fills both columns for earlier connections.

Downgrade drops the two columns, and with them every captured or backfilled id; the tokens were
never touched. Rerunning the capture and ``backfill`` after a later upgrade recovers the ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "v2_v3_bridge"
down_revision: str | Sequence[str] | None = "v2_schema"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite cannot add a UNIQUE constraint in place, so there the table is copied;
    # on PostgreSQL these are plain ALTER TABLE statements.
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("smartcar_user_id", sa.String(length=36), nullable=True))
        batch.create_unique_constraint(op.f("uq_users_smartcar_user_id"), ["smartcar_user_id"])
    with op.batch_alter_table("vehicles") as batch:
        batch.add_column(sa.Column("smartcar_vehicle_id", sa.String(length=36), nullable=True))
        batch.create_index(op.f("ix_vehicles_smartcar_vehicle_id"), ["smartcar_vehicle_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("vehicles") as batch:
        batch.drop_index(op.f("ix_vehicles_smartcar_vehicle_id"))
        batch.drop_column("smartcar_vehicle_id")
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint(op.f("uq_users_smartcar_user_id"), type_="unique")
        batch.drop_column("smartcar_user_id")
