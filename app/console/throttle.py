"""The console's sign-in throttle: failed sign-ins slow down, then refuse, a guesser.

Failures are counted per subject: the client's address, and the first characters of the key that
was tried (a tenant key's public prefix; a guess at the admin key). ``free`` failures cost
nothing; each one after locks the subject for a doubling time (``base_s``, 2 x ``base_s``, …),
capped at ``max_lock_s``, so a guesser is slowed at once and soon refused, with 429 and
``retry-after``. Nothing locks anyone out for good: a lock ends after at most ``max_lock_s``, a
subject's count is forgotten ``window_s`` after its last failure, and a successful sign-in clears
its address and its key's prefix.

The counts live in Redis when ``redis.url`` is set, so every node of the gateway sees the same
ones (a guesser cannot spread over replicas); otherwise in the process's memory. Time is the
throttle's ``clock`` (tests move it), passed to Redis rather than read there.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# How much of a tried key names it: enough for a tenant key's public prefix, too little to matter.
KEY_PREFIX_CHARS = 12


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    free: int = 5
    base_s: float = 2.0
    max_lock_s: float = 900.0
    window_s: float = 3600.0

    def lock_s(self, failures: int) -> float:
        """How long a subject is refused after its ``failures``-th failure."""
        if failures <= self.free:
            return 0.0
        return min(self.max_lock_s, self.base_s * 2.0 ** min(failures - self.free - 1, 60))


class FailureStore(Protocol):
    async def locked_until(self, subjects: Sequence[str]) -> float:
        """The latest moment any of ``subjects`` is locked until (0 when none is)."""

    async def fail(self, subject: str, *, now: float, policy: ThrottlePolicy) -> None: ...

    async def clear(self, subjects: Sequence[str]) -> None: ...

    async def aclose(self) -> None: ...


class MemoryFailures:
    """One process's counts: ``subject -> (failures, locked_until, forget_at)``."""

    def __init__(self, *, max_subjects: int = 100_000) -> None:
        self._state: dict[str, tuple[int, float, float]] = {}
        self._max = max_subjects

    async def locked_until(self, subjects: Sequence[str]) -> float:
        return max((self._state[s][1] for s in subjects if s in self._state), default=0.0)

    async def fail(self, subject: str, *, now: float, policy: ThrottlePolicy) -> None:
        failures, _, forget_at = self._state.get(subject, (0, 0.0, 0.0))
        if forget_at <= now:
            failures = 0
        failures += 1
        self._state[subject] = (failures, now + policy.lock_s(failures), now + policy.window_s)
        if len(self._state) > self._max:
            # Bounded: forget what is over first, then the oldest entries.
            self._state = {k: v for k, v in self._state.items() if v[2] > now}
            while len(self._state) > self._max:
                del self._state[next(iter(self._state))]

    async def clear(self, subjects: Sequence[str]) -> None:
        for subject in subjects:
            self._state.pop(subject, None)

    async def aclose(self) -> None:
        return None


# KEYS[1]: the subject's hash. ARGV: now, free, base_s, max_lock_s, window_s (seconds).
_FAIL = """
local now = tonumber(ARGV[1])
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') + 1
local free, base, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lock = 0
if failures > free then
  lock = math.min(cap, base * 2 ^ math.min(failures - free - 1, 60))
end
redis.call('HSET', KEYS[1], 'failures', failures, 'until', tostring(now + lock))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5]) * 1000))
return failures
"""


class RedisFailures:
    """Counts shared by every node on one Redis; each subject's hash expires ``window_s`` after
    its last failure, which is the forgetting. A Redis outage lets sign-ins through, logged: the
    admin key's length, not the throttle, is what makes guessing it hopeless, and an outage must
    not lock the operator out of the console."""

    def __init__(self, url: str, *, prefix: str = "gw:signin:", timeout_s: float = 2.0) -> None:
        self._redis: Redis = Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        self._script = self._redis.register_script(_FAIL)
        self._prefix = prefix

    async def locked_until(self, subjects: Sequence[str]) -> float:
        try:
            found = [await self._redis.hget(self._prefix + s, "until") for s in subjects]
        except RedisError as exc:
            log.warning(
                "sign-in throttle unavailable; not throttling",
                extra={"fields": {"error": type(exc).__name__}},
            )
            return 0.0
        return max((float(v) for v in found if v is not None), default=0.0)

    async def fail(self, subject: str, *, now: float, policy: ThrottlePolicy) -> None:
        args: list[str | int] = [
            repr(now),
            policy.free,
            repr(policy.base_s),
            repr(policy.max_lock_s),
            repr(policy.window_s),
        ]
        try:
            await self._script(keys=[self._prefix + subject], args=args)
        except RedisError as exc:
            log.warning(
                "sign-in throttle unavailable; failure not counted",
                extra={"fields": {"error": type(exc).__name__}},
            )

    async def clear(self, subjects: Sequence[str]) -> None:
        try:
            if subjects:
                await self._redis.delete(*(self._prefix + s for s in subjects))
        except RedisError as exc:
            log.warning(
                "sign-in throttle unavailable; not cleared", extra={"fields": {"error": type(exc).__name__}}
            )

    async def aclose(self) -> None:
        await self._redis.aclose()


class SignInThrottle:
    def __init__(
        self,
        store: FailureStore,
        *,
        policy: ThrottlePolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.policy = policy or ThrottlePolicy()
        self.clock = clock

    @staticmethod
    def subjects(address: str | None, key: str) -> list[str]:
        found = [f"ip:{address or 'unknown'}"]
        if key:
            found.append("key:" + key[:KEY_PREFIX_CHARS])
        return found

    async def wait_s(self, subjects: Sequence[str]) -> int:
        """Whole seconds until these subjects may try again; 0 when they may now."""
        left = await self._store.locked_until(subjects) - self.clock()
        return math.ceil(left) if left > 0 else 0

    async def failed(self, subjects: Sequence[str]) -> None:
        now = self.clock()
        for subject in subjects:
            await self._store.fail(subject, now=now, policy=self.policy)

    async def succeeded(self, subjects: Sequence[str]) -> None:
        await self._store.clear(subjects)

    async def aclose(self) -> None:
        await self._store.aclose()


@asynccontextmanager
async def open_throttle(redis_url: str | None) -> AsyncIterator[SignInThrottle]:
    """The throttle for one gateway: on Redis when configured (shared by nodes), else in memory."""
    throttle = SignInThrottle(RedisFailures(redis_url) if redis_url else MemoryFailures())
    try:
        yield throttle
    finally:
        await throttle.aclose()
