"""Run Alembic migrations programmatically, on the gateway's own async engine."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url:
        config.set_main_option("sqlalchemy.url", url)
    return config


async def upgrade_head(engine: AsyncEngine) -> None:
    """Bring the database to the newest revision (idempotent)."""

    def run(connection: Connection) -> None:
        config = alembic_config()
        # env.py uses this connection instead of opening its own, so no nested event loop is needed.
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        await connection.run_sync(run)
