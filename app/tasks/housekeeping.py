"""Housekeeping chores, run by every kind of node: ``serve`` and ``python -m app worker`` alike.

A chore over shared state (finished tasks past retention, holds of dead requests, expired images
in a shared object store) runs once per cluster: each node tries to take the chore's lease
(app/db/leases.py) before every run, and only the holder runs it. The holder renews the lease by
running; the lease lasts two periods, so a holder that dies (or stalls) hands the chore to another
node within two periods, and a live holder keeps it though one of its runs starts a little late.
A chore over this node's own disk (the orphan sweep of its spool and task inputs, or images in a
local store) runs on every node, with no lease.

Chores are idempotent (each deletes or releases what is due), so the rare overlap a stalled
holder could cause (it runs past its lease while another has taken over) costs a little work
twice, never a wrong result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from app.db.leases import Leases
from app.db.transient import is_transient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Chore:
    name: str
    every_s: float
    run: Callable[[], Awaitable[object]]
    # Over shared state: once per cluster, under a lease. False: on every node (its own disk).
    cluster_wide: bool = True

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=2 * self.every_s)


class Housekeeper:
    def __init__(self, leases: Leases, chores: list[Chore]) -> None:
        self._leases = leases
        self.chores = chores
        # Runs of each chore on this node (for tests and the log).
        self.runs: dict[str, int] = {chore.name: 0 for chore in chores}

    async def step(self, chore: Chore) -> bool:
        """Run ``chore`` once if this node may (it holds or takes the lease); True if it ran."""
        try:
            if chore.cluster_wide and not await self._leases.take(chore.name, chore.lease):
                return False
        except Exception as exc:
            if is_transient(exc):
                log.warning("housekeeping lease unavailable: database busy; trying later")
            else:
                log.exception("housekeeping lease unavailable", extra={"fields": {"chore": chore.name}})
            return False
        try:
            result = await chore.run()
        except Exception:
            log.exception(
                "housekeeping chore failed; retrying later", extra={"fields": {"chore": chore.name}}
            )
        else:
            if isinstance(result, int) and result:
                log.info("housekeeping", extra={"fields": {"chore": chore.name, "count": result}})
        self.runs[chore.name] += 1
        return True

    async def run_forever(self) -> None:
        """Each chore in its own loop until cancelled; leases held are given up on the way out."""
        loops = [asyncio.create_task(self._loop(chore), name=f"chore-{chore.name}") for chore in self.chores]
        try:
            await asyncio.gather(*loops)
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            for chore in self.chores:
                if chore.cluster_wide:
                    try:
                        await asyncio.shield(self._leases.release(chore.name))
                    except (Exception, asyncio.CancelledError):
                        pass  # it lapses by itself

    async def _loop(self, chore: Chore) -> None:
        while True:
            await self.step(chore)
            await asyncio.sleep(chore.every_s)
