"""The ledger: reservations before an upstream call, one settled row per request after it.

Every money movement is a conditional ``UPDATE`` inside one transaction, so it is atomic on
PostgreSQL (row locks) and SQLite (one writer) alike, and no two concurrent requests can both
take the last of a key's credit. Settlement writes the ledger row, releases the reservation and
adds the spend in the same transaction: the ledger's sum and the keys' spend can never disagree.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Result, delete, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.tables import ApiKey, KeyPeriod, LedgerEntry, Reservation, utcnow
from app.errors import QuotaExceededError
from app.images.jobs import TokenUsage

# Extra work done inside a settlement's transaction; False aborts the whole settlement.
TxHook = Callable[[AsyncSession], Awaitable[bool]]


class SettlementAbandoned(Exception):
    """A settlement was rolled back because its ``also`` hook refused (e.g. a task taken over)."""


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


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation held for one request."""

    id: str
    key_id: str
    period: str
    amount_micros: int


def period_of(moment: datetime) -> str:
    """The calendar month (UTC) a charge belongs to."""
    return moment.strftime("%Y-%m")


class LedgerService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, hold_ttl_s: float = 3600) -> None:
        self._sessions = sessions
        self._hold_ttl = timedelta(seconds=hold_ttl_s)
        self._pending: set[asyncio.Future[None]] = set()

    async def reserve(
        self, *, key_id: str, amount_micros: int, request_id: str, ttl_s: float | None = None
    ) -> Hold:
        """Hold ``amount_micros`` of the key's credit, or raise 429 ``insufficient_quota``.

        ``ttl_s`` (default: the configured hold TTL) bounds how long the hold outlives a dead
        process; queued tasks hold theirs for as long as they may wait.

        A caller cancelled midway (its client hung up) must not cut a write transaction in half:
        that would leave the database locked (SQLite) or the hold half-made. The reservation runs
        to its end in its own task, and is then given back.
        """
        work = asyncio.ensure_future(self._reserve(key_id, amount_micros, request_id, ttl_s))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            self._background(self._undo(work))
            raise

    async def _undo(self, work: asyncio.Future[Hold]) -> None:
        try:
            hold = await work
        except Exception:
            return  # nothing was held
        await self._release(hold)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coroutine)
        # Referenced until done: the event loop keeps only weak references to tasks.
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _protected(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a write transaction to its end even if the caller is cancelled meanwhile."""
        await asyncio.shield(self._background(coroutine))

    async def _reserve(self, key_id: str, amount_micros: int, request_id: str, ttl_s: float | None) -> Hold:
        now = utcnow()
        hold = Hold(
            id="hold_" + secrets.token_hex(12),
            key_id=key_id,
            period=period_of(now),
            amount_micros=amount_micros,
        )
        async with self._sessions.begin() as session:
            taken = await session.execute(
                update(ApiKey)
                .where(
                    ApiKey.id == key_id,
                    or_(
                        ApiKey.quota_micros.is_(None),
                        ApiKey.spent_micros + ApiKey.reserved_micros + amount_micros <= ApiKey.quota_micros,
                    ),
                    or_(
                        ApiKey.balance_micros.is_(None),
                        ApiKey.reserved_micros + amount_micros <= ApiKey.balance_micros,
                    ),
                )
                .values(reserved_micros=ApiKey.reserved_micros + amount_micros)
                .returning(ApiKey.monthly_quota_micros)
            )
            taken_row = taken.first()
            if taken_row is None:
                raise QuotaExceededError(await self._why(session, key_id, amount_micros))
            monthly = taken_row[0]
            if monthly is not None and amount_micros > monthly:
                raise QuotaExceededError("This API key has used its monthly quota.")
            if not await self._add_to_period(
                session, key_id, hold.period, reserved=amount_micros, limit=monthly
            ):
                # Leaving the block by exception rolls back the key's reservation above too.
                raise QuotaExceededError("This API key has used its monthly quota.")
            await session.execute(
                insert(Reservation).values(
                    id=hold.id,
                    key_id=key_id,
                    period=hold.period,
                    amount_micros=amount_micros,
                    request_id=request_id,
                    created_at=now,
                    expires_at=now + (timedelta(seconds=ttl_s) if ttl_s is not None else self._hold_ttl),
                )
            )
        return hold

    async def settle(self, hold: Hold | None, record: LedgerRecord, *, also: TxHook | None = None) -> None:
        """See ``_settle``; runs to its end even if the caller is cancelled."""
        await self._protected(self._settle(hold, record, also))

    async def _settle(self, hold: Hold | None, record: LedgerRecord, also: TxHook | None) -> None:
        """Write the request's ledger row, charge its cost and release its hold, atomically.

        ``also`` runs in the same transaction (a task recording its outcome); if it returns False
        nothing is committed, so an outcome and its charge are never separated.
        """
        async with self._sessions.begin() as session:
            released = 0
            if hold is not None:
                gone = await session.execute(delete(Reservation).where(Reservation.id == hold.id))
                # A hold the reconciler already released must not be released twice.
                released = hold.amount_micros if _rows(gone) == 1 else 0
            await self._move(
                session,
                record.key_id,
                hold.period if hold else period_of(utcnow()),
                released,
                record.cost_micros,
            )
            await session.execute(insert(LedgerEntry).values(**_entry(record)))
            if also is not None and not await also(session):
                raise SettlementAbandoned("the outcome could not be recorded; the charge was not made")

    async def release(self, hold: Hold) -> None:
        """Give a hold back with no charge (the request never reached an upstream)."""
        await self._protected(self._release(hold))

    async def _release(self, hold: Hold) -> None:
        async with self._sessions.begin() as session:
            gone = await session.execute(delete(Reservation).where(Reservation.id == hold.id))
            if _rows(gone) == 1:
                await self._move(session, hold.key_id, hold.period, hold.amount_micros, 0)

    async def release_expired(self, now: datetime | None = None) -> int:
        """Release holds of requests whose process died (their TTL passed); returns how many."""
        now = now or utcnow()
        released = 0
        async with self._sessions() as session:
            stale = (
                (await session.execute(select(Reservation).where(Reservation.expires_at < now)))
                .scalars()
                .all()
            )
        for row in stale:
            released += 1 if await self._release_row(row.id) else 0
        return released

    async def _release_row(self, hold_id: str) -> bool:
        async with self._sessions.begin() as session:
            row = await session.get(Reservation, hold_id)
            if row is None:
                return False
            await session.delete(row)
            await self._move(session, row.key_id, row.period, row.amount_micros, 0)
            return True

    async def _move(self, session: AsyncSession, key_id: str, period: str, released: int, cost: int) -> None:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id)
            .values(
                reserved_micros=ApiKey.reserved_micros - released,
                spent_micros=ApiKey.spent_micros + cost,
                balance_micros=ApiKey.balance_micros - cost,  # NULL stays NULL: no balance kept
            )
        )
        await self._add_to_period(session, key_id, period, reserved=-released, spent=cost)

    async def _add_to_period(
        self,
        session: AsyncSession,
        key_id: str,
        period: str,
        *,
        reserved: int = 0,
        spent: int = 0,
        limit: int | None = None,
    ) -> bool:
        """Add to a key's month in one upsert; with ``limit``, only if the month stays within it."""
        dialect = session.bind.dialect.name if session.bind is not None else ""
        upsert = pg_insert if dialect == "postgresql" else sqlite_insert
        statement = upsert(KeyPeriod).values(
            key_id=key_id, period=period, spent_micros=spent, reserved_micros=reserved
        )
        changed = await session.execute(
            statement.on_conflict_do_update(
                index_elements=[KeyPeriod.key_id, KeyPeriod.period],
                set_={
                    "reserved_micros": KeyPeriod.reserved_micros + reserved,
                    "spent_micros": KeyPeriod.spent_micros + spent,
                },
                where=(KeyPeriod.spent_micros + KeyPeriod.reserved_micros + reserved <= limit)
                if limit is not None
                else None,
            )
        )
        return _rows(changed) == 1

    async def _why(self, session: AsyncSession, key_id: str, amount: int) -> str:
        row = await session.get(ApiKey, key_id)
        if (
            row is not None
            and row.balance_micros is not None
            and row.reserved_micros + amount > row.balance_micros
        ):
            return "This API key's balance is too low for this request; top it up to continue."
        return "This API key has used its quota; this request would exceed it."

    async def record(self, record: LedgerRecord) -> None:
        """A ledger row with no hold (kept for callers that reserve nothing)."""
        await self.settle(None, record)


def _rows(result: Result[Any]) -> int:
    """Rows matched by an UPDATE/DELETE (SQLAlchemy types execute() as a plain Result)."""
    return cast(CursorResult[Any], result).rowcount


def _entry(record: LedgerRecord) -> dict[str, Any]:
    usage = record.usage or TokenUsage()
    return dict(
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
    )
