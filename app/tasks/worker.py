"""Worker pools: lease tasks in batches and run up to ``concurrency`` of them at once, as coroutines.

A task spends almost all its time waiting for the upstream, so one process can hold hundreds in
flight; the bound that matters is the upstreams' capacity, enforced by the router's slots. The pool
renews the leases of all its running tasks in one statement every third of the lease, so a task
that runs longer than ``lease_s`` is never taken by another worker while this one lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import secrets
import socket

from app.db.tables import Task
from app.db.transient import is_transient, patience, patient
from app.tasks.service import TaskService

log = logging.getLogger(__name__)


def worker_name() -> str:
    """Unique per pool: host, process and a random part (two pools in one process differ)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


async def work(
    tasks: TaskService,
    stop: asyncio.Event,
    *,
    poll_s: float,
    concurrency: int = 1,
    batch: int = 32,
    name: str | None = None,
) -> None:
    """One pool until ``stop`` is set; the tasks in hand are finished first."""
    name = name or worker_name()
    patient_context = contextvars.copy_context()
    patient_context.run(patience.set, None)
    running: dict[str, asyncio.Task[None]] = {}
    freed = asyncio.Event()
    keeper = asyncio.create_task(keep_leases(tasks, name, running), name=f"leases-{name}")
    log.info("task worker started", extra={"fields": {"worker": name, "concurrency": concurrency}})

    def start(task: Task) -> None:
        # A running task waits out transient database errors for as long as they last: its worker
        # lives, so it must neither fail nor lose its lease over them (app/db/transient.py).
        job = asyncio.create_task(
            tasks.run_claimed(task, name), name=f"task-{task.id}", context=patient_context
        )
        running[task.id] = job

        def done(_: asyncio.Task[None], task_id: str = task.id) -> None:
            running.pop(task_id, None)
            freed.set()

        job.add_done_callback(done)

    try:
        while not stop.is_set():
            # Cleared before claiming, so a submit that lands during the claim is not missed.
            tasks.wakeup.clear()
            freed.clear()
            room = concurrency - len(running)
            wanted = min(room, batch)
            claimed: list[Task] = []
            if wanted > 0:
                try:
                    claimed = await tasks.claim(name, wanted)
                except Exception as exc:
                    # The database hiccuped (or similar): back off rather than spin.
                    if is_transient(exc):
                        log.warning("task claim failed: database busy or unreachable; retrying")
                    else:
                        log.exception("task claim failed; retrying")
                for task in claimed:
                    start(task)
                if claimed and len(claimed) == wanted:
                    continue  # there may be more waiting
            # A task ending frees room, which matters only if the pool was full or tasks were left
            # queued; otherwise claiming on every ending ran a claim per finished task (measured:
            # ~1,000 claims for 1,000 tasks, at up to 50 ms each with 2,000 queued on SQLite).
            if room <= len(claimed):
                await _wait_any(stop, freed, timeout=poll_s)
            elif tasks.queue.backlog:
                await _wait_any(stop, tasks.wakeup, freed, timeout=poll_s)
            else:
                await _wait_any(stop, tasks.wakeup, timeout=poll_s)
        if running:
            await asyncio.wait(list(running.values()))
    finally:
        for job in list(running.values()):
            job.cancel()
        keeper.cancel()
        await asyncio.gather(keeper, *running.values(), return_exceptions=True)
    log.info("task worker stopped", extra={"fields": {"worker": name}})


async def keep_leases(tasks: TaskService, worker: str, running: dict[str, asyncio.Task[None]]) -> None:
    """Renew the leases of every task this pool runs, every third of the lease."""
    interval = tasks.queue.lease.total_seconds() / 3
    while True:
        await asyncio.sleep(interval)
        ids = list(running)
        if not ids:
            continue
        try:
            # Retried until shortly before the lease would lapse: a busy database must not let a
            # live worker's leases go (another worker would take its tasks for interrupted ones).
            with patient(2 * interval - 1):
                kept = await tasks.queue.renew_all(worker, ids)
        except Exception:
            log.exception("task lease renewal failed; retrying")
            continue
        for lost in set(ids) - kept:
            # Finished in the database a moment ago (still wrapping up here), or taken over by
            # another worker after this one stalled past its lease: the finish guard decides.
            if lost in running:
                log.info("task lease not renewed", extra={"fields": {"task_id": lost}})


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in set(events)]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED), timeout)
    finally:
        for waiter in waiters:
            waiter.cancel()
