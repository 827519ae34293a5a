"""Requests per day by status class (ok, 4xx, 5xx, blocked), from the request log, for the stacked
chart on the overview and usage pages.

Like ``ActivityCache`` for the ledger, the counts of a day that is over are kept in memory: log
entries carry the time of their request, so once a day has ended (plus ``grace``, for entries still
queued for their batch) its counts do not change until the purge drops the whole day. A page view
then reads only today's entries, over ``ix_request_log_created``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from datetime import date, datetime, time, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.console.requestlog import STATUS_CLASSES
from app.db.tables import RequestLogEntry, utcnow

DAY = timedelta(days=1)
Counts = dict[str, int]


class StatusMix:
    def __init__(
        self,
        *,
        grace: timedelta = timedelta(minutes=10),
        max_days: int = 20_000,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._grace = grace
        self._max = max_days
        self._clock = clock
        self._days: OrderedDict[tuple[str | None, str], Counts] = OrderedDict()

    async def per_day(
        self, sessions: async_sessionmaker[AsyncSession], *, key_id: str | None, first: date, last: date
    ) -> dict[str, Counts]:
        """Counts per status class for each day from ``first`` to ``last`` (inclusive, UTC)."""
        closed = (self._clock() - self._grace).date()
        days = [first + DAY * i for i in range((last - first).days + 1)]
        out: dict[str, Counts] = {}
        missing = [d for d in days if d >= closed or (key_id, d.isoformat()) not in self._days]
        if missing:
            fetched = await _count(sessions, key_id=key_id, first=missing[0], last=missing[-1])
            for d in missing:
                counts = fetched.get(d.isoformat(), {})
                if d < closed:
                    self._remember((key_id, d.isoformat()), counts)
                out[d.isoformat()] = counts
        for d in days:
            label = d.isoformat()
            if label not in out:
                self._days.move_to_end((key_id, label))
                out[label] = self._days[(key_id, label)]
        return {d.isoformat(): out[d.isoformat()] for d in days}

    def _remember(self, key: tuple[str | None, str], counts: Counts) -> None:
        self._days[key] = counts
        while len(self._days) > self._max:
            self._days.popitem(last=False)


async def _count(
    sessions: async_sessionmaker[AsyncSession], *, key_id: str | None, first: date, last: date
) -> dict[str, Counts]:
    start = datetime.combine(first, time(0), tzinfo=utcnow().tzinfo)
    end = datetime.combine(last, time(0), tzinfo=start.tzinfo) + DAY
    async with sessions() as session:
        dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
        if dialect == "postgresql":
            day = func.to_char(func.timezone("UTC", RequestLogEntry.created_at), "YYYY-MM-DD")
        else:  # SQLite keeps the UTC time as text "YYYY-MM-DD HH:MM:SS…"
            day = func.substr(RequestLogEntry.created_at, 1, 10)
        query = select(day, RequestLogEntry.status_class, func.count()).where(
            RequestLogEntry.created_at >= start, RequestLogEntry.created_at < end
        )
        if key_id is not None:
            query = query.where(RequestLogEntry.key_id == key_id)
        rows = await session.execute(query.group_by(day, RequestLogEntry.status_class))
    found: dict[str, Counts] = {}
    for label, status_class, count in rows:
        if status_class in STATUS_CLASSES:
            found.setdefault(str(label), {})[status_class] = int(count)
    return found
