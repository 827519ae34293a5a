"""The task queue on a real database (SQLite and PostgreSQL): fair claims across keys, per-key
limits, batched claims and lease renewal, with the queue's clock moved by the test (no sleeping)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Connection, insert, select

from app.core.errors import RateLimitError
from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_head
from app.db.tables import ApiKey, Task
from app.db.transient import patient
from app.db.writer import Work, Writer, create_writer
from app.tasks.queue import QUEUED, NewTask, TaskQueue, new_task_id
from tests.services import fresh_postgres_database

T = TypeVar("T")

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def queue(db_url: str, clock: Clock) -> AsyncIterator[TaskQueue]:
    engine = create_engine(db_url)
    await upgrade_head(engine)
    writer = create_writer(engine)
    try:
        yield TaskQueue(create_sessionmaker(engine), writer, lease_s=60, clock=clock)
    finally:
        await writer.aclose()
        await engine.dispose()


def _key(key_id: str, **limits: int | None) -> dict[str, object]:
    return dict(
        id=key_id,
        name=key_id,
        key_hash=key_id.ljust(64, "0"),
        prefix="sk-gw-",
        moderation="default",
        enabled=True,
        created_at=T0,
        spent_micros=0,
        reserved_micros=0,
        price_multiplier_ppm=1_000_000,
        max_queued_tasks=limits.get("max_queued_tasks"),
        max_tasks_in_flight=limits.get("max_tasks_in_flight"),
    )


def _task(key_id: str, index: int) -> dict[str, object]:
    return dict(
        id=f"task_{key_id}_{index:05d}",
        key_id=key_id,
        request_id=f"req_{key_id}_{index}",
        endpoint="generations",
        model="gpt-image-1",
        status=QUEUED,
        spec={"payload": {}},
        response_format="b64_json",
        hold_micros=0,
        attempts=0,
        created_at=T0 + timedelta(milliseconds=index),
    )


async def _seed(queue: TaskQueue, keys: list[dict[str, object]], tasks: list[dict[str, object]]) -> None:
    def write(c: Connection) -> None:
        c.execute(insert(ApiKey), keys)
        for start in range(0, len(tasks), 500):
            c.execute(insert(Task), tasks[start : start + 500])

    await queue._writer.run(write)


async def test_one_keys_backlog_does_not_delay_another_keys_task(queue: TaskQueue) -> None:
    backlog = [_task("key_a", i) for i in range(1000)]
    # Key B's single task arrives after all 1,000 of key A's.
    late = dict(_task("key_b", 0), created_at=T0 + timedelta(seconds=5))
    await _seed(queue, [_key("key_a"), _key("key_b")], [*backlog, late])
    first_round = await queue.claim_batch("w1", 8)
    assert len(first_round) == 8
    assert late["id"] in {t.id for t in first_round}, "key B waited behind key A's backlog"
    # Within a key, oldest first: key A's tasks come in submission order.
    assert [t.id for t in first_round if t.key_id == "key_a"] == [b["id"] for b in backlog[:7]]


async def test_claims_alternate_between_keys(queue: TaskQueue) -> None:
    tasks = [_task(k, i) for k in ("key_a", "key_b", "key_c") for i in range(4)]
    await _seed(queue, [_key("key_a"), _key("key_b"), _key("key_c")], tasks)
    claimed = await queue.claim_batch("w1", 6)
    assert sorted(t.key_id for t in claimed) == ["key_a", "key_a", "key_b", "key_b", "key_c", "key_c"]
    assert [t.key_id for t in claimed[:3]] == ["key_a", "key_b", "key_c"]


async def test_max_tasks_in_flight_caps_a_key_across_claims(queue: TaskQueue) -> None:
    tasks = [_task("key_a", i) for i in range(10)] + [_task("key_b", i) for i in range(3)]
    await _seed(queue, [_key("key_a", max_tasks_in_flight=2), _key("key_b")], tasks)
    first = await queue.claim_batch("w1", 10)
    assert sorted(t.key_id for t in first) == ["key_a", "key_a", "key_b", "key_b", "key_b"]
    assert await queue.claim_batch("w2", 10) == []  # key A is at its limit, key B is empty
    running_a = [t for t in first if t.key_id == "key_a"]
    assert await queue.finish(running_a[0].id, "w1", status="succeeded")
    (next_a,) = await queue.claim_batch("w2", 10)
    assert next_a.key_id == "key_a" and next_a.id == "task_key_a_00002"


async def test_max_queued_tasks_refuses_with_429_and_retry_after(queue: TaskQueue) -> None:
    await _seed(queue, [_key("key_q", max_queued_tasks=2)], [])

    def new(i: int) -> NewTask:
        return NewTask(
            new_task_id(), "key_q", f"r{i}", "generations", "gpt-image-1", {}, "b64_json", None, None, None, 0
        )

    for i in range(2):
        assert (await queue.submit(new(i), max_queued=2))[1]
    with pytest.raises(RateLimitError) as refused:
        await queue.submit(new(2), max_queued=2)
    assert refused.value.status_code == 429 and refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.headers["retry-after"]) >= 1
    # A running task no longer waits: room again.
    assert await queue.claim_batch("w1", 1)
    assert (await queue.submit(new(3), max_queued=2))[1]


async def test_a_renewed_lease_outlives_lease_s_and_is_not_taken_twice(
    queue: TaskQueue, clock: Clock
) -> None:
    await _seed(queue, [_key("key_l")], [_task("key_l", 0)])
    (task,) = await queue.claim_batch("w1", 1)
    lease = queue.lease.total_seconds()
    # The running task outlives several leases; its worker renews every third of one.
    for _ in range(9):
        clock.advance(lease / 3)
        assert await queue.renew_all("w1", [task.id]) == {task.id}
        assert await queue.claim_batch("w2", 1) == []
    assert clock.now - T0 > 2 * queue.lease
    assert await queue.finish(task.id, "w1", status="succeeded")
    assert await queue.claim_batch("w2", 1) == []
    async with queue._sessions() as session:
        row = (await session.execute(select(Task).where(Task.id == task.id))).scalar_one()
    assert row.attempts == 1 and row.worker == "w1"


async def test_an_unrenewed_lease_lapses_and_another_worker_takes_over(
    queue: TaskQueue, clock: Clock
) -> None:
    await _seed(queue, [_key("key_l")], [_task("key_l", 0)])
    (task,) = await queue.claim_batch("w1", 1)
    clock.advance(queue.lease.total_seconds() + 1)
    (retaken,) = await queue.claim_batch("w2", 1)
    assert retaken.id == task.id and retaken.attempts == 2
    assert await queue.renew_all("w1", [task.id]) == set()  # the first worker lost it
    assert not await queue.finish(task.id, "w1", status="succeeded")


async def test_concurrent_batch_claims_never_share_a_task(queue: TaskQueue) -> None:
    await _seed(
        queue, [_key("key_a"), _key("key_b")], [_task(k, i) for k in ("key_a", "key_b") for i in range(60)]
    )
    ids: list[str] = []
    for _ in range(20):  # concurrent claimers may come back short, never with a shared task
        rounds = await asyncio.gather(*(queue.claim_batch(f"w{i}", 16) for i in range(8)))
        ids += [t.id for claimed in rounds for t in claimed]
        if not any(rounds):
            break
    assert len(ids) == len(set(ids)) == 120


def _submission(key_id: str, index: int, idempotency_key: str | None = None) -> NewTask:
    return NewTask(
        new_task_id(),
        key_id,
        f"r{index}",
        "generations",
        "gpt-image-1",
        {},
        "b64_json",
        idempotency_key,
        None,
        None,
        0,
    )


async def test_a_burst_of_submissions_commits_in_one_transaction(queue: TaskQueue) -> None:
    await _seed(queue, [_key("key_burst")], [])
    answers = await asyncio.gather(*(queue.submit(_submission("key_burst", i)) for i in range(50)))
    assert all(created for _, created in answers)
    # Submitted in one turn of the event loop: one transaction carried all fifty, where each had
    # one of its own before.
    assert (queue.submit_batches.batches, queue.submit_batches.items) == (1, 50)
    async with queue.sessions() as session:
        stored = set((await session.scalars(select(Task.id).where(Task.key_id == "key_burst"))).all())
    assert stored == {task.id for task, _ in answers}
    # First in, first out within the key, though one transaction wrote them all.
    assert [t.id for t in await queue.claim_batch("w1", 50)] == [task.id for task, _ in answers]


async def test_max_queued_tasks_is_exact_within_and_across_batches(queue: TaskQueue) -> None:
    await _seed(queue, [_key("key_cap", max_queued_tasks=5), _key("key_free")], [])

    async def burst(key_id: str, size: int, limit: int | None) -> list[bool]:
        async def one(i: int) -> bool:
            try:
                return (await queue.submit(_submission(key_id, i), max_queued=limit))[1]
            except RateLimitError:
                return False

        return list(await asyncio.gather(*(one(i) for i in range(size))))

    first, free = await asyncio.gather(burst("key_cap", 3, 5), burst("key_free", 4, None))
    assert first == [True] * 3 and free == [True] * 4
    second = await burst("key_cap", 20, 5)
    assert second.count(True) == 2  # 5 in all, the rest refused in the same batch
    assert second[:2] == [True, True]  # in arrival order
    assert (await burst("key_cap", 1, 5)) == [False]
    # One task of each key starts (round-robin): key_cap has room for exactly one more.
    assert {t.key_id for t in await queue.claim_batch("w1", 2)} == {"key_cap", "key_free"}
    assert (await burst("key_cap", 3, 5)).count(True) == 1


async def test_one_idempotency_key_twice_in_a_batch_makes_one_task(queue: TaskQueue) -> None:
    await _seed(queue, [_key("key_idem")], [])
    (a, a_created), (b, b_created) = await asyncio.gather(
        queue.submit(_submission("key_idem", 0, "same")), queue.submit(_submission("key_idem", 1, "same"))
    )
    assert (a_created, b_created) == (True, False) and a.id == b.id
    (again, created) = await queue.submit(_submission("key_idem", 2, "same"))
    assert not created and again.id == a.id


# A batch's lines are ordinary tasks of the batch's key, so a 5,000-line batch is 5,000 tasks of one key
# here: another key's single async task must be the next claim while the batch runs (counted).
BATCH_LINES = 5_000


def _single(key_id: str) -> NewTask:
    return NewTask(
        new_task_id(), key_id, "req_b", "generations", "gpt-image-1", {}, "b64_json", None, None, None, 0
    )


async def _claims_until(queue: TaskQueue, task_id: str, *, slots: int, running: list[str]) -> int:
    """Claims of ONE task, as a pool with ``slots`` free workers makes them, until ``task_id`` is
    leased; a worker whose slot is needed finishes its oldest line first. Returns how many."""
    for count in range(1, 50):
        if len(running) >= slots:
            assert await queue.finish(running.pop(0), "pool", status="succeeded")
        (claimed,) = await queue.claim_batch("pool", 1)
        if claimed.id == task_id:
            return count
        running.append(claimed.id)
    raise AssertionError("never claimed")


async def test_a_single_task_is_the_next_claim_while_a_large_batch_runs(
    queue: TaskQueue, clock: Clock
) -> None:
    await _seed(queue, [_key("key_a"), _key("key_b")], [_task("key_a", i) for i in range(BATCH_LINES)])
    running: list[str] = []
    for _ in range(4):  # the batch's first lines are running on a pool of four
        (claimed,) = await queue.claim_batch("pool", 1)
        running.append(claimed.id)
    assert all(task_id.startswith("task_key_a_") for task_id in running)
    clock.advance(10)
    b, _ = await queue.submit(_single("key_b"))
    # Before the fix, every claim took key A's oldest line (older than B's task) and B waited
    # behind all 5,000 of them.
    assert await _claims_until(queue, b.id, slots=4, running=running) == 1
    # The batch goes on after it, oldest line first.
    (next_a,) = await queue.claim_batch("pool", 1)
    assert next_a.id == "task_key_a_00004"


async def test_a_single_task_waits_at_most_one_claim_when_the_batch_is_idle(
    queue: TaskQueue, clock: Clock
) -> None:
    await _seed(queue, [_key("key_a"), _key("key_b")], [_task("key_a", i) for i in range(BATCH_LINES)])
    clock.advance(10)
    b, _ = await queue.submit(_single("key_b"))
    # Neither key has anything running: the tie goes to the older task (key A's first line), and
    # key B's is the next one.
    assert await _claims_until(queue, b.id, slots=4, running=[]) == 2


async def test_keys_are_levelled_by_what_they_have_running(queue: TaskQueue) -> None:
    tasks = [_task("key_a", i) for i in range(20)] + [_task("key_b", i) for i in range(20)]
    await _seed(queue, [_key("key_a"), _key("key_b"), _key("key_c")], tasks)
    first = await queue.claim_batch("w1", 6)
    assert sorted(t.key_id for t in first) == ["key_a"] * 3 + ["key_b"] * 3
    # Key C arrives with three tasks: a claim of four gives C three (it runs nothing) before A or B
    # get a fourth, and the fourth slot goes to the older of A and B.
    late = [dict(_task("key_c", i), created_at=T0 + timedelta(seconds=5, milliseconds=i)) for i in range(3)]
    await queue._writer.run(lambda c: c.execute(insert(Task), late))
    second = await queue.claim_batch("w1", 4)
    assert [t.key_id for t in second] == ["key_c", "key_c", "key_c", "key_a"]


class LostCommitReply:
    """A writer whose next write lands, then reports a dropped connection (a COMMIT whose reply
    was lost: the writer itself cannot tell whether it landed, so it does not retry)."""

    def __init__(self, inner: Writer) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self.lose_next = False

    def run_now(self, work: Work[T]) -> T:
        return self.inner.run_now(work)

    async def run(self, work: Work[T]) -> T:
        result = await self.inner.run(work)
        if self.lose_next:
            self.lose_next = False
            raise ConnectionResetError("connection dropped during COMMIT")
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_dispatch_mark_whose_commit_reply_was_lost_is_written_not_failed(queue: TaskQueue) -> None:
    await _seed(queue, [_key("key_a")], [_task("key_a", 0)])
    (task,) = await queue.claim_batch("w1", 1)
    lossy = LostCommitReply(queue._writer)
    queue._writer = lossy
    lossy.lose_next = True
    with patient(None):
        assert await queue.mark_dispatched(task.id, "w1") is True
    assert lossy.lose_next is False

    def row(c: Connection) -> Any:
        return c.execute(select(Task.dispatched_at, Task.worker).where(Task.id == task.id)).one()

    dispatched_at, worker = await queue._writer.run(row)
    assert dispatched_at is not None and worker == "w1"
