"""Read-only, paginated queries behind the console's list pages.

Every list is a keyset page (``before`` = the last id seen) over an index, never OFFSET and never
an unbounded read: the request log on ``ix_request_log_key_created`` with a key,
``ix_request_log_class_created`` with a status class, else ``ix_request_log_created``; tasks on
``ix_tasks_key_created`` / ``ix_tasks_created``. Other filters are applied while walking the index,
so a page stops after ``limit`` matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.tables import (
    ApiKey,
    KeyPeriod,
    LedgerEntry,
    RequestLogEntry,
    RequestThumbnail,
    Task,
    WebhookDelivery,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    rows: Sequence[T]
    next_before: int | str | None
    # A text search looks through at most SEARCH_WINDOW entries a page: this is the oldest it saw.
    searched_back_to: datetime | None = None


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


@dataclass(frozen=True, slots=True)
class LogFilter:
    """The Requests page's filters over the request log (app/console/requestlog.py)."""

    key_id: str | None = None
    # A request id (``req_…``), or text found in the key's name or the error's code or message.
    q: str | None = None
    status_class: str | None = None
    model: str | None = None
    upstream: str | None = None
    since: datetime | None = None
    until: datetime | None = None


# Keys whose name matches a search, at most: a search is narrowed by key id over the key index.
MAX_NAME_MATCHES = 200
# A text search (error text, key name) has no index to walk: each page looks through at most this
# many entries (newest first, the other filters applied), then offers to go on from there. A rare
# match costs a bounded walk per page instead of a scan of the whole log.
SEARCH_WINDOW = 10_000


async def log_page(
    sessions: async_sessionmaker[AsyncSession],
    where: LogFilter,
    *,
    before: int | None,
    limit: int,
) -> Page[RequestLogEntry]:
    """Request log entries newest first (by time, then id), ``limit`` at a time.

    Walked on ``ix_request_log_key_created`` with a key, ``ix_request_log_class_created`` with a
    status class, else ``ix_request_log_created``; a request id is looked up on its own index."""
    conditions: list[ColumnElement[bool]] = []
    for column, value in (
        (RequestLogEntry.key_id, where.key_id),
        (RequestLogEntry.status_class, where.status_class),
        (RequestLogEntry.model, where.model),
        (RequestLogEntry.upstream, where.upstream),
    ):
        if value:
            conditions.append(column == value)
    if where.since is not None:
        conditions.append(RequestLogEntry.created_at >= where.since)
    if where.until is not None:
        conditions.append(RequestLogEntry.created_at < where.until)
    async with sessions() as session:
        if before is not None:
            anchor = await session.get(RequestLogEntry, before)
            if anchor is None:
                return Page(rows=(), next_before=None)
            conditions.append(RequestLogEntry.created_at <= anchor.created_at)
            conditions.append(
                or_(RequestLogEntry.created_at < anchor.created_at, RequestLogEntry.id < anchor.id)
            )
        newest_first = (RequestLogEntry.created_at.desc(), RequestLogEntry.id.desc())
        edge: tuple[int, datetime] | None = None
        if where.q:
            search, by_text = await _search(session, where.q)
            if by_text:
                # The window's last entry: the search stops there, and the next page starts after it.
                found_edge = (
                    await session.execute(
                        select(RequestLogEntry.id, RequestLogEntry.created_at)
                        .where(*conditions)
                        .order_by(*newest_first)
                        .offset(SEARCH_WINDOW - 1)
                        .limit(1)
                    )
                ).first()
                if found_edge is not None:
                    edge = (int(found_edge[0]), found_edge[1])
                    conditions.append(RequestLogEntry.created_at >= edge[1])
                    conditions.append(
                        or_(RequestLogEntry.created_at > edge[1], RequestLogEntry.id >= edge[0])
                    )
            conditions.append(search)
        query = select(RequestLogEntry).where(*conditions).order_by(*newest_first).limit(limit + 1)
        rows = (await session.execute(query)).scalars().all()
    more = len(rows) > limit
    rows = rows[:limit]
    if more and rows:
        return Page(rows=rows, next_before=rows[-1].id)
    if edge is not None:
        # The window ran out before the page filled: go on below it (the edge itself was seen).
        return Page(rows=rows, next_before=edge[0], searched_back_to=edge[1])
    return Page(rows=rows, next_before=None)


async def _search(session: AsyncSession, q: str) -> tuple[ColumnElement[bool], bool]:
    """The search's condition, and whether it is a text search (no index: walked in windows)."""
    text = q.strip()
    if text.startswith("req_") and " " not in text:
        return RequestLogEntry.request_id == text, False
    named = (
        (
            await session.execute(
                select(ApiKey.id).where(ApiKey.name.icontains(text, autoescape=True)).limit(MAX_NAME_MATCHES)
            )
        )
        .scalars()
        .all()
    )
    found: list[ColumnElement[bool]] = [
        RequestLogEntry.error_message.icontains(text, autoescape=True),
        RequestLogEntry.error_code == text,
        # The name the key had when the request came in (it may have been renamed since).
        RequestLogEntry.key_name.icontains(text, autoescape=True),
    ]
    if named:
        found.append(RequestLogEntry.key_id.in_(named))
    return or_(*found), True


async def log_entries(
    sessions: async_sessionmaker[AsyncSession], request_id: str, *, key_id: str | None
) -> Sequence[RequestLogEntry]:
    """The log entries of one request id; for a tenant (``key_id`` set) only their own."""
    query = select(RequestLogEntry).where(RequestLogEntry.request_id == request_id)
    if key_id is not None:
        query = query.where(RequestLogEntry.key_id == key_id)
    async with sessions() as session:
        return (await session.execute(query.order_by(RequestLogEntry.id).limit(20))).scalars().all()


async def key_names(
    sessions: async_sessionmaker[AsyncSession], key_ids: Iterable[str | None]
) -> dict[str, str]:
    """Current names of the given keys (one page's worth), by id."""
    wanted = sorted({key_id for key_id in key_ids if key_id})
    if not wanted:
        return {}
    async with sessions() as session:
        rows = await session.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.id.in_(wanted)))
        return {key_id: name for key_id, name in rows}


async def task_deliveries(
    sessions: async_sessionmaker[AsyncSession], task_id: str
) -> Sequence[WebhookDelivery]:
    """A task's webhook deliveries, oldest first (a task has a few: one per endpoint and event)."""
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.task_id == task_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        .limit(100)
    )
    async with sessions() as session:
        return (await session.execute(query)).scalars().all()


async def any_task(sessions: async_sessionmaker[AsyncSession], task_id: str) -> Task | None:
    """A task by id, whoever's it is (the caller checks who may see it)."""
    async with sessions() as session:
        return await session.get(Task, task_id)


@dataclass(frozen=True, slots=True)
class Account:
    """What a signed-in tenant sees of their own key: who, how much is left, and the limits."""

    key: ApiKey
    month_spent_micros: int
    month_reserved_micros: int


async def account(sessions: async_sessionmaker[AsyncSession], key_id: str, period: str) -> Account | None:
    async with sessions() as session:
        key = await session.get(ApiKey, key_id)
        if key is None:
            return None
        month = await session.get(KeyPeriod, (key_id, period))
    return Account(
        key=key,
        month_spent_micros=month.spent_micros if month else 0,
        month_reserved_micros=month.reserved_micros if month else 0,
    )
