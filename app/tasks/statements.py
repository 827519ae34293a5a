"""The task queue's hot statements, built once with bind parameters.

Building a SQLAlchemy statement and computing its cache key cost more than running it on SQLite:
the claim's ranking query, rebuilt on every claim, was a third of the gateway's CPU while 300
async tasks were submitted (py-spy). A statement built once memoizes its cache key, so each run
only binds values.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Integer, and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.sql.elements import BindParameter

from app.db.prepared import Prepared
from app.db.tables import RUNNABLE_STATUSES, ApiKey, Reservation, Task

QUEUED, IN_PROGRESS, SUCCEEDED, FAILED = "queued", "in_progress", "succeeded", "failed"
# Only a queued task is cancelled (POST /v1/tasks/{id}/cancel); a running one finishes.
CANCELLED = "cancelled"


def _keys() -> BindParameter[Any]:
    return bindparam("keys", expanding=True)


def _runnable() -> Any:
    """Queued, or in progress under a lease that lapsed before ``:now``."""
    return or_(Task.status == QUEUED, and_(Task.status == IN_PROGRESS, Task.lease_until < bindparam("now")))


def _pick(*, capped: bool) -> Any:
    """The ids to lease, fairest first (see app/tasks/queue.py): each runnable task is ranked by age
    inside its key, and taken by the number of its key's tasks that would then be in flight (running
    under a live lease, plus its rank), oldest first on a tie. A key with a large backlog already
    running therefore yields to a key with none, even in a claim of one task. ``capped``: some key
    has ``max_tasks_in_flight``, so each key's rank is also bounded by the room it has left."""
    rank = func.row_number().over(partition_by=Task.key_id, order_by=(Task.created_at, Task.id))
    # The redundant status term is ix_tasks_runnable's predicate, spelled as it is there: SQLite
    # uses a partial index only when the query repeats its WHERE term.
    ranked = (
        select(Task.id, Task.key_id, Task.created_at, rank.label("rank"))
        .where(text(f"tasks.{RUNNABLE_STATUSES}"), _runnable())
        .subquery()
    )
    # Tasks under a live lease are few (bounded by the workers' concurrency), and ix_tasks_claim
    # (status, lease_until) finds them without reading the queued ones.
    running = (
        select(Task.key_id, func.count().label("n"))
        .where(Task.status == IN_PROGRESS, Task.lease_until >= bindparam("now"))
        .group_by(Task.key_id)
        .subquery()
    )
    in_flight = func.coalesce(running.c.n, 0)
    joined = Task.__table__.join(ranked, ranked.c.id == Task.id).outerjoin(
        running, running.c.key_id == ranked.c.key_id
    )
    pick = select(Task.id)
    if capped:
        joined = joined.outerjoin(ApiKey, ApiKey.id == ranked.c.key_id)
        room = ApiKey.max_tasks_in_flight - in_flight
        pick = pick.where(or_(ApiKey.max_tasks_in_flight.is_(None), ranked.c.rank <= room))
    return (
        pick.select_from(joined)
        .order_by(in_flight + ranked.c.rank, ranked.c.created_at, ranked.c.id)
        .limit(bindparam("limit", type_=Integer))
    )


class Statements:
    def __init__(self) -> None:
        # Submission (app/db/batch.py writes a batch of them in one transaction).
        self.lock_keys = select(ApiKey.id).where(ApiKey.id.in_(_keys())).order_by(ApiKey.id).with_for_update()
        self.count_queued = (
            select(Task.key_id, func.count())
            .where(Task.status == QUEUED, Task.key_id.in_(_keys()))
            .group_by(Task.key_id)
        )
        self.by_idempotency = select(Task.__table__).where(
            Task.key_id.in_(_keys()), Task.idempotency_key.in_(bindparam("idems", expanding=True))
        )
        self.insert = insert(Task)
        self.extend_holds = (
            update(Reservation)
            .where(Reservation.id.in_(bindparam("holds", expanding=True)))
            .values(expires_at=bindparam("expires"))
        )
        # Claiming.
        self.any_capped = select(ApiKey.id).where(ApiKey.max_tasks_in_flight.is_not(None)).limit(1)
        self.pick = _pick(capped=False)
        self.pick_capped = _pick(capped=True)
        # PostgreSQL: rows another worker is claiming right now are skipped and the batch filled
        # with the next ones (the ranking itself sits in a subquery, where no lock is taken).
        self.pick_locking = self.pick.with_for_update(of=Task, skip_locked=True)
        self.pick_capped_locking = self.pick_capped.with_for_update(of=Task, skip_locked=True)
        self.lease = (
            update(Task)
            .where(Task.id.in_(bindparam("ids", expanding=True)), _runnable())
            .values(
                status=IN_PROGRESS,
                worker=bindparam("owner"),
                lease_until=bindparam("until"),
                attempts=Task.attempts + 1,
                started_at=bindparam("started"),
            )
            .returning(*Task.__table__.columns)
        )
        mine = and_(
            Task.id == bindparam("task"), Task.worker == bindparam("owner"), Task.status == IN_PROGRESS
        )
        self.dispatched = Prepared(update(Task).where(mine).values(dispatched_at=bindparam("at")))
        self.finish = Prepared(
            update(Task)
            .where(mine)
            .values(
                status=bindparam("outcome"),
                result=bindparam("body", type_=Task.__table__.c.result.type),
                error=bindparam("failure", type_=Task.__table__.c.error.type),
                cost_micros=bindparam("cost", type_=BigInteger),
                finished_at=bindparam("at"),
                lease_until=None,
            )
        )
        self.backlog = select(Task.id).where(Task.status == QUEUED).limit(1)
        exhausted = and_(
            Task.status == IN_PROGRESS,
            Task.lease_until < bindparam("now"),
            # Not named "attempts": an UPDATE reserves its column names for its own SET values.
            Task.attempts >= bindparam("max_attempts", type_=Integer),
        )
        self.exhausted = select(Task.__table__).where(exhausted)
        self.abandon = (
            update(Task)
            .where(Task.id.in_(bindparam("ids", expanding=True)), exhausted)
            .values(
                status=FAILED,
                finished_at=bindparam("finished"),
                lease_until=None,
                error=bindparam("failure", type_=Task.__table__.c.error.type),
            )
        )
