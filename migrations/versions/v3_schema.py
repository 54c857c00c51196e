"""v3 schema: the contract's user store, without per-vehicle tokens (phase 3, the "after" state).

Revision ID: v3_schema
Revises: v2_v3_bridge
Create Date: 2026-11-28

The revision id names a *state*, not the steps that reach it: "the schema Smartcar API v3 needs"
(``users.smartcar_user_id``, ``vehicles.smartcar_vehicle_id``, no per-vehicle tokens). Fresh
databases walk ``v2_schema`` → ``v2_v3_bridge`` → ``v3_schema`` in one ``db upgrade``. Databases
stamped ``v3_schema`` when this was the first and only revision already hold exactly this state
and need nothing.

Upgrade drops ``vehicles.vehicle_access_token`` and ``vehicles.token_created_at`` with their values.
``core.store.db.upgrade`` refuses to run it while a token is still stored unless asked to
(``db upgrade --drop-tokens``).

Downgrade adds both columns back, empty: **the tokens themselves cannot be brought back.** A v2
access token lives two hours, so even a copy would be stale; an application returning to
per-vehicle tokens needs its users to go through Connect again (or its own backup of refresh
tokens, which this schema never held).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "v3_schema"
down_revision: str | Sequence[str] | None = "v2_v3_bridge"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite copies the table (keeping the index and the foreign key); PostgreSQL
    # runs plain ALTER TABLE ... DROP COLUMN.
    with op.batch_alter_table("vehicles") as batch:
        batch.drop_column("token_created_at")
        batch.drop_column("vehicle_access_token")


def downgrade() -> None:
    with op.batch_alter_table("vehicles") as batch:
        batch.add_column(sa.Column("vehicle_access_token", sa.Text(), nullable=True))
        batch.add_column(sa.Column("token_created_at", sa.DateTime(), nullable=True))
