"""upstream batches: batch lines forwarded to an upstream's own Batch API (issue 27)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 07:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upstream_batches",
        sa.Column("batch_id", sa.String(40), primary_key=True),
        sa.Column("upstream", sa.String(100), primary_key=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("input_file_id", sa.String(100), nullable=True),
        sa.Column("upstream_batch_id", sa.String(100), nullable=True),
        sa.Column("upstream_status", sa.String(20), nullable=True),
        sa.Column("output_file_id", sa.String(100), nullable=True),
        sa.Column("error_file_id", sa.String(100), nullable=True),
        sa.Column("polls", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("batch_lines") as table:
        table.add_column(sa.Column("forward", sa.JSON(), nullable=True))
        table.add_column(sa.Column("result", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batch_lines") as table:
        table.drop_column("result")
        table.drop_column("forward")
    op.drop_table("upstream_batches")
