"""tasks: partial index of the runnable tasks, in each key's claim order

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 07:40:00

The claim ranks every runnable task inside its key by age (app/tasks/statements.py). Through
ix_tasks_key_created it read every task ever stored, finished ones included; this index holds only
queued and running tasks, already in (key_id, created_at, id) order.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

RUNNABLE = "status IN ('queued', 'in_progress')"


def upgrade() -> None:
    op.create_index(
        "ix_tasks_runnable",
        "tasks",
        ["key_id", "created_at", "id"],
        sqlite_where=sa.text(RUNNABLE),
        postgresql_where=sa.text(RUNNABLE),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_runnable", table_name="tasks")
