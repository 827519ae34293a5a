"""Each upstream's ``max_concurrency``: a slot per call in flight, waited for up to a bound.

Without a cap (``max_concurrency: null``) there are no slots and nothing waits. With one, a call
that finds every slot taken waits in line (FIFO, ``asyncio.Semaphore``) up to ``queue_timeout_s``;
then the router tries another upstream, or answers ``busy_status`` with ``retry-after``. Waiting
calls are counted by who is waiting (a client's request or a background task: the call's
``source``, ``app/upstream/call.py``), for ``/metrics`` and ``/admin/upstreams``.

``UpstreamSlots`` counts the calls of this process. With ``redis.url`` set the router takes
``SharedSlots`` (``shared_slots.py``) instead, which count the calls of every node together;
both answer to ``Slots``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from app.core.errors import UpstreamBusy
from app.upstream.call import SOURCES, CallSource


@dataclass(frozen=True, slots=True)
class SlotPolicy:
    limit: int | None
    wait_s: float = 30.0
    busy_status: int = 503


class Slots(Protocol):
    """The slots of one upstream, as the router uses them."""

    name: str
    policy: SlotPolicy
    waiting: dict[str, int]

    def hold(self, source: CallSource) -> AbstractAsyncContextManager[None]: ...


def busy(policy: SlotPolicy) -> UpstreamBusy:
    """What a call gets when no slot freed up within ``policy.wait_s``."""
    return UpstreamBusy(
        "The upstream service is at its concurrency limit; try again shortly.",
        status=policy.busy_status,
        retry_after_s=math.ceil(min(max(policy.wait_s, 1.0), 60.0)),
    )


@dataclass(slots=True)
class UpstreamSlots:
    """The slots of one upstream (none when it has no cap) and who is waiting for them."""

    name: str
    policy: SlotPolicy
    waiting: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    _semaphore: asyncio.Semaphore | None = None

    def __post_init__(self) -> None:
        if self.policy.limit:
            self._semaphore = asyncio.Semaphore(self.policy.limit)

    @property
    def capped(self) -> bool:
        return self._semaphore is not None

    def has_free_slot(self) -> bool:
        return self._semaphore is None or not self._semaphore.locked()

    @asynccontextmanager
    async def hold(self, source: CallSource) -> AsyncIterator[None]:
        """A slot for the enclosed call; ``UpstreamBusy`` when none frees up in time. ``source``
        says who waits, for the waiting counts."""
        semaphore = self._semaphore
        if semaphore is None:
            yield
            return
        if semaphore.locked():
            self.waiting[source] = self.waiting.get(source, 0) + 1
            try:
                async with asyncio.timeout(self.policy.wait_s):
                    await semaphore.acquire()
            except TimeoutError:
                raise busy(self.policy) from None
            finally:
                self.waiting[source] -= 1
        else:
            await semaphore.acquire()
        try:
            yield
        finally:
            semaphore.release()
