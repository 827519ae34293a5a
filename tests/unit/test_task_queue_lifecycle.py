"""A task's life in the queue on a real SQLite database: submit (idempotency, the hold's lifetime),
claim, finish guarded by the worker's identity, abandonment after the last attempt, and purge.
The queue's clock is moved by the test; nothing sleeps. (Fair claims: test_task_queue.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select, update

from app.core.errors import RateLimitError
from app.db.engine import create_sessionmaker
from app.db.tables import Reservation, Task, utcnow
from app.tasks.queue import FAILED, IN_PROGRESS, QUEUED, SUCCEEDED, NewTask, TaskQueue, new_task_id
from tests.unit.ledger_db import Db, open_db

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Db]:
    async with open_db(tmp_path) as opened:
        await opened.add_key("k")
        await opened.add_key("j")
        yield opened


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(db: Db, clock: Clock) -> TaskQueue:
    sessions = create_sessionmaker(db.engine)
    return TaskQueue(sessions, db.writer, lease_s=60, max_attempts=2, hold_ttl_s=7200, clock=clock)


def new(key_id: str = "k", *, idempotency_key: str | None = None, hold_id: str | None = None) -> NewTask:
    return NewTask(
        id=new_task_id(),
        key_id=key_id,
        request_id="req_" + new_task_id()[5:],
        endpoint="generations",
        model="gpt-image-1",
        spec={"payload": {"prompt": "a kite"}},
        response_format="b64_json",
        idempotency_key=idempotency_key,
        hold_id=hold_id,
        hold_period="2026-12" if hold_id else None,
        hold_micros=5_000 if hold_id else 0,
    )


async def row(queue: TaskQueue, task_id: str) -> dict[str, Any]:
    async with queue.sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        return {c.key: getattr(task, c.key) for c in Task.__mapper__.column_attrs}


async def test_submit_persists_a_queued_task(queue: TaskQueue) -> None:
    task, created = await queue.submit(new())
    assert created and task.status == QUEUED and task.attempts == 0
    stored = await row(queue, task.id)
    assert (stored["status"], stored["spec"], stored["worker"]) == (
        QUEUED,
        {"payload": {"prompt": "a kite"}},
        None,
    )
    assert await queue.depth() == 1


async def test_an_idempotency_key_returns_the_first_task_per_key(queue: TaskQueue) -> None:
    first, created = await queue.submit(new(idempotency_key="same"))
    again, created_again = await queue.submit(new(idempotency_key="same"))
    other_key, created_other = await queue.submit(new("j", idempotency_key="same"))
    assert created and not created_again and again.id == first.id
    assert created_other and other_key.id != first.id
    assert (await queue.find("k", "same")).id == first.id  # type: ignore[union-attr]
    assert await queue.depth() == 2


async def test_a_queued_task_keeps_its_hold_for_the_queue_hold_ttl(queue: TaskQueue, db: Db) -> None:
    def hold(c: Connection) -> None:
        values = dict(
            id="hold_1", key_id="k", period="2026-12", amount_micros=5_000, request_id="r",
            created_at=utcnow(), expires_at=utcnow() + timedelta(seconds=60),
        )  # fmt: skip
        c.execute(insert(Reservation).values(**values))

    await db.writer.run(hold)
    before = utcnow()
    await queue.submit(new(hold_id="hold_1"))
    (stored,) = await db.holds()
    assert stored["expires_at"] >= before + timedelta(seconds=7200)


async def test_a_full_queue_refuses_without_inserting(queue: TaskQueue) -> None:
    await queue.submit(new(), max_queued=1)
    with pytest.raises(RateLimitError):
        await queue.submit(new(), max_queued=1)
    assert await queue.depth() == 1
    # Another key's queue is its own.
    assert (await queue.submit(new("j"), max_queued=1))[1]


async def test_claim_leases_the_oldest_and_counts_the_attempt(queue: TaskQueue, clock: Clock) -> None:
    first, _ = await queue.submit(new())
    await queue.submit(new())
    claimed = await queue.claim("w1")
    assert claimed is not None and claimed.id == first.id
    assert (claimed.status, claimed.worker, claimed.attempts) == (IN_PROGRESS, "w1", 1)
    assert claimed.lease_until == clock.now + timedelta(seconds=60)


async def test_claim_batch_round_robins_across_keys(queue: TaskQueue) -> None:
    ks = [(await queue.submit(new("k")))[0].id for _ in range(3)]
    js = [(await queue.submit(new("j")))[0].id for _ in range(2)]
    claimed = [t.id for t in await queue.claim_batch("w1", 4)]
    assert set(claimed) == {ks[0], ks[1], js[0], js[1]}
    # Each key's first task before either key's second.
    assert set(claimed[:2]) == {ks[0], js[0]}
    assert [t.id for t in await queue.claim_batch("w2", 4)] == [ks[2]]
    assert await queue.claim("w3") is None


async def test_finish_is_guarded_by_the_worker_and_runs_its_hook_once(queue: TaskQueue) -> None:
    task, _ = await queue.submit(new())
    await queue.claim("w1")
    hooked: list[str] = []
    assert not await queue.finish(task.id, "w2", status=SUCCEEDED, also=lambda c: hooked.append("w2"))
    done = await queue.finish(
        task.id,
        "w1",
        status=SUCCEEDED,
        result={"data": []},
        cost_micros=10_880,
        also=lambda c: hooked.append("w1"),
    )
    assert done and hooked == ["w1"]
    stored = await row(queue, task.id)
    assert (stored["status"], stored["result"], stored["cost_micros"], stored["lease_until"]) == (
        SUCCEEDED,
        {"data": []},
        10_880,
        None,
    )
    # A finished task is finished: a second outcome is not written over it.
    assert not await queue.finish(task.id, "w1", status=FAILED, error={"code": "x"})
    assert (await row(queue, task.id))["status"] == SUCCEEDED
    assert await queue.depth() == 0


async def test_renew_extends_only_the_owners_lease(queue: TaskQueue, clock: Clock) -> None:
    task, _ = await queue.submit(new())
    await queue.claim("w1")
    clock.advance(50)
    assert await queue.renew(task.id, "w1")
    assert not await queue.renew(task.id, "w2")
    assert (await row(queue, task.id))["lease_until"] == clock.now + timedelta(seconds=60)
    assert await queue.renew_all("w1", []) == set()


async def test_a_lapsed_lease_is_taken_over_and_the_old_worker_cannot_finish(
    queue: TaskQueue, clock: Clock
) -> None:
    task, _ = await queue.submit(new())
    await queue.claim("w1")
    clock.advance(61)
    taken = await queue.claim("w2")
    assert taken is not None and (taken.id, taken.attempts) == (task.id, 2)
    assert not await queue.finish(task.id, "w1", status=SUCCEEDED)
    assert not await queue.renew(task.id, "w1")
    assert await queue.finish(task.id, "w2", status=SUCCEEDED)


async def test_the_last_attempts_lapse_fails_the_task_instead_of_looping(
    queue: TaskQueue, clock: Clock
) -> None:
    task, _ = await queue.submit(new())
    live, _ = await queue.submit(new())
    await queue.claim_batch("w1", 2)
    clock.advance(61)
    assert await queue.fail_exhausted() == []  # one attempt of two: claimable again, not failed
    await queue.claim("w2")  # the second and last attempt of the first task
    await queue.renew(live.id, "w1")  # ...while the other one's lease stays alive
    clock.advance(61)
    seen: list[str] = []
    failed = await queue.fail_exhausted(on_failed=lambda c, t: seen.append(t.id))
    assert [t.id for t in failed] == [task.id] and seen == [task.id]
    stored = await row(queue, task.id)
    assert (stored["status"], stored["error"]["code"], stored["lease_until"]) == (
        FAILED,
        "task_abandoned",
        None,
    )
    assert await queue.claim("w3") is not None  # `live` (attempt 2 of 2) is claimable, the failed one is not
    assert await queue.claim("w4") is None


async def test_purge_deletes_only_finished_tasks_past_retention_in_bounded_batches(
    queue: TaskQueue, db: Db
) -> None:
    ids = [(await queue.submit(new()))[0].id for _ in range(4)]
    old = utcnow() - timedelta(days=10)

    def age(c: Connection) -> None:
        c.execute(update(Task).where(Task.id.in_(ids[:3])).values(status=SUCCEEDED, finished_at=old))
        c.execute(update(Task).where(Task.id == ids[2]).values(status=FAILED))

    await db.writer.run(age)
    first = await queue.purge_finished(timedelta(days=7), limit=2)
    second = await queue.purge_finished(timedelta(days=7), limit=2)
    assert len(first) == 2 and len(second) == 1
    assert {t.id for t in first + second} == set(ids[:3])
    assert await queue.purge_finished(timedelta(days=7), limit=2) == []
    async with queue.sessions() as session:
        left = (await session.execute(select(Task.id))).scalars().all()
    assert left == [ids[3]]  # the queued one stays, whatever its age
    assert await queue.activity([*ids, new_task_id()]) == {ids[3]: True}
    assert await queue.activity([]) == {}


async def test_activity_tells_live_tasks_from_finished_ones_and_omits_unknown_ids(
    queue: TaskQueue, db: Db
) -> None:
    queued, running, done, failed = [(await queue.submit(new()))[0].id for _ in range(4)]

    def finish(c: Connection) -> None:
        c.execute(update(Task).where(Task.id == running).values(status=IN_PROGRESS))
        c.execute(update(Task).where(Task.id == done).values(status=SUCCEEDED))
        c.execute(update(Task).where(Task.id == failed).values(status=FAILED))

    await db.writer.run(finish)
    unknown = new_task_id()
    assert await queue.activity([queued, running, done, failed, unknown]) == {
        queued: True,
        running: True,
        done: False,
        failed: False,
    }
