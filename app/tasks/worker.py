"""Worker loops: claim a task, run it, repeat; idle workers poll, and wake early on a local submit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket

from app.tasks.service import TaskService

log = logging.getLogger(__name__)


def worker_name() -> str:
    """Unique per worker: host, process and a random part (two loops in one process differ)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


async def work(tasks: TaskService, stop: asyncio.Event, *, poll_s: float) -> None:
    """One worker loop until ``stop`` is set; a task in progress is finished first."""
    name = worker_name()
    log.info("task worker started", extra={"fields": {"worker": name}})
    while not stop.is_set():
        try:
            ran = await tasks.run_next(name)
        except Exception:
            # The database hiccuped (or similar): back off rather than spin.
            log.exception("task worker error; retrying")
            ran = False
        if ran:
            continue
        tasks.wakeup.clear()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(tasks.wakeup.wait())]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), poll_s)
        for waiter in waits:
            waiter.cancel()
    log.info("task worker stopped", extra={"fields": {"worker": name}})


async def purge_forever(tasks: TaskService, *, interval_s: float) -> None:
    while True:
        try:
            purged = await tasks.purge()
            if purged:
                log.info("purged finished tasks", extra={"fields": {"count": purged}})
        except Exception:
            log.exception("task purge failed; retrying later")
        await asyncio.sleep(interval_s)
