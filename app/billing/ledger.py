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
import logging
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property, partial
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    and_,
    bindparam,
    delete,
    exists,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError

from app.billing.journal import Journal, Journaled, Journals
from app.billing.svg import SvgCharge
from app.core.errors import LedgerUnavailableError, QuotaExceededError
from app.db.prepared import Executed, Prepared
from app.db.tables import ApiKey, KeyPeriod, LedgerEntry, Reservation, Task, utcnow
from app.db.writer import WouldBlock, Writer
from app.domain.jobs import TokenUsage

T = TypeVar("T")
log = logging.getLogger(__name__)

# A settlement the database refuses (a full disk, a lost connection) is retried with backoff from
# the first delay, doubling up to the last, until it is written: within a couple of seconds of the
# database taking writes again. A request waits for it this long, then is answered 503 while the
# process keeps retrying (a task waits for as long as it takes: nobody is on the line).
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
SETTLE_PATIENCE_S = 5.0
# Holds renewed per statement (an IN list) by `renew_live`.
RENEW_CHUNK = 500
# What the database raises when it cannot write now: worth retrying, unlike a refusal by the
# transaction's own logic (quota, a task taken over) or a bug.
TRANSIENT: tuple[type[BaseException], ...] = (DBAPIError, sqlite3.Error, OSError)

# A task in these states still owns its hold (app/tasks/statements.py names them): the hold is
# tied to the task's row, not to a clock, so the reconciler never takes it back (issue 23).
LIVE_TASK_STATES = ("queued", "in_progress")

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
    status: str  # succeeded | failed | cancelled | interrupted
    images: int
    usage: TokenUsage | None
    cost_micros: int
    latency_ms: int
    error_code: str | None = None
    raw_usage: Mapping[str, Any] | None = None
    # What the request's hold reserved, and how much the charge went beyond it (an overrun).
    reserved_micros: int = 0
    overrun_micros: int = 0
    # What an interrupted task's upstream call may have cost the operator (never the tenant).
    operator_cost_micros: int = 0
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
    "operator_cost_micros",
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
        # A hold no live task owns: one whose request is gone (its process died) once it expired.
        owned = exists().where(and_(Task.hold_id == Reservation.id, Task.status.in_(LIVE_TASK_STATES)))
        self.unhold_orphan = Prepared(delete(Reservation).where(Reservation.id == bindparam("hold"), ~owned))
        self.orphans = select(
            Reservation.id, Reservation.key_id, Reservation.period, Reservation.amount_micros
        ).where(Reservation.expires_at < bindparam("now"), ~owned)
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
    def __init__(
        self,
        writer: Writer,
        *,
        hold_ttl_s: float = 3600,
        settle_patience_s: float | None = None,
        retry_first_s: float | None = None,
        retry_max_s: float | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._writer = writer
        # Where a refused settlement is also kept, so that the process's death does not lose it.
        self._journal = journal
        self._hold_ttl = timedelta(seconds=hold_ttl_s)
        self._pending: set[asyncio.Future[Any]] = set()
        self._patience_s = SETTLE_PATIENCE_S if settle_patience_s is None else settle_patience_s
        self._retry_first_s = RETRY_FIRST_S if retry_first_s is None else retry_first_s
        self._retry_max_s = RETRY_MAX_S if retry_max_s is None else retry_max_s
        # Settlements and releases still being retried (the database refused them so far).
        self.deferred = 0
        # Holds this process took and has not settled or released yet (see `renew_live`).
        self._live: set[str] = set()

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
            self._live.add(hold.id)
            return hold
        except WouldBlock:
            pass
        work = self._background(self._writer.run(reserve))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            self._background(self._undo(work, hold))
            raise
        self._live.add(hold.id)
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
        first = True

        def work(c: Connection) -> None:
            nonlocal first
            retry, first = not first, False
            # A retry after an error the database may have committed anyway (a connection lost
            # in the COMMIT) must not charge twice: the row is the proof it was written.
            if retry and self._written(c, record.request_id):
                # Written meanwhile (by that COMMIT, or by a journal replay): the charge stands,
                # and a task's outcome is recorded now if it is not yet (its hook finds out).
                if also is not None:
                    also(c)
                return
            self._settle(c, hold, entry, also)

        journal = self._journal

        async def keep() -> None:
            if journal is not None:
                await journal.append(hold, entry)

        # A task's settlement carries its outcome (``also``) and has no client waiting: it is
        # retried for as long as it takes; a request's waits only so long (see `_until_written`).
        try:
            await self._until_written(
                work, patience_s=None if also is not None else self._patience_s, on_refused=keep
            )
        finally:
            if hold is not None:
                self._live.discard(hold.id)  # settled, or left to the journal and the retries

    def _written(self, c: Connection, request_id: str) -> bool:
        """Whether the request's row exists; on PostgreSQL it also waits for, and then blocks,
        any other transaction writing it (a retry here, a journal replay elsewhere)."""
        if self._writer.dialect == "postgresql":
            c.execute(text("SELECT pg_advisory_xact_lock(hashtext(:request))"), {"request": request_id})
        return c.execute(_WRITTEN, {"request": request_id}).first() is not None

    async def replay_journal(self) -> int:
        """Write the settlements the journal kept (app/billing/journal.py); returns how many are
        now in the ledger. Called by the reconciler."""
        if self._journal is None:
            return 0
        return await self._journal.replay(self._apply_journaled)

    def share_journal(self, shared: Journal) -> None:
        """Also keep refused settlements where every node replays them (app/billing/shared_journal.py),
        so a node lost for good does not take them along; the node's own file stays the first copy."""
        self._journal = shared if self._journal is None else Journals(self._journal, shared)

    async def _apply_journaled(self, item: Journaled) -> bool:
        hold = Hold(**item.hold) if item.hold is not None else None

        def work(c: Connection) -> None:
            if not self._written(c, str(item.entry["request_id"])):
                self._settle(c, hold, item.entry, None)

        await self._writer.run(work)
        return True

    def _settle(self, c: Connection, hold: Hold | None, entry: dict[str, Any], also: TxHook | None) -> None:
        released = 0
        if hold is not None:
            gone = self._sql.unhold.execute(c, {"hold": hold.id})
            # A hold the reconciler already released must not be released twice.
            released = hold.amount_micros if _rows(gone) == 1 else 0
        period = hold.period if hold else period_of(utcnow())
        self._move(c, entry["key_id"], period, released, entry["cost_micros"])
        self._sql.entry.execute(c, entry)
        if also is not None and not also(c):
            raise SettlementAbandoned("the outcome could not be recorded; the charge was not made")

    async def release(self, hold: Hold) -> None:
        """Give a hold back with no charge (the request never reached an upstream)."""
        try:
            await self._until_written(lambda c: self._release(c, hold), patience_s=self._patience_s)
        finally:
            self._live.discard(hold.id)

    async def renew_live(self, now: datetime | None = None) -> int:
        """Push back the expiry of every hold this process took and has not settled, so the
        reconciler never takes a live request's hold, however long it runs (a stream is cut by
        silence, not by its length). Holds gone meanwhile (a task's, settled by another process)
        are forgotten. Called by the reconciler, far more often than ``hold_ttl_s``."""
        ids = list(self._live)
        if not ids:
            return 0
        expires = (now or utcnow()) + self._hold_ttl

        def renew(c: Connection) -> set[str]:
            present: set[str] = set()
            for start in range(0, len(ids), RENEW_CHUNK):
                chunk = ids[start : start + RENEW_CHUNK]
                held = Reservation.id.in_(chunk)
                c.execute(update(Reservation).where(held).values(expires_at=expires))
                present.update(row[0] for row in c.execute(select(Reservation.id).where(held)))
            return present

        present = await self._writer.run(renew)
        self._live.difference_update(set(ids) - present)
        return len(present)

    async def _until_written(
        self,
        work: Callable[[Connection], None],
        *,
        patience_s: float | None,
        on_refused: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run a write transaction to its end, retrying while the database refuses it.

        After ``patience_s`` (None: never) the caller gets 503 ``ledger_unavailable`` while the
        retries go on in the background: a settlement is never dropped in a live process, and its
        hold is settled within ``RETRY_MAX_S`` of the database taking writes again.
        """
        try:
            await self._protected(work)
            return
        except TRANSIENT as exc:
            log.warning("a ledger write failed; retrying", extra={"fields": {"error": _summary(exc)}})
        if on_refused is not None:
            await on_refused()
        self.deferred += 1
        retrying = self._background(self._retry(work))
        try:
            await asyncio.wait_for(asyncio.shield(retrying), patience_s)
        except TimeoutError:
            raise LedgerUnavailableError(
                "The gateway could not write this request's charge to its database; it is kept "
                "and will be recorded as soon as the database accepts writes again."
            ) from None

    async def _retry(self, work: Callable[[Connection], None]) -> None:
        delay = self._retry_first_s
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await self._writer.run(work)
                    log.warning("a deferred ledger write was recorded")
                    return
                except TRANSIENT as exc:
                    delay = min(delay * 2, self._retry_max_s)
                    log.warning("a ledger write failed again", extra={"fields": {"error": _summary(exc)}})
        finally:
            self.deferred -= 1

    def _release(self, c: Connection, hold: Hold) -> None:
        gone = self._sql.unhold.execute(c, {"hold": hold.id})
        if _rows(gone) == 1:
            self._move(c, hold.key_id, hold.period, hold.amount_micros, 0)

    async def release_expired(self, now: datetime | None = None) -> int:
        """Release holds whose request is gone; returns how many.

        A request's hold outlives its TTL only if its process died (the settings refuse a TTL
        shorter than the longest request). A queued or running task's hold is never taken: it
        belongs to the task's row, whatever its age, and goes with the task's outcome (or with
        ``fail_exhausted``, when the task's last worker died)."""
        moment = now or utcnow()

        def expired(c: Connection) -> list[Hold]:
            rows = c.execute(self._sql.orphans, {"now": moment})
            return [Hold(id=r[0], key_id=r[1], period=r[2], amount_micros=r[3]) for r in rows]

        released = 0
        for hold in await self._writer.run(expired):
            # One transaction each: the DELETE decides, so a hold settled meanwhile is left alone.
            released += 1 if await self._writer.run(partial(self._release_if_held, hold=hold)) else 0
        return released

    def _release_if_held(self, c: Connection, hold: Hold) -> bool:
        # Checked again here: a task that took the hold since the read above keeps it.
        gone = self._sql.unhold_orphan.execute(c, {"hold": hold.id})
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


# Whether a request's ledger row exists (a retried settlement that was written after all).
_WRITTEN = select(LedgerEntry.id).where(LedgerEntry.request_id == bindparam("request")).limit(1)


def _summary(exc: BaseException) -> str:
    """A database error without its SQL parameters (they may hold a prompt)."""
    original = getattr(exc, "orig", None) or exc
    return f"{type(original).__name__}: {str(original).splitlines()[0] if str(original) else ''}"[:200]


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
        operator_cost_micros=record.operator_cost_micros,
        created_at=utcnow(),
        svg_model=record.svg.model if record.svg else None,
        svg_input_tokens=record.svg.input_tokens if record.svg else 0,
        svg_output_tokens=record.svg.output_tokens if record.svg else 0,
        svg_reasoning_tokens=record.svg.reasoning_tokens if record.svg else 0,
        svg_cost_micros=record.svg.cost_micros if record.svg else 0,
    )
