"""Per-group ledger totals as the console's charts and cards use them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.billing.reports import ActivityRow, GroupBy, UsageFilter, activity, activity_per_day
from app.db.tables import utcnow

DAY = timedelta(days=1)
MAX_CACHED_RANGE = timedelta(days=367)


@dataclass(slots=True)
class Totals:
    requests: int = 0
    images: int = 0
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    text_output_tokens: int = 0
    image_output_tokens: int = 0
    cost_micros: int = 0
    errors: int = 0
    latency_ms_total: int = 0

    def add(self, row: ActivityRow) -> None:
        self.requests += row.requests
        self.images += row.images
        self.text_input_tokens += row.text_input_tokens
        self.image_input_tokens += row.image_input_tokens
        self.text_output_tokens += row.text_output_tokens
        self.image_output_tokens += row.image_output_tokens
        self.cost_micros += row.cost_micros
        self.errors += row.errors
        self.latency_ms_total += row.latency_ms_total

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def latency_avg_ms(self) -> float:
        return self.latency_ms_total / self.requests if self.requests else 0.0


def by_group(rows: Iterable[ActivityRow]) -> dict[str, Totals]:
    """Totals per group (day, model or key), in group order."""
    groups: dict[str, Totals] = {}
    for row in rows:
        groups.setdefault(row.group, Totals()).add(row)
    return dict(sorted(groups.items()))


def total(rows: Iterable[ActivityRow]) -> Totals:
    whole = Totals()
    for row in rows:
        whole.add(row)
    return whole


CacheKey = tuple[str | None, str | None, str, str]


class ActivityCache:
    """Per-day totals of days that are over, kept in memory: a page reads only today's rows.

    Ledger rows are written with the time they settle, so a day that has ended never changes: once
    ``grace`` past its midnight (for replicas whose clocks lag) it is read once, then served from
    here. A 30-day usage page at 10,000 ledger rows then reads ~300 rows per view instead of all
    of them (BENCHMARKS.md, "Console"). Bounded by ``max_days`` cached (filter, grouping, day) cells.

    Safe per node, so never invalidated across nodes (SPEC §10): a cell holds only a day that is
    over, and the ledger is append-only with ``created_at`` set when a row is written, so no node
    can change what another cached. Key names, statuses and today's rows are read per page view.
    A writer that back-dated ledger rows would break this and must clear the cache on every node.
    """

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
        self._days: OrderedDict[CacheKey, list[ActivityRow]] = OrderedDict()

    async def rows(
        self, sessions: async_sessionmaker[AsyncSession], *, where: UsageFilter, group_by: GroupBy
    ) -> list[ActivityRow]:
        start, end = where.start, where.end
        # Only ranges of whole days, and at most a year of them: the cells are per day, and a
        # longer range would only walk and evict the cache (the console draws it by month).
        if (
            start is None
            or end is None
            or start.timetz().replace(tzinfo=None) != time(0)
            or end - start > MAX_CACHED_RANGE
        ):
            return await activity(sessions, where=where, group_by=group_by)
        now = self._clock()
        closed_until = datetime.combine((now - self._grace).date(), time(0), tzinfo=start.tzinfo)
        split = max(start, min(end, closed_until))
        found: list[ActivityRow] = []
        if start < split:
            days = [(start + DAY * i).date().isoformat() for i in range((split - start) // DAY)]
            keys = [(where.key_id, where.model, group_by, day) for day in days]
            missing = [key for key in keys if key not in self._days]
            if missing:
                first = datetime.fromisoformat(missing[0][3]).replace(tzinfo=start.tzinfo)
                last = datetime.fromisoformat(missing[-1][3]).replace(tzinfo=start.tzinfo) + DAY
                fetched: dict[str, list[ActivityRow]] = {key[3]: [] for key in missing}
                span = replace(where, start=first, end=last)
                for day, row in await activity_per_day(sessions, where=span, group_by=group_by):
                    if day in fetched:
                        fetched[day].append(row)
                for key in missing:
                    self._remember(key, fetched[key[3]])
            for key in keys:
                cell = self._days.get(key)
                if cell is not None:
                    self._days.move_to_end(key)
                    found.extend(cell)
        if split < end:
            found.extend(await activity(sessions, where=replace(where, start=split), group_by=group_by))
        return found

    def _remember(self, key: CacheKey, rows: list[ActivityRow]) -> None:
        self._days[key] = rows
        while len(self._days) > self._max:
            self._days.popitem(last=False)
