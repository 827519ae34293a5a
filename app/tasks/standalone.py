"""``python -m app worker``: task workers in their own process, sharing the gateway's database."""

from __future__ import annotations

import asyncio
import logging
import signal

from app.lifespan import open_state, prepare
from app.settings import Settings
from app.tasks.worker import work

log = logging.getLogger(__name__)


def run_workers(settings: Settings, *, concurrency: int | None = None) -> int:
    """Run until SIGTERM/SIGINT; the task in hand is finished before the process exits."""
    loops = concurrency or max(settings.tasks.workers, 1)

    async def main() -> None:
        await prepare(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with open_state(settings) as state:
            log.info("standalone workers running", extra={"fields": {"workers": loops}})
            await asyncio.gather(
                *(work(state.tasks, stop, poll_s=settings.tasks.poll_s) for _ in range(loops))
            )

    asyncio.run(main())
    return 0
