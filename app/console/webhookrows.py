"""Small reads for the console's webhook pages (the outbox and endpoints are app/webhooks/)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.tables import WebhookEndpoint


async def endpoint_urls(
    sessions: async_sessionmaker[AsyncSession], endpoint_ids: Iterable[str]
) -> dict[str, str]:
    """The URLs of one page's endpoints, by id (a deleted endpoint is simply missing)."""
    wanted = sorted(set(endpoint_ids))
    if not wanted:
        return {}
    async with sessions() as session:
        rows = await session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.url).where(WebhookEndpoint.id.in_(wanted))
        )
        return {endpoint_id: url for endpoint_id, url in rows}
