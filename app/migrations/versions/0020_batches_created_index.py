"""batches: index in the console's list order

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 17:30:00

The operator's batches page lists every key's batches newest first, keyset-paged on
(created_at, id). Without an index in that order SQLite scanned the table and sorted it for each
view (`make bench-console`'s plan at 1,000 batches: SCAN batches; USE TEMP B-TREE FOR ORDER BY).
"""

from __future__ import annotations

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_batches_created", "batches", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_batches_created", table_name="batches")
