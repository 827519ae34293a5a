"""``python -m app worker``: task workers in their own process, sharing the gateway's database."""

from __future__ import annotations

import asyncio
import logging
import signal

from app.runtime.lifespan import housekeeper, open_state, prepare, warn_per_process_limits, webhook_sender
from app.runtime.settings import Settings
from app.tasks.worker import work

log = logging.getLogger(__name__)


def run_workers(settings: Settings, *, concurrency: int | None = None) -> int:
    """One worker pool running up to ``concurrency`` (default ``tasks.concurrency``) tasks at once,
    until SIGTERM/SIGINT; the tasks in hand are finished before the process exits."""
    limit = concurrency or settings.tasks.concurrency

    async def main() -> None:
        await prepare(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with open_state(settings) as state:
            log.info("standalone worker running", extra={"fields": {"concurrency": limit}})
            if settings.redis.url is None:
                # A worker of its own is a second process beside `serve`, at least.
                warn_per_process_limits("python -m app worker runs beside the API")
            sender = (
                asyncio.create_task(webhook_sender(state).run_forever())
                if settings.webhooks.enabled
                else None
            )
            # The same housekeeping as `serve` (purges, hold reconciliation, the orphan sweep), so a
            # cluster of workers alone stays clean; each shared chore runs on one node at a time.
            chores = asyncio.create_task(housekeeper(state).run_forever(), name="housekeeping")
            try:
                await work(
                    state.tasks,
                    stop,
                    poll_s=settings.tasks.poll_s,
                    concurrency=limit,
                    batch=settings.tasks.claim_batch,
                )
            finally:
                background = [chores, *([sender] if sender is not None else [])]
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)

    asyncio.run(main())
    return 0
