"""A migrated SQLite database in tmp_path with the gateway's writer, and key rows, for the unit tests
of the money path (ledger, settlement, admission): real SQL, no mocked database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import create_engine
from app.db.migrate import upgrade_head
from app.db.tables import ApiKey, KeyPeriod, LedgerEntry, Reservation, utcnow
from app.db.writer import Writer, create_writer


@dataclass
class Db:
    engine: AsyncEngine
    writer: Writer

    async def add_key(self, key_id: str, **columns: Any) -> str:
        row = dict(
            id=key_id,
            name=key_id,
            key_hash=key_id.ljust(64, "0"),
            prefix="sk-gw-",
            moderation="default",
            enabled=True,
            created_at=utcnow(),
            spent_micros=0,
            reserved_micros=0,
            price_multiplier_ppm=1_000_000,
        )
        row.update(columns)
        await self.writer.run(lambda c: c.execute(insert(ApiKey).values(**row)))
        return key_id

    async def key(self, key_id: str) -> dict[str, Any]:
        """spent, reserved and balance of a key, and its months' spent/reserved summed."""
        async with self.engine.connect() as c:
            key = (await c.execute(select(ApiKey).where(ApiKey.id == key_id))).mappings().one()
            periods = (await c.execute(select(KeyPeriod).where(KeyPeriod.key_id == key_id))).mappings().all()
        return {
            "spent": key["spent_micros"],
            "reserved": key["reserved_micros"],
            "balance": key["balance_micros"],
            "period_spent": sum(p["spent_micros"] for p in periods),
            "period_reserved": sum(p["reserved_micros"] for p in periods),
        }

    async def holds(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as c:
            return [dict(r) for r in (await c.execute(select(Reservation))).mappings().all()]

    async def entries(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as c:
            rows = await c.execute(select(LedgerEntry).order_by(LedgerEntry.id))
            return [dict(r) for r in rows.mappings().all()]


@asynccontextmanager
async def open_db(tmp_path: Path) -> AsyncIterator[Db]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    await upgrade_head(engine)
    writer = create_writer(engine)
    try:
        yield Db(engine, writer)
    finally:
        await writer.aclose()
        await engine.dispose()
