"""The worker pool's claim loop against a scripted task service: when a task's end makes it claim
again. Each ending used to trigger a claim (the fair ranking query, milliseconds on a long queue),
one per finished task; it now claims on an ending only when that can start a task."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from app.db.tables import Task
from app.tasks.worker import work

# Never reached: every claim in these tests comes from an event, not from the poll.
POLL_S = 3600.0


class ScriptedQueue:
    lease = timedelta(hours=1)

    def __init__(self, backlog: bool) -> None:
        self.backlog = backlog

    async def renew_all(self, worker: str, ids: list[str]) -> set[str]:
        return set(ids)


class ScriptedTasks:
    """Hands out ``total`` tasks (``first`` at the first claim, one per claim after that); each runs
    until the test releases it."""

    def __init__(self, total: int, first: int, *, backlog: bool) -> None:
        self.queue = ScriptedQueue(backlog)
        self.wakeup = asyncio.Event()
        self.claims = 0
        self.claimed = asyncio.Event()
        self._left = total
        self._first = first
        self.release: dict[str, asyncio.Event] = {}
        self.finished: list[str] = []

    async def claim(self, worker: str, limit: int) -> list[Task]:
        self.claims += 1
        self.claimed.set()
        take = min(limit, self._left, self._first if self.claims == 1 else 1)
        self._left -= take
        tasks = [Task(id=f"t{len(self.release) + i}") for i in range(take)]
        for task in tasks:
            self.release[task.id] = asyncio.Event()
        return tasks

    async def run_claimed(self, task: Task, worker: str) -> None:
        await self.release[task.id].wait()
        self.finished.append(task.id)


async def _settle() -> None:
    """Let the pool's loop react to what just happened (no clock: a bounded number of turns)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def test_tasks_ending_with_nothing_queued_claim_nothing() -> None:
    tasks = ScriptedTasks(10, 10, backlog=False)
    stop = asyncio.Event()
    pool = asyncio.create_task(work(tasks, stop, poll_s=POLL_S, concurrency=100, batch=32))  # type: ignore[arg-type]
    await tasks.claimed.wait()
    await _settle()
    for task_id in list(tasks.release):
        tasks.release[task_id].set()
        await _settle()
    assert len(tasks.finished) == 10
    assert tasks.claims == 1  # was 11: one more claim per finished task
    tasks.wakeup.set()  # a submission still starts a claim at once
    tasks.claimed.clear()
    await tasks.claimed.wait()
    assert tasks.claims == 2
    stop.set()
    await pool


async def test_a_full_pool_or_a_backlog_claims_when_a_task_ends() -> None:
    for backlog, concurrency in ((False, 2), (True, 100)):
        tasks = ScriptedTasks(6, 2, backlog=backlog)
        stop = asyncio.Event()
        pool = asyncio.create_task(work(tasks, stop, poll_s=POLL_S, concurrency=concurrency, batch=32))  # type: ignore[arg-type]
        await tasks.claimed.wait()
        await _settle()
        for _ in range(4):
            claims = tasks.claims
            tasks.claimed.clear()
            running = [t for t in tasks.release if t not in tasks.finished]
            tasks.release[running[0]].set()
            await tasks.claimed.wait()  # the ending made room that a queued task can take
            assert tasks.claims == claims + 1
            await _settle()
        stop.set()
        for event in tasks.release.values():
            event.set()
        await pool
