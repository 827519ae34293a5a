"""svg author usage on ledger rows

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 23:59:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("svg_model", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("svg_input_tokens", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("svg_output_tokens", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(
            sa.Column("svg_reasoning_tokens", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("svg_cost_micros", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_column("svg_cost_micros")
        batch_op.drop_column("svg_reasoning_tokens")
        batch_op.drop_column("svg_output_tokens")
        batch_op.drop_column("svg_input_tokens")
        batch_op.drop_column("svg_model")
