"""The durable task queue, in the gateway's database.

Claiming takes a batch: one select picks the candidates, one ``UPDATE … WHERE id IN (…) AND
<still runnable> RETURNING`` leases them. On PostgreSQL the update's inner select takes ``FOR
UPDATE SKIP LOCKED``, so concurrent workers (processes, replicas) each get different tasks without
waiting on one another; SQLite serialises writers, which gives the same guarantee. A claim is a
lease: a worker renews the leases of all its running tasks in one statement, a worker that dies
stops renewing, and once a lease lapses the task is claimable again (up to ``max_attempts``).
Finishing a task is guarded by the worker's identity, so a worker whose lease was taken over can
never overwrite the new owner's outcome.

Fairness between keys: candidates are ranked inside each key by age (``row_number() OVER
(PARTITION BY key_id)``) and taken by the count their key would then have in flight (its tasks
running under a live lease, plus the rank), age breaking ties: a key running nothing goes before a
key running many, and a claim of N tasks levels the keys, FIFO within each. One key's backlog of
thousands (a batch's lines) therefore delays another key's single task by at most one claim, even
a claim of one task. A key's ``max_tasks_in_flight`` caps its rank by the room it has left;
``max_queued_tasks`` is checked when a task is submitted.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    CursorResult,
    Result,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.errors import GatewayError, RateLimitError, error_body
from app.db.batch import Batcher
from app.db.tables import Task, utcnow
from app.db.transient import retrying
from app.db.writer import Writer
from app.tasks.idempotency import reused_error
from app.tasks.statements import CANCELLED, FAILED, IN_PROGRESS, QUEUED, SUCCEEDED, Statements
from app.webhooks.endpoints import enabled_endpoints

__all__ = ["CANCELLED", "FAILED", "IN_PROGRESS", "QUEUED", "SUCCEEDED", "NewTask", "TaskQueue", "new_task_id"]

# Advised to a key whose queue is full: about one image's time, when its oldest tasks may have started.
QUEUE_FULL_RETRY_AFTER_S = 10


@dataclass(frozen=True, slots=True)
class NewTask:
    id: str
    key_id: str
    request_id: str
    endpoint: str
    model: str
    spec: dict[str, Any]
    response_format: str
    idempotency_key: str | None
    hold_id: str | None
    hold_period: str | None
    hold_micros: int
    # The key's enabled webhook endpoints get the task's events, read in the insert's transaction
    # (a request that named its endpoints has them in ``spec`` already).
    default_webhooks: bool = False
    # SHA-256 of the request (``tasks.service.fingerprint``), kept with the idempotency key.
    idempotency_fingerprint: str | None = None


def reused(print_: str | None, existing: Task) -> GatewayError | None:
    """The 422 when a request (its fingerprint) reuses ``existing``'s idempotency key."""
    known = existing.idempotency_fingerprint
    if known is None or print_ is None or known == print_:
        return None
    return reused_error()


@dataclass(frozen=True, slots=True)
class _Submission:
    task: NewTask
    max_queued: int | None


Submitted = tuple[Task, bool] | BaseException


_TICK = timedelta(microseconds=1)


def _row(task: NewTask, endpoints: list[str] | None, now: datetime) -> dict[str, Any]:
    spec = {**task.spec, "webhooks": endpoints} if endpoints else task.spec
    return dict(
        id=task.id,
        key_id=task.key_id,
        request_id=task.request_id,
        endpoint=task.endpoint,
        model=task.model,
        status=QUEUED,
        spec=spec,
        response_format=task.response_format,
        idempotency_key=task.idempotency_key,
        idempotency_fingerprint=task.idempotency_fingerprint,
        hold_id=task.hold_id,
        hold_period=task.hold_period,
        hold_micros=task.hold_micros,
        attempts=0,
        created_at=now,
    )


def _queue_full(limit: int) -> RateLimitError:
    return RateLimitError(
        f"This key already has {limit} tasks waiting to run, its limit (max_queued_tasks). "
        "Retry when some have started.",
        retry_after_s=QUEUE_FULL_RETRY_AFTER_S,
    )


# What a task cancelled while queued reports as its error (it never ran, nothing was charged).
CANCELLED_ERROR: dict[str, Any] = error_body(
    "The task was cancelled by its owner before it ran; nothing was charged.",
    "invalid_request_error",
    None,
    "task_cancelled",
)["error"]


def new_task_id() -> str:
    return "task_" + secrets.token_hex(16)


class TaskQueue:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        writer: Writer,
        *,
        lease_s: float = 60.0,
        max_attempts: int = 3,
        hold_ttl_s: float | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """``clock``: what "now" is for leases (tests move it instead of sleeping)."""
        self._now = clock
        self._sessions = sessions
        # Writes go through the writer (app/db/writer.py); reads for the task API use sessions.
        self._writer = writer
        self.hold_ttl = timedelta(seconds=hold_ttl_s) if hold_ttl_s is not None else None
        self.lease = timedelta(seconds=lease_s)
        self.max_attempts = max_attempts
        self._sql = Statements()
        # Whether the last claim left tasks queued (a pool then claims again as soon as one of its
        # tasks ends; with none left it waits for a submission or its poll instead).
        self.backlog = False
        self._submissions: Batcher[_Submission, tuple[Task, bool]] = Batcher(writer, self._submit_batch)

    async def submit(self, task: NewTask, *, max_queued: int | None = None) -> tuple[Task, bool]:
        """Persist a queued task; with an idempotency key already used by this caller, the existing
        task instead. Returns (task, created) once the task is committed. ``max_queued``: the key's
        limit of tasks waiting to run, checked in the insert's own transaction (429
        ``rate_limit_exceeded`` when full).

        Submissions that arrive together are written in one transaction (app/db/batch.py)."""
        try:
            return await self._submissions.submit(_Submission(task, max_queued))
        except IntegrityError:
            # Two submissions with one idempotency key raced (another process won): the other
            # one's task is the answer.
            if task.idempotency_key is None:
                raise
            existing = await self._by_idempotency(task.key_id, task.idempotency_key)
            if existing is None:
                raise
            refused = reused(task.idempotency_fingerprint, existing)
            if refused is not None:
                raise refused from None
            return existing, False

    @property
    def submit_batches(self) -> Batcher[_Submission, tuple[Task, bool]]:
        """The submissions' group commit (its counters show how many transactions they took)."""
        return self._submissions

    def _submit_batch(self, c: Connection, items: Sequence[_Submission]) -> list[Submitted]:
        """Decide every submission of a batch, then write the admitted ones: one INSERT, one
        UPDATE of their holds' expiry, and per batch (not per task) one read of each kind."""
        sql = self._sql
        keys = sorted({i.task.key_id for i in items})
        existing = self._existing_in(c, items)
        limited = sorted({i.task.key_id for i in items if i.max_queued is not None})
        waiting: dict[str, int] = {}
        if limited:
            if c.dialect.name == "postgresql":
                # Serialises the count-then-insert of concurrent batches (other processes) per key,
                # so the limit holds exactly; sorted, so two batches never wait on each other.
                c.execute(sql.lock_keys, {"keys": limited}).all()
            waiting = {k: int(n) for k, n in c.execute(sql.count_queued, {"keys": limited}).all()}
        wanted = [k for k in keys if any(i.task.key_id == k and i.task.default_webhooks for i in items)]
        endpoints = enabled_endpoints(c, wanted) if wanted else {}
        now = last = utcnow()
        outcomes: list[Submitted] = []
        rows: list[dict[str, Any]] = []
        first: dict[tuple[str, str], Task] = {}
        for item in items:
            task = item.task
            idem = (task.key_id, task.idempotency_key) if task.idempotency_key is not None else None
            earlier = existing.get(idem) or first.get(idem) if idem is not None else None
            if earlier is not None:  # submitted before, or the same key twice in one batch
                refused = reused(task.idempotency_fingerprint, earlier)
                outcomes.append(refused if refused is not None else (earlier, False))
                continue
            if item.max_queued is not None:
                if waiting.get(task.key_id, 0) >= item.max_queued:
                    outcomes.append(_queue_full(item.max_queued))
                    continue
                waiting[task.key_id] = waiting.get(task.key_id, 0) + 1
            # Each its own moment, in arrival order: claims are FIFO within a key by created_at, and
            # a batch's rows would otherwise tie (then ordered by their random ids).
            stamp = max(utcnow(), last + _TICK) if rows else now
            last = stamp
            values = _row(task, endpoints.get(task.key_id), stamp)
            rows.append(values)
            created = Task(**values)
            if idem is not None:
                first[idem] = created
            outcomes.append((created, True))
        if rows:
            c.execute(sql.insert, rows)
            holds = [r["hold_id"] for r in rows if r["hold_id"] is not None]
            if holds and self.hold_ttl is not None:
                # A queued task keeps its hold for as long as it may wait and run.
                c.execute(sql.extend_holds, {"holds": holds, "expires": now + self.hold_ttl})
        return outcomes

    def _existing_in(self, c: Connection, items: Sequence[_Submission]) -> dict[tuple[str, str], Task]:
        """The tasks already submitted under the batch's idempotency keys."""
        pairs = {(i.task.key_id, i.task.idempotency_key) for i in items if i.task.idempotency_key is not None}
        if not pairs:
            return {}
        rows = c.execute(
            self._sql.by_idempotency,
            {"keys": sorted({k for k, _ in pairs}), "idems": sorted({i for _, i in pairs})},
        )
        found = (Task(**row._asdict()) for row in rows)
        return {(t.key_id, t.idempotency_key): t for t in found if (t.key_id, t.idempotency_key) in pairs}  # type: ignore[misc]

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        return self._sessions

    async def find(self, key_id: str, idempotency_key: str) -> Task | None:
        """The caller's task submitted with this idempotency key, if any."""
        return await self._by_idempotency(key_id, idempotency_key)

    async def _by_idempotency(self, key_id: str, idempotency_key: str) -> Task | None:
        async with self._sessions() as session:
            result = await session.execute(
                select(Task).where(Task.key_id == key_id, Task.idempotency_key == idempotency_key)
            )
            return result.scalar_one_or_none()

    async def claim(self, worker: str) -> Task | None:
        """Lease one task (the fairest, see the module docstring); None when nothing is runnable."""
        claimed = await self.claim_batch(worker, 1)
        return claimed[0] if claimed else None

    async def claim_batch(self, worker: str, limit: int) -> list[Task]:
        """Lease up to ``limit`` runnable tasks (queued, or in progress with a lapsed lease),
        round-robin across keys and within each key's ``max_tasks_in_flight``."""
        return await self._writer.run(lambda c: self._claim(c, worker, limit))

    def _claim(self, c: Connection, worker: str, limit: int) -> list[Task]:
        sql, now = self._sql, self._now()
        capped = c.execute(sql.any_capped).first() is not None
        if c.dialect.name == "postgresql":
            pick = sql.pick_capped_locking if capped else sql.pick_locking
        else:
            pick = sql.pick_capped if capped else sql.pick
        picked = list(c.scalars(pick, {"now": now, "limit": limit}))
        claimed: list[Task] = []
        if picked:
            rows = c.execute(
                sql.lease,
                {"ids": picked, "now": now, "owner": worker, "until": now + self.lease, "started": now},
            ).all()
            order = {task_id: index for index, task_id in enumerate(picked)}
            claimed = [Task(**row._asdict()) for row in rows]
            claimed.sort(key=lambda task: order.get(task.id, len(order)))
        self.backlog = c.execute(sql.backlog).first() is not None
        return claimed

    async def mark_dispatched(self, task_id: str, worker: str) -> bool:
        """Record that the upstream is about to be called (see ``Task.dispatched_at``)."""

        def mark(c: Connection) -> bool:
            marked = self._sql.dispatched.execute(c, {"task": task_id, "owner": worker, "at": utcnow()})
            return marked.rowcount == 1

        return await _again_if_unknown(lambda: self._writer.run(mark), what="mark dispatched")

    async def record_provider_job(self, task_id: str, worker: str, provider_job: dict[str, Any]) -> bool:
        """Record the jobs a polled upstream accepted (see ``Task.provider_job``), committed before
        the first poll; False when the task is no longer this worker's."""

        def record(c: Connection) -> bool:
            recorded = c.execute(
                update(Task)
                .where(Task.id == task_id, Task.worker == worker, Task.status == IN_PROGRESS)
                .values(provider_job=provider_job)
            )
            return _rows(recorded) == 1

        return await _again_if_unknown(lambda: self._writer.run(record), what="record provider job")

    async def renew(self, task_id: str, worker: str) -> bool:
        """Extend a lease; False when the task is no longer this worker's."""
        return task_id in await self.renew_all(worker, [task_id])

    async def renew_all(self, worker: str, task_ids: Collection[str]) -> set[str]:
        """Extend the leases of ``task_ids`` in one statement; returns those still this worker's."""
        if not task_ids:
            return set()
        ids = list(task_ids)

        def extend(c: Connection) -> set[str]:
            rows = c.execute(
                update(Task)
                .where(Task.id.in_(ids), Task.worker == worker, Task.status == IN_PROGRESS)
                .values(lease_until=self._now() + self.lease)
                .returning(Task.id)
            )
            return set(rows.scalars().all())

        return await self._writer.run(extend)

    async def finish(
        self,
        task_id: str,
        worker: str,
        *,
        status: str,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        cost_micros: int = 0,
        also: Callable[[Connection], Any] | None = None,
    ) -> bool:
        """Record an outcome in a transaction of its own (one with no charge); ``also`` runs in the
        same transaction when the outcome was recorded (the task's webhook events)."""

        def write(c: Connection) -> bool:
            done = self.finish_in(
                c, task_id, worker, status=status, result=result, error=error, cost_micros=cost_micros
            )
            if done and also is not None:
                also(c)
            return done

        return await self._writer.run(write)

    def finish_in(
        self,
        c: Connection,
        task_id: str,
        worker: str,
        *,
        status: str,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        cost_micros: int = 0,
    ) -> bool:
        """Record the outcome inside the caller's transaction (the one that settles billing)."""
        finished = self._sql.finish.execute(
            c,
            {
                "task": task_id,
                "owner": worker,
                "outcome": status,
                "body": result,
                "failure": error,
                "cost": cost_micros,
                "at": utcnow(),
            },
        )
        return finished.rowcount == 1

    async def fail_exhausted(self, on_failed: Callable[[Connection, Task], Any] | None = None) -> list[Task]:
        """Tasks whose lease lapsed after their last allowed attempt: they fail, they don't loop.
        ``on_failed`` runs for each inside the same transaction (its webhook events)."""

        def fail(c: Connection) -> list[Task]:
            rows = self._fail_exhausted(c)
            if on_failed is not None:
                for row in rows:
                    on_failed(c, row)
            return rows

        return await self._writer.run(fail)

    def _fail_exhausted(self, c: Connection) -> list[Task]:
        now = self._now()
        found = c.execute(self._sql.exhausted, {"now": now, "max_attempts": self.max_attempts})
        rows = [Task(**row._asdict()) for row in found]
        if not rows:
            return []
        error = error_body(
            "The task was interrupted too many times and was abandoned.", "api_error", None, "task_abandoned"
        )["error"]
        c.execute(
            self._sql.abandon,
            {
                "ids": [row.id for row in rows],
                "now": now,
                "max_attempts": self.max_attempts,
                "finished": now,
                "failure": error,
            },
        )
        for row in rows:
            row.status, row.finished_at, row.lease_until, row.error = FAILED, now, None, error
        return rows

    # -- cancel (issue 26, SPEC §11) -------------------------------------------------------------

    async def cancel_queued(
        self, task_id: str, key_id: str, *, also: Callable[[Connection, Task], Any] | None = None
    ) -> Task | None:
        """Cancel the key's task if it is still queued: the cancelled task, else None (running,
        finished, another key's or missing). The UPDATE is conditional on ``queued``, so a worker's
        claim and a cancel cannot both win. ``also`` runs in the same transaction (its events)."""

        def cancel(c: Connection) -> Task | None:
            now = self._now()
            found = c.execute(
                select(*Task.__table__.columns).where(
                    Task.id == task_id, Task.key_id == key_id, Task.status == QUEUED
                )
            ).first()
            if found is None:
                return None
            done = c.execute(
                update(Task)
                .where(Task.id == task_id, Task.status == QUEUED)
                .values(status=CANCELLED, finished_at=now, lease_until=None, error=CANCELLED_ERROR)
            )
            if done.rowcount != 1:
                return None
            task = Task(**found._asdict())
            task.status, task.finished_at, task.lease_until, task.error = (
                CANCELLED,
                now,
                None,
                CANCELLED_ERROR,
            )
            if also is not None:
                also(c, task)
            return task

        return await self._writer.run(cancel)

    # -- end cancel --------------------------------------------------------------------------------

    async def get(self, task_id: str, key_id: str) -> Task | None:
        async with self._sessions() as session:
            row = await session.get(Task, task_id)
        return row if row is not None and row.key_id == key_id else None

    async def page(self, key_id: str, *, limit: int, after: str | None) -> tuple[Sequence[Task], bool]:
        """The caller's tasks, newest first; ``after`` is the last id of the previous page."""
        async with self._sessions() as session:
            query = select(Task).where(Task.key_id == key_id)
            if after is not None:
                anchor = await session.get(Task, after)
                if anchor is None or anchor.key_id != key_id:
                    return [], False
                query = query.where(
                    or_(
                        Task.created_at < anchor.created_at,
                        and_(Task.created_at == anchor.created_at, Task.id < anchor.id),
                    )
                )
            rows = (
                (
                    await session.execute(
                        query.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1)
                    )
                )
                .scalars()
                .all()
            )
        return rows[:limit], len(rows) > limit

    async def activity(self, task_ids: Collection[str]) -> dict[str, bool]:
        """For those of ``task_ids`` that have a row: still queued or in progress (its input files
        are in use), or finished. The orphan sweep removes a finished task's inputs at once."""
        if not task_ids:
            return {}
        async with self._sessions() as session:
            result = await session.execute(select(Task.id, Task.status).where(Task.id.in_(list(task_ids))))
            return {task_id: status in (QUEUED, IN_PROGRESS) for task_id, status in result.all()}

    async def depth(self) -> int:
        async with self._sessions() as session:
            depth = await session.scalar(
                select(func.count()).select_from(Task).where(Task.status.in_((QUEUED, IN_PROGRESS)))
            )
            return int(depth or 0)

    async def purge_finished(self, older_than: timedelta, *, limit: int) -> list[Task]:
        """Delete up to ``limit`` finished tasks past retention; returns them so their files can go
        too. Bounded because a day's tasks, results included, would otherwise be loaded at once."""
        cutoff = utcnow() - older_than
        async with self._sessions.begin() as session:
            rows = (
                (
                    await session.execute(
                        select(Task)
                        .where(Task.status.in_((SUCCEEDED, FAILED, CANCELLED)), Task.finished_at < cutoff)
                        .limit(limit)
                    )
                )
                .scalars()
                .all()
            )
            if rows:
                await session.execute(delete(Task).where(Task.id.in_([r.id for r in rows])))
            return list(rows)

    @property
    def writer(self) -> Writer:
        """The database writer (a running task's progress is written through it, app/tasks/progress.py)."""
        return self._writer


def _rows(result: Result[Any]) -> int:
    return int(getattr(result, "rowcount", 0)) if isinstance(result, CursorResult) else 0


async def _again_if_unknown(write: Callable[[], Awaitable[bool]], *, what: str) -> bool:
    """Run an update of this worker's own task row again after any transient error, a connection
    dropped during its COMMIT included (the writer does not retry that one: a write that may have
    landed must not land twice). These updates set the same values on the same row, so landing
    twice is harmless, and failing the running task over a dropped COMMIT is not (a run with
    PostgreSQL connections killed mid-run failed a task with ``internal_error`` that way)."""
    return await retrying(write, what=what)
