"""moderation audit and per-key lists

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 09:47:42.225238
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "moderation_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("stage", sa.String(length=10), nullable=False),
        sa.Column("level", sa.String(length=10), nullable=False),
        sa.Column("checker", sa.String(length=40), nullable=False),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("prompt_sha256", sa.String(length=64), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("image_sha256", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("moderation_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_moderation_events_created_at"), ["created_at"], unique=False)
        batch_op.create_index("ix_moderation_key_created", ["key_id", "created_at"], unique=False)

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("moderation_allow", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("moderation_block", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("moderation_block")
        batch_op.drop_column("moderation_allow")

    with op.batch_alter_table("moderation_events", schema=None) as batch_op:
        batch_op.drop_index("ix_moderation_key_created")
        batch_op.drop_index(batch_op.f("ix_moderation_events_created_at"))

    op.drop_table("moderation_events")
