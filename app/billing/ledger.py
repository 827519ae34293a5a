"""The ledger: reservations before an upstream call, one settled row per request after it.

Every money movement is a conditional ``UPDATE`` inside one transaction, so it is atomic on
PostgreSQL (row locks) and SQLite (one writer) alike, and no two concurrent requests can both
take the last of a key's credit. Settlement writes the ledger row, releases the reservation and
adds the spend in the same transaction: the ledger's sum and the keys' spend can never disagree.

The transactions are plain functions over a Core connection with statements built once per
dialect, run by the database ``Writer`` (app/db/writer.py): this is the hottest path of the
gateway, two transactions per request, and the async ORM made it most of a request's CPU.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property, partial
from typing import Any, TypeVar

from sqlalchemy import BigInteger, Connection, bindparam, delete, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from app.billing.svg import SvgCharge
from app.db.prepared import Executed, Prepared
from app.db.tables import ApiKey, KeyPeriod, LedgerEntry, Reservation, utcnow
from app.db.writer import WouldBlock, Writer
from app.domain.jobs import TokenUsage
from app.errors import QuotaExceededError

T = TypeVar("T")

# Extra work done inside a settlement's transaction; False aborts the whole settlement.
TxHook = Callable[[Connection], bool]


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
    # What the request's hold reserved, and how much the charge went beyond it (an overrun).
    reserved_micros: int = 0
    overrun_micros: int = 0
    # SVG output: the author's tokens and cost (already part of cost_micros).
    svg: SvgCharge | None = None


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


HOLD_COLUMNS = ("id", "key_id", "period", "amount_micros", "request_id", "created_at", "expires_at")
ENTRY_COLUMNS = (
    "request_id",
    "key_id",
    "model",
    "upstream",
    "endpoint",
    "status",
    "images",
    "text_input_tokens",
    "image_input_tokens",
    "text_output_tokens",
    "image_output_tokens",
    "cost_micros",
    "estimated",
    "latency_ms",
    "error_code",
    "usage",
    "reserved_micros",
    "overrun_micros",
    "created_at",
    "svg_model",
    "svg_input_tokens",
    "svg_output_tokens",
    "svg_reasoning_tokens",
    "svg_cost_micros",
)


class _Statements:
    """The ledger's statements for one dialect, built and compiled once (see app/db/prepared.py:
    on SQLite, SQLAlchemy's per-execution work costs several times the statement itself)."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        amount = bindparam("amount", type_=BigInteger)
        self.take = Prepared(
            update(ApiKey)
            .where(
                ApiKey.id == bindparam("key"),
                or_(
                    ApiKey.quota_micros.is_(None),
                    ApiKey.spent_micros + ApiKey.reserved_micros + amount <= ApiKey.quota_micros,
                ),
                or_(
                    ApiKey.balance_micros.is_(None),
                    ApiKey.reserved_micros + amount <= ApiKey.balance_micros,
                ),
            )
            .values(reserved_micros=ApiKey.reserved_micros + amount)
            .returning(ApiKey.monthly_quota_micros)
        )
        self.move = Prepared(
            update(ApiKey)
            .where(ApiKey.id == bindparam("key"))
            .values(
                reserved_micros=ApiKey.reserved_micros - bindparam("released"),
                spent_micros=ApiKey.spent_micros + bindparam("cost"),
                balance_micros=ApiKey.balance_micros - bindparam("cost"),  # NULL stays NULL
            )
        )
        self.period_within = Prepared(self._period(limited=True))
        self.period = Prepared(self._period(limited=False))
        self.hold = Prepared(insert(Reservation), columns=HOLD_COLUMNS)
        self.unhold = Prepared(delete(Reservation).where(Reservation.id == bindparam("hold")))
        self.entry = Prepared(insert(LedgerEntry), columns=ENTRY_COLUMNS)
        self.key = Prepared(
            select(ApiKey.balance_micros, ApiKey.reserved_micros).where(ApiKey.id == bindparam("key"))
        )

    def _period(self, *, limited: bool) -> Any:
        """Add to a key's month in one upsert; ``limited``: only if the month stays within ``limit``."""
        upsert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        reserved = bindparam("reserved", type_=BigInteger)
        spent = bindparam("spent", type_=BigInteger)
        statement = upsert(KeyPeriod).values(
            key_id=bindparam("key"), period=bindparam("period"), spent_micros=spent, reserved_micros=reserved
        )
        return statement.on_conflict_do_update(
            index_elements=[KeyPeriod.key_id, KeyPeriod.period],
            set_={
                "reserved_micros": KeyPeriod.reserved_micros + reserved,
                "spent_micros": KeyPeriod.spent_micros + spent,
            },
            where=(
                KeyPeriod.spent_micros + KeyPeriod.reserved_micros + reserved
                <= bindparam("limit", type_=BigInteger)
            )
            if limited
            else None,
        )


class LedgerService:
    def __init__(self, writer: Writer, *, hold_ttl_s: float = 3600) -> None:
        self._writer = writer
        self._hold_ttl = timedelta(seconds=hold_ttl_s)
        self._pending: set[asyncio.Future[Any]] = set()

    @cached_property
    def _sql(self) -> _Statements:
        return _Statements(self._writer.dialect)

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
        now = utcnow()
        hold = Hold(
            id="hold_" + secrets.token_hex(12),
            key_id=key_id,
            period=period_of(now),
            amount_micros=amount_micros,
        )
        expires = now + (timedelta(seconds=ttl_s) if ttl_s is not None else self._hold_ttl)
        reserve = partial(self._reserve, hold=hold, request_id=request_id, now=now, expires=expires)
        try:
            self._writer.run_now(reserve)  # nothing to cancel: it runs to its end right here
            return hold
        except WouldBlock:
            pass
        work = self._background(self._writer.run(reserve))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            self._background(self._undo(work, hold))
            raise
        return hold

    async def _undo(self, work: asyncio.Future[None], hold: Hold) -> None:
        try:
            await work
        except Exception:
            return  # nothing was held
        await self._writer.run(lambda c: self._release(c, hold))

    def _background(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        task = asyncio.ensure_future(coroutine)
        # Referenced until done: the event loop keeps only weak references to tasks.
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _protected(self, work: Callable[[Connection], None]) -> None:
        """Run a write transaction to its end even if the caller is cancelled meanwhile."""
        try:
            self._writer.run_now(work)
            return
        except WouldBlock:
            pass
        await asyncio.shield(self._background(self._writer.run(work)))

    def _reserve(self, c: Connection, hold: Hold, request_id: str, now: datetime, expires: datetime) -> None:
        sql, amount = self._sql, hold.amount_micros
        taken = sql.take.execute(c, {"key": hold.key_id, "amount": amount}).first()
        if taken is None:
            raise QuotaExceededError(self._why(c, hold.key_id, amount))
        monthly = taken[0]
        if monthly is not None and amount > monthly:
            raise QuotaExceededError("This API key has used its monthly quota.")
        if not self._add_to_period(c, hold.key_id, hold.period, reserved=amount, limit=monthly):
            # Leaving by exception rolls back the key's reservation above too.
            raise QuotaExceededError("This API key has used its monthly quota.")
        sql.hold.execute(
            c,
            {
                "id": hold.id,
                "key_id": hold.key_id,
                "period": hold.period,
                "amount_micros": amount,
                "request_id": request_id,
                "created_at": now,
                "expires_at": expires,
            },
        )

    async def settle(self, hold: Hold | None, record: LedgerRecord, *, also: TxHook | None = None) -> None:
        """Write the request's ledger row, charge its cost and release its hold, atomically; runs
        to its end even if the caller is cancelled.

        ``also`` runs in the same transaction (a task recording its outcome); if it returns False
        nothing is committed, so an outcome and its charge are never separated.
        """
        entry = _entry(record)
        await self._protected(lambda c: self._settle(c, hold, record, entry, also))

    def _settle(
        self,
        c: Connection,
        hold: Hold | None,
        record: LedgerRecord,
        entry: dict[str, Any],
        also: TxHook | None,
    ) -> None:
        released = 0
        if hold is not None:
            gone = self._sql.unhold.execute(c, {"hold": hold.id})
            # A hold the reconciler already released must not be released twice.
            released = hold.amount_micros if _rows(gone) == 1 else 0
        period = hold.period if hold else period_of(utcnow())
        self._move(c, record.key_id, period, released, record.cost_micros)
        self._sql.entry.execute(c, entry)
        if also is not None and not also(c):
            raise SettlementAbandoned("the outcome could not be recorded; the charge was not made")

    async def release(self, hold: Hold) -> None:
        """Give a hold back with no charge (the request never reached an upstream)."""
        await self._protected(lambda c: self._release(c, hold))

    def _release(self, c: Connection, hold: Hold) -> None:
        gone = self._sql.unhold.execute(c, {"hold": hold.id})
        if _rows(gone) == 1:
            self._move(c, hold.key_id, hold.period, hold.amount_micros, 0)

    async def release_expired(self, now: datetime | None = None) -> int:
        """Release holds of requests whose process died (their TTL passed); returns how many."""
        moment = now or utcnow()

        def expired(c: Connection) -> list[Hold]:
            rows = c.execute(
                select(
                    Reservation.id, Reservation.key_id, Reservation.period, Reservation.amount_micros
                ).where(Reservation.expires_at < moment)
            )
            return [Hold(id=r[0], key_id=r[1], period=r[2], amount_micros=r[3]) for r in rows]

        released = 0
        for hold in await self._writer.run(expired):
            # One transaction each: the DELETE decides, so a hold settled meanwhile is left alone.
            released += 1 if await self._writer.run(partial(self._release_if_held, hold=hold)) else 0
        return released

    def _release_if_held(self, c: Connection, hold: Hold) -> bool:
        gone = self._sql.unhold.execute(c, {"hold": hold.id})
        if _rows(gone) != 1:
            return False
        self._move(c, hold.key_id, hold.period, hold.amount_micros, 0)
        return True

    def _move(self, c: Connection, key_id: str, period: str, released: int, cost: int) -> None:
        self._sql.move.execute(c, {"key": key_id, "released": released, "cost": cost})
        self._add_to_period(c, key_id, period, reserved=-released, spent=cost)

    def _add_to_period(
        self,
        c: Connection,
        key_id: str,
        period: str,
        *,
        reserved: int = 0,
        spent: int = 0,
        limit: int | None = None,
    ) -> bool:
        params = {"key": key_id, "period": period, "reserved": reserved, "spent": spent}
        if limit is None:
            return _rows(self._sql.period.execute(c, params)) == 1
        return _rows(self._sql.period_within.execute(c, {**params, "limit": limit})) == 1

    def _why(self, c: Connection, key_id: str, amount: int) -> str:
        row = self._sql.key.execute(c, {"key": key_id}).first()
        if row is not None and row[0] is not None and row[1] + amount > row[0]:
            return "This API key's balance is too low for this request; top it up to continue."
        return "This API key has used its quota; this request would exceed it."

    async def record(self, record: LedgerRecord) -> None:
        """A ledger row with no hold (kept for callers that reserve nothing)."""
        await self.settle(None, record)


def _rows(result: Executed) -> int:
    """Rows matched by an UPDATE/DELETE/upsert."""
    return result.rowcount


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
        # An SVG author priced at the default rate (not in the catalog's table) is an estimate too.
        estimated=usage.estimated or (record.svg is not None and record.svg.estimated),
        latency_ms=record.latency_ms,
        error_code=record.error_code,
        usage=dict(record.raw_usage) if record.raw_usage else None,
        reserved_micros=record.reserved_micros,
        overrun_micros=record.overrun_micros,
        created_at=utcnow(),
        svg_model=record.svg.model if record.svg else None,
        svg_input_tokens=record.svg.input_tokens if record.svg else 0,
        svg_output_tokens=record.svg.output_tokens if record.svg else 0,
        svg_reasoning_tokens=record.svg.reasoning_tokens if record.svg else 0,
        svg_cost_micros=record.svg.cost_micros if record.svg else 0,
    )
