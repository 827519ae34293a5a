"""The keys list's rows: each key with its budget use, this month's spend and when it was last used.

Money stays in integer micro-units here (the bars divide them); the template formats it. "Last
used" is the key's newest request-log entry: one index probe per key on
``ix_request_log_key_created`` (a correlated ``max``), never a scan of the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.keys import KeyStatus, key_status
from app.db.tables import ApiKey, KeyPeriod, RequestLogEntry

# The list is for a human: past this many matches, the search box narrows it.
MAX_KEYS = 1_000


@dataclass(frozen=True, slots=True)
class Budget:
    """Spend against a limit (``limit`` None: no limit, so no bar)."""

    used: int
    limit: int | None

    @property
    def percent(self) -> int:
        if not self.limit:
            return 0
        return min(100, (self.used * 100) // self.limit)

    @property
    def level(self) -> str:
        """For the bar's colour: ok below 80 %, warn below 100 %, full at the limit."""
        if self.limit is None:
            return "none"
        return "full" if self.percent >= 100 else "warn" if self.percent >= 80 else "ok"


@dataclass(frozen=True, slots=True)
class KeyRow:
    key: ApiKey
    status: KeyStatus
    total: Budget
    monthly: Budget
    last_used: datetime | None

    @property
    def id(self) -> str:
        return self.key.id


async def key_rows(
    sessions: async_sessionmaker[AsyncSession], *, period: str, q: str = "", state: str = ""
) -> tuple[list[KeyRow], bool]:
    """Keys newest first, matching ``q`` (name, owner, id or prefix) and ``state``; and whether
    the list was cut at ``MAX_KEYS``."""
    last_used = (
        select(func.max(RequestLogEntry.created_at))
        .where(RequestLogEntry.key_id == ApiKey.id)
        .correlate(ApiKey)
        .scalar_subquery()
    )
    query = (
        select(ApiKey, KeyPeriod.spent_micros, last_used)
        .outerjoin(KeyPeriod, (KeyPeriod.key_id == ApiKey.id) & (KeyPeriod.period == period))
        .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    )
    needle = q.strip().lower()
    if needle:
        pattern = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(
            or_(
                *(
                    func.lower(column).like(pattern, escape="\\")
                    for column in (ApiKey.name, ApiKey.owner, ApiKey.id, ApiKey.prefix)
                )
            )
        )
    async with sessions() as session:
        found = (await session.execute(query.limit(MAX_KEYS + 1))).all()
    rows: list[KeyRow] = []
    for key, month_spent, used in found[:MAX_KEYS]:
        status = key_status(key)
        if state and status != state:
            continue
        rows.append(
            KeyRow(
                key=key,
                status=status,
                total=Budget(key.spent_micros, key.quota_micros),
                monthly=Budget(month_spent or 0, key.monthly_quota_micros),
                last_used=used,
            )
        )
    return rows, len(found) > MAX_KEYS


async def key_choices(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[str, str]]:
    """Every key as ``(id, name)`` by name, for the pages' key filters (a name, not an id to type)."""
    async with sessions() as session:
        rows = await session.execute(
            select(ApiKey.id, ApiKey.name).order_by(ApiKey.name, ApiKey.id).limit(MAX_KEYS)
        )
        return [(key_id, name) for key_id, name in rows]
