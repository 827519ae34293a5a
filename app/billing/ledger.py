"""The ledger: one row per request that reached an upstream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import repos
from app.db.tables import LedgerEntry, utcnow
from app.images.jobs import TokenUsage


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    request_id: str
    key_id: str
    model: str
    upstream: str | None
    endpoint: str
    status: str  # succeeded | failed | cancelled
    images: int
    usage: TokenUsage | None
    cost_micros: int
    latency_ms: int
    error_code: str | None = None
    raw_usage: Mapping[str, Any] | None = None


class LedgerService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def record(self, record: LedgerRecord) -> None:
        usage = record.usage or TokenUsage()
        async with self._sessions.begin() as session:
            await repos.add_ledger_entry(
                session=session,
                entry=LedgerEntry(
                    request_id=record.request_id,
                    key_id=record.key_id,
                    model=record.model,
                    upstream=record.upstream,
                    endpoint=record.endpoint,
                    status=record.status,
                    images=record.images,
                    text_input_tokens=usage.text_input,
                    image_input_tokens=usage.image_input,
                    text_output_tokens=usage.text_output,
                    image_output_tokens=usage.image_output,
                    cost_micros=record.cost_micros,
                    estimated=usage.estimated,
                    latency_ms=record.latency_ms,
                    error_code=record.error_code,
                    usage=dict(record.raw_usage) if record.raw_usage else None,
                    created_at=utcnow(),
                ),
            )
