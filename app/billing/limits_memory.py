"""The in-process limiter: exact sliding logs for one gateway process (the algorithm is in ``limits.py``)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from app.billing.limits import (
    CONCURRENCY_RETRY_US,
    US,
    WINDOW_US,
    KeyLimits,
    LimitGrant,
    Outcome,
    Reason,
    check_images,
    conclude,
    new_lease_id,
)


@dataclass(slots=True)
class _KeyState:
    requests: deque[int] = field(default_factory=deque)
    images: deque[tuple[int, int]] = field(default_factory=deque)
    images_total: int = 0
    leases: set[str] = field(default_factory=set)


class InProcessRateLimiter:
    """Limits for a single process: exact, lock-free (nothing awaits between check and commit).

    Leases are a plain set: a holder that dies takes the whole process, and its counters, with it.
    State is kept per key id, so memory is bounded by the number of keys times their limits.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        # Monotonic by default: the state never leaves the process, so wall-clock steps must not
        # shift the windows.
        self._clock = clock
        self._states: dict[str, _KeyState] = {}

    async def acquire(self, key_id: str, limits: KeyLimits, *, images: int) -> LimitGrant:
        check_images(images)
        if limits.unlimited:
            return LimitGrant(key_id=key_id, lease_id=None, headers={})
        now = round(self._clock() * US)
        state = self._states.setdefault(key_id, _KeyState())
        self._purge(state, now - WINDOW_US)
        reason, wait = self._decide(state, limits, images, now)
        lease_id: str | None = None
        if reason is None:
            if limits.rpm is not None:
                state.requests.append(now)
            if limits.ipm is not None and images > 0:
                state.images.append((now, images))
                state.images_total += images
            if limits.concurrency is not None:
                lease_id = new_lease_id()
                state.leases.add(lease_id)
        outcome = Outcome(
            reason=reason,
            retry_after_s=wait / US,
            requests_used=len(state.requests),
            requests_reset_s=(state.requests[0] + WINDOW_US - now) / US if state.requests else 0.0,
            images_used=state.images_total,
            images_reset_s=(state.images[0][0] + WINDOW_US - now) / US if state.images else 0.0,
            concurrent=len(state.leases),
        )
        return conclude(key_id, limits, outcome, images=images, lease_id=lease_id)

    @staticmethod
    def _purge(state: _KeyState, horizon: int) -> None:
        while state.requests and state.requests[0] <= horizon:
            state.requests.popleft()
        while state.images and state.images[0][0] <= horizon:
            state.images_total -= state.images.popleft()[1]

    @staticmethod
    def _decide(state: _KeyState, limits: KeyLimits, images: int, now: int) -> tuple[Reason | None, int]:
        """The limit that refuses the request (the one needing the longest wait, in µs), or None."""
        refusals: list[tuple[int, Reason]] = []
        if limits.rpm is not None and len(state.requests) >= limits.rpm:
            # The request can pass once enough of the oldest entries have left the window.
            oldest_needed = state.requests[len(state.requests) - limits.rpm]
            refusals.append((oldest_needed + WINDOW_US - now, "requests"))
        if limits.ipm is not None:
            if images > limits.ipm:
                return "too_large", WINDOW_US
            excess = state.images_total + images - limits.ipm
            if images > 0 and excess > 0:
                freed = 0
                for stamp, count in state.images:
                    freed += count
                    if freed >= excess:
                        refusals.append((stamp + WINDOW_US - now, "images"))
                        break
        if limits.concurrency is not None and len(state.leases) >= limits.concurrency:
            refusals.append((CONCURRENCY_RETRY_US, "concurrency"))
        if not refusals:
            return None, 0
        wait, reason = max(refusals)
        return reason, wait

    async def release(self, grant: LimitGrant) -> None:
        if grant.lease_id is None:
            return
        state = self._states.get(grant.key_id)
        if state is not None:
            state.leases.discard(grant.lease_id)

    async def aclose(self) -> None:
        self._states.clear()
