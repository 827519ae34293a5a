"""tasks are found by their hold: the reconciler leaves a live task's hold alone

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 17:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_hold", "tasks", ["hold_id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_hold", table_name="tasks")
