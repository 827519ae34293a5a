"""Usage reports: totals of the ledger by day or by model, for one key or all."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.errors import InvalidRequestError
from app.db.tables import LedgerEntry
from app.domain.money import format_micros

GroupBy = Literal["day", "month", "model", "key", "batch"]
# The moments a report may name: the ledger holds nothing before 1970, and a bound near year 9999
# overflows as soon as a day is added to it (the console's inclusive ``to``) or a zone applied.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)  # exclusive
_RANGE_TEXT = "between 1970-01-01 and 9998-12-31"


def parse_moment(value: str | None, param: str) -> datetime | None:
    """Unix seconds or ISO 8601 (a date alone means its midnight UTC), in range, or a 400.

    The one parser of a report bound, shared by the usage API and the console.
    """
    if value is None or value == "":
        return None
    try:
        if value.isdigit():
            if len(value) > 12:
                raise ValueError(value)
            moment = datetime.fromtimestamp(int(value), UTC)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            # In UTC now: a moment near the calendar's ends can overflow the conversion (9999-12-31
            # at -01:00 is in year 10000), which would otherwise fail where it is stored or compared.
            moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidRequestError(
            f"Invalid '{param}': expected unix seconds or an ISO 8601 date-time {_RANGE_TEXT}.", param=param
        ) from None
    if not EARLIEST <= moment < LATEST:
        raise InvalidRequestError(f"Invalid '{param}': dates must be {_RANGE_TEXT}.", param=param)
    return moment


def parse_day(value: str | None, param: str) -> date | None:
    """An ISO 8601 day (``YYYY-MM-DD``) in range, or a 400; None when absent."""
    if value is None or value == "":
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"Invalid '{param}': expected a date as YYYY-MM-DD.", param=param) from None
    if not EARLIEST.date() <= day < LATEST.date():
        raise InvalidRequestError(f"Invalid '{param}': dates must be {_RANGE_TEXT}.", param=param)
    return day


COLUMNS = (
    "requests",
    "images",
    "text_input_tokens",
    "image_input_tokens",
    "text_output_tokens",
    "image_output_tokens",
    # An SVG request's author-model tokens and their cost (already part of cost_micros).
    "svg_input_tokens",
    "svg_output_tokens",
    "svg_reasoning_tokens",
    "svg_cost_micros",
    "cost_micros",
    # What interrupted tasks' upstream calls may have cost the operator (never charged).
    "operator_cost_micros",
)
# The summed ledger column of each report column after "requests" (a count).
_SUMMED = COLUMNS[1:]


@dataclass(frozen=True, slots=True)
class UsageFilter:
    key_id: str | None = None
    model: str | None = None
    start: datetime | None = None  # inclusive
    end: datetime | None = None  # exclusive


@dataclass(frozen=True, slots=True)
class UsageRow:
    group: str | None
    requests: int
    images: int
    text_input_tokens: int
    image_input_tokens: int
    text_output_tokens: int
    image_output_tokens: int
    svg_input_tokens: int
    svg_output_tokens: int
    svg_reasoning_tokens: int
    svg_cost_micros: int
    cost_micros: int
    operator_cost_micros: int

    def as_dict(self, group_by: str | None) -> dict[str, Any]:
        row: dict[str, Any] = {group_by: self.group} if group_by else {}
        row.update({name: getattr(self, name) for name in COLUMNS})
        row["cost"] = format_micros(self.cost_micros)
        return row


@dataclass(frozen=True, slots=True)
class UsageReport:
    group_by: GroupBy | None
    price_unit: str
    filter: UsageFilter
    rows: list[UsageRow]
    totals: UsageRow

    def as_dict(self) -> dict[str, Any]:
        def ts(value: datetime | None) -> int | None:
            return int(value.timestamp()) if value is not None else None

        return {
            "object": "usage_report",
            "group_by": self.group_by,
            "price_unit": self.price_unit,
            "key_id": self.filter.key_id,
            "model": self.filter.model,
            "from": ts(self.filter.start),
            "to": ts(self.filter.end),
            "data": [row.as_dict(self.group_by) for row in self.rows],
            "totals": self.totals.as_dict(None),
        }

    def as_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        header = [self.group_by or "group", *COLUMNS, "cost"]
        writer.writerow(header)
        for row in [*self.rows, self.totals]:
            group = row.group if row is not self.totals else "total"
            writer.writerow([group, *(getattr(row, c) for c in COLUMNS), format_micros(row.cost_micros)])
        return out.getvalue()


def _group_column(group_by: GroupBy, dialect: str) -> ColumnElement[Any]:
    if group_by == "model":
        return LedgerEntry.model.expression
    if group_by == "key":
        return LedgerEntry.key_id.expression
    if group_by == "batch":  # requests outside any batch form the null group
        return LedgerEntry.batch_id.expression
    month = group_by == "month"
    if dialect == "postgresql":
        return func.to_char(
            func.timezone("UTC", LedgerEntry.created_at), "YYYY-MM" if month else "YYYY-MM-DD"
        )
    # SQLite stores the UTC datetime as text "YYYY-MM-DD HH:MM:SS…".
    return func.substr(LedgerEntry.created_at, 1, 7 if month else 10)


async def usage_report(
    sessions: async_sessionmaker[AsyncSession],
    *,
    where: UsageFilter,
    group_by: GroupBy | None,
    price_unit: str,
) -> UsageReport:
    sums = [func.count(LedgerEntry.id), *(_sum(name) for name in _SUMMED)]
    conditions = _conditions(where)
    async with sessions() as session:
        dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
        total = (await session.execute(select(*sums).where(*conditions))).one()
        rows: list[UsageRow] = []
        if group_by is not None:
            group = _group_column(group_by, dialect).label("grp")
            result = await session.execute(
                select(group, *sums).where(*conditions).group_by(group).order_by(group)
            )
            rows = [UsageRow(str(r[0]), *(int(v) for v in r[1:])) for r in result]
    return UsageReport(
        group_by=group_by,
        price_unit=price_unit,
        filter=where,
        rows=rows,
        totals=UsageRow(None, *(int(v) for v in total)),
    )


@dataclass(frozen=True, slots=True)
class ActivityRow:
    """Traffic of one day, model or key, for the console: volume, spend, tokens, errors, latency."""

    group: str
    requests: int
    images: int
    text_input_tokens: int
    image_input_tokens: int
    text_output_tokens: int
    image_output_tokens: int
    cost_micros: int
    errors: int
    latency_ms_total: int


async def activity(
    sessions: async_sessionmaker[AsyncSession], *, where: UsageFilter, group_by: GroupBy
) -> list[ActivityRow]:
    """``usage_report``'s sums plus errors and latency, per day, model or key, in one query (an
    index range scan on ``created_at``, or ``key_id, created_at`` for one key)."""
    return [row for _, row in await activity_per_day(sessions, where=where, group_by=group_by, per_day=False)]


async def activity_per_day(
    sessions: async_sessionmaker[AsyncSession], *, where: UsageFilter, group_by: GroupBy, per_day: bool = True
) -> list[tuple[str, ActivityRow]]:
    """As ``activity``, split by day as well (``(day, row)`` pairs), for caching whole days."""
    conditions = _conditions(where)
    async with sessions() as session:
        dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
        group = _group_column(group_by, dialect).label("grp")
        day = _group_column("day", dialect).label("day") if per_day else group
        failed = func.sum(case((LedgerEntry.status != "succeeded", 1), else_=0))
        query = (
            select(
                day,
                group,
                func.count(LedgerEntry.id),
                *(_sum(name) for name in _ACTIVITY_SUMMED),
                func.coalesce(failed, 0),
                func.coalesce(func.sum(LedgerEntry.latency_ms), 0),
            )
            .where(*conditions)
            .group_by(day, group)
        )
        result = await session.execute(query)
        return [(str(r[0]), ActivityRow(str(r[1]), *(int(v) for v in r[2:]))) for r in result]


# The console's activity keeps to the image's own columns (its cost already includes an SVG author's).
# The console's activity rows: volume, tokens and the tenant's cost (no SVG detail, no operator cost).
_ACTIVITY_SUMMED = tuple(
    name for name in _SUMMED if not name.startswith("svg_") and name != "operator_cost_micros"
)


def _sum(column: str) -> ColumnElement[Any]:
    return func.coalesce(func.sum(getattr(LedgerEntry, column)), 0)


def _conditions(where: UsageFilter) -> list[ColumnElement[bool]]:
    """The ledger rows a report covers: one key, one model, a time range (each optional)."""
    conditions: list[ColumnElement[bool]] = []
    if where.key_id is not None:
        conditions.append(LedgerEntry.key_id == where.key_id)
    if where.model is not None:
        conditions.append(LedgerEntry.model == where.model)
    if where.start is not None:
        conditions.append(LedgerEntry.created_at >= where.start)
    if where.end is not None:
        conditions.append(LedgerEntry.created_at < where.end)
    return conditions
