"""Read-only, paginated queries behind the console's list pages.

Every list is a keyset page (``before`` = the last id seen) over an index, never OFFSET and never
an unbounded read: with a key filter the ledger is walked on ``ix_ledger_key_created``, without one
on ``ix_ledger_created``; tasks on ``ix_tasks_key_created`` / ``ix_tasks_created``. Filters on
model, status or upstream are applied while walking the index, so a page stops after ``limit``
matches (bench/console.py measures it at 10,000 rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.tables import LedgerEntry, RequestThumbnail, Task


@dataclass(frozen=True, slots=True)
class LedgerFilter:
    key_id: str | None = None
    model: str | None = None
    status: str | None = None
    upstream: str | None = None


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    rows: Sequence[T]
    next_before: int | str | None


async def ledger_page(
    sessions: async_sessionmaker[AsyncSession],
    where: LedgerFilter,
    *,
    before: int | None,
    limit: int,
) -> Page[LedgerEntry]:
    """Ledger rows newest first (by time, then id), ``limit`` at a time."""
    conditions: list[ColumnElement[bool]] = []
    for column, value in (
        (LedgerEntry.key_id, where.key_id),
        (LedgerEntry.model, where.model),
        (LedgerEntry.status, where.status),
        (LedgerEntry.upstream, where.upstream),
    ):
        if value:
            conditions.append(column == value)
    async with sessions() as session:
        if before is not None:
            anchor = await session.get(LedgerEntry, before)
            if anchor is None:
                return Page(rows=(), next_before=None)
            # Written so the index range (created_at <= anchor) bounds the walk.
            conditions.append(LedgerEntry.created_at <= anchor.created_at)
            conditions.append(or_(LedgerEntry.created_at < anchor.created_at, LedgerEntry.id < anchor.id))
        query = (
            select(LedgerEntry)
            .where(*conditions)
            .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc())
            .limit(limit + 1)
        )
        rows = (await session.execute(query)).scalars().all()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows=rows, next_before=rows[-1].id if more and rows else None)


async def request_rows(
    sessions: async_sessionmaker[AsyncSession], request_id: str, *, key_id: str | None
) -> Sequence[LedgerEntry]:
    """The ledger rows of one request; for a tenant (``key_id`` set) only their own."""
    query = select(LedgerEntry).where(LedgerEntry.request_id == request_id)
    if key_id is not None:
        query = query.where(LedgerEntry.key_id == key_id)
    async with sessions() as session:
        return (await session.execute(query.order_by(LedgerEntry.id).limit(20))).scalars().all()


async def thumbnails_for(
    sessions: async_sessionmaker[AsyncSession], request_ids: Sequence[str]
) -> dict[str, list[RequestThumbnail]]:
    """Thumbnails of the given requests (one page's worth), by request id."""
    if not request_ids:
        return {}
    query = (
        select(RequestThumbnail)
        .where(RequestThumbnail.request_id.in_(list(request_ids)))
        .order_by(RequestThumbnail.request_id, RequestThumbnail.position)
    )
    found: dict[str, list[RequestThumbnail]] = {}
    async with sessions() as session:
        for row in (await session.execute(query)).scalars():
            found.setdefault(row.request_id, []).append(row)
    return found


async def thumbnail_by_image(
    sessions: async_sessionmaker[AsyncSession], image: str
) -> RequestThumbnail | None:
    async with sessions() as session:
        query = select(RequestThumbnail).where(RequestThumbnail.image == image).limit(1)
        return (await session.execute(query)).scalar_one_or_none()


async def task_page(
    sessions: async_sessionmaker[AsyncSession],
    *,
    key_id: str | None,
    status: str | None,
    before: str | None,
    limit: int,
) -> Page[Task]:
    """Tasks newest first, of one key or of all; ``before`` is the last task id seen."""
    conditions: list[ColumnElement[bool]] = []
    if key_id:
        conditions.append(Task.key_id == key_id)
    if status:
        conditions.append(Task.status == status)
    async with sessions() as session:
        if before:
            anchor = await session.get(Task, before)
            if anchor is None:
                return Page(rows=(), next_before=None)
            conditions.append(Task.created_at <= anchor.created_at)
            conditions.append(or_(Task.created_at < anchor.created_at, Task.id < anchor.id))
        query = (
            select(Task).where(*conditions).order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1)
        )
        rows = (await session.execute(query)).scalars().all()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows=rows, next_before=rows[-1].id if more and rows else None)


def token_kinds(row: LedgerEntry) -> dict[str, Any]:
    return {
        "text_in": row.text_input_tokens,
        "image_in": row.image_input_tokens,
        "text_out": row.text_output_tokens,
        "image_out": row.image_output_tokens,
    }
