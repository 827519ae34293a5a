"""The moderation audit trail: blocks persisted for operators (``GET /admin/moderation/events``)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.tables import ModerationEvent
from app.moderation.base import AuditEvent


class ModerationLog:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def record(self, event: AuditEvent, *, request_id: str) -> None:
        async with self._sessions.begin() as session:
            session.add(
                ModerationEvent(
                    request_id=request_id,
                    key_id=event.key_id,
                    stage=event.stage,
                    level=event.level,
                    checker=event.checker,
                    categories=list(event.categories),
                    rules=list(event.rules),
                    prompt_sha256=event.prompt_sha256,
                    prompt=event.prompt,
                    image_sha256=list(event.image_sha256) or None,
                    created_at=event.created_at,
                )
            )

    async def recent(
        self,
        *,
        key_id: str | None = None,
        category: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> Sequence[ModerationEvent]:
        """Newest first; ``before`` is the id of the last event of the previous page."""
        query = select(ModerationEvent).order_by(ModerationEvent.id.desc())
        if key_id is not None:
            query = query.where(ModerationEvent.key_id == key_id)
        if before is not None:
            query = query.where(ModerationEvent.id < before)
        async with self._sessions() as session:
            rows = (
                (await session.execute(query.limit(limit if category is None else limit * 10)))
                .scalars()
                .all()
            )
        if category is not None:
            # Categories are a JSON list (portable across SQLite and PostgreSQL): filtered here.
            rows = [row for row in rows if category in row.categories][:limit]
        return rows
