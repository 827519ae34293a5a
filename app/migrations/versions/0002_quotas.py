"""quotas, balances, rate limits and reservations

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 09:11:49.025390
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_periods",
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "period"),
    )
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reservations_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_reservations_key_id"), ["key_id"], unique=False)

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quota_micros", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("monthly_quota_micros", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("balance_micros", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("spent_micros", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("reserved_micros", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(
            sa.Column("price_multiplier_ppm", sa.Integer(), server_default="1000000", nullable=False)
        )
        batch_op.add_column(sa.Column("rpm", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("ipm", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("concurrency", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("concurrency")
        batch_op.drop_column("ipm")
        batch_op.drop_column("rpm")
        batch_op.drop_column("price_multiplier_ppm")
        batch_op.drop_column("reserved_micros")
        batch_op.drop_column("spent_micros")
        batch_op.drop_column("balance_micros")
        batch_op.drop_column("monthly_quota_micros")
        batch_op.drop_column("quota_micros")

    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reservations_key_id"))
        batch_op.drop_index(batch_op.f("ix_reservations_expires_at"))

    op.drop_table("reservations")
    op.drop_table("key_periods")
