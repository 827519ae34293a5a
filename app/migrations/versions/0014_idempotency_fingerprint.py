"""tasks keep a fingerprint of the request their idempotency key was first used with; keys of up
to 255 characters

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idempotency_fingerprint", sa.String(64), nullable=True))
        # PostgreSQL refused keys over 200 characters (SQLite does not enforce the length).
        batch_op.alter_column(
            "idempotency_key", type_=sa.String(255), existing_type=sa.String(200), existing_nullable=True
        )


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.alter_column(
            "idempotency_key", type_=sa.String(200), existing_type=sa.String(255), existing_nullable=True
        )
        batch_op.drop_column("idempotency_fingerprint")
