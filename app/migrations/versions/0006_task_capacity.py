"""per-key task limits (issue 16)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 23:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_queued_tasks", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_tasks_in_flight", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("max_tasks_in_flight")
        batch_op.drop_column("max_queued_tasks")
