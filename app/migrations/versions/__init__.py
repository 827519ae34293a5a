"""One revision per schema change; Alembic's listing skips this file."""
