"""``max_concurrency`` counted over every node: slots held in Redis under a lease.

One sorted set per upstream, ``<prefix>slots:<upstream>``: member = a slot token, score = when
its lease ends (Redis server time, ms). Taking a slot is one Lua script (drop lapsed leases,
count, add if below the cap), so no two nodes can both take the last one. A node renews the
leases of the calls it has in flight every ``lease_s / 3``; a node that dies (SIGKILL, OOM, a lost
machine) stops renewing, and its slots come back once ``lease_s`` has passed.

Waiting keeps the semantics of the in-process slots (``slots.py``): a call that finds every slot
taken waits up to ``queue_timeout_s``, then gets ``busy_status`` with retry-after (or the router
tries another upstream). The calls waiting on one node queue in order; the one at the head asks
Redis again when a slot is given back (a release that frees a full upstream publishes on the
cluster bus, and a local release wakes it directly) and at least every 250 ms otherwise. Across
nodes there is no queue order: the first node to ask after a release gets the slot.

Failing safe: when Redis cannot be reached a call is never refused for it. The node falls back on
its own in-process slots (``UpstreamSlots``, the same cap, counted on this node alone) for
``_DEGRADED_S`` before asking Redis again, and logs a warning; the cap may then be exceeded up
to once per node. A release or renewal that fails is logged: an unreleased slot lapses with its
lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from redis.exceptions import RedisError

from app.cluster.bus import ClusterBus
from app.upstream.call import SOURCES, CallSource
from app.upstream.slots import SlotPolicy, UpstreamSlots, busy

log = logging.getLogger(__name__)

_DEGRADED_S: Final = 5.0
_POLL_MIN_S: Final = 0.02
_POLL_MAX_S: Final = 0.25

# KEYS: the upstream's slot set. ARGV: cap, token, lease ms. Returns 1 when the slot is taken.
_ACQUIRE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease * 2)
return 1
"""

# KEYS: the slot set. ARGV: token, cap, channel, message. Publishes when the set was full, so the
# nodes with calls waiting ask again at once (and nothing is published while slots are to spare).
_RELEASE: Final = """
local full = redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2])
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 1 and full then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return removed
"""

# KEYS: the slot set. ARGV: lease ms, tokens... A token whose lease lapsed meanwhile (Redis was
# away longer than the lease) is put back: its call is still in flight and must be counted.
_RENEW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return #ARGV - 1
"""


class SharedSlotStore:
    """This process's side of the shared slots: the scripts, the leases it holds and renews, and
    the wake-ups of its waiting calls. One per process; ``start`` it, ``aclose`` it."""

    def __init__(self, bus: ClusterBus, *, lease_s: float = 30.0) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self._bus = bus
        self._lease_ms = max(1, round(lease_s * 1000))
        self._renew_every_s = lease_s / 3
        self._acquire = bus.redis.register_script(_ACQUIRE)
        self._release = bus.redis.register_script(_RELEASE)
        self._renew = bus.redis.register_script(_RENEW)
        self._held: dict[str, set[str]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._degraded_until = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        bus.subscribe("slots", self._released_elsewhere)

    def slots(self, name: str, policy: SlotPolicy) -> SharedSlots:
        """The slots of one upstream (the router's slot factory)."""
        self._wake.setdefault(name, asyncio.Event())
        return SharedSlots(name, policy, self, UpstreamSlots(name, policy))

    async def start(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="slot-leases")

    async def aclose(self) -> None:
        tasks = [t for t in (self._renewer, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def degraded(self) -> bool:
        return asyncio.get_running_loop().time() < self._degraded_until

    def _failed(self, what: str, exc: BaseException) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._degraded_until:
            log.warning(
                "upstream slots counted per process for now: Redis is unreachable",
                extra={"fields": {"during": what, "error": type(exc).__name__, "retry_in_s": _DEGRADED_S}},
            )
        self._degraded_until = loop.time() + _DEGRADED_S

    def _key(self, name: str) -> str:
        return self._bus.key(f"slots:{name}")

    async def try_acquire(self, name: str, limit: int, token: str) -> bool | None:
        """True: the slot is this call's; False: all taken; None: Redis failed (use local slots)."""
        key = self._key(name)
        try:
            taken = await self._acquire(keys=[key], args=[limit, token, self._lease_ms])
        except asyncio.CancelledError:
            # The script may have run: give the slot back rather than leave it to its lease.
            self._spawn(self._zrem(key, token))
            raise
        except (RedisError, OSError) as exc:
            self._failed("acquire", exc)
            return None
        if int(taken) == 1:
            self._held.setdefault(name, set()).add(token)
            return True
        return False

    async def release(self, name: str, limit: int, token: str) -> None:
        # Off the renewal list first, synchronously: whatever happens to the call below, this
        # node stops extending the lease.
        self._held.get(name, set()).discard(token)
        self._wake[name].set()
        message = f"{self._bus.node_id} {name}"
        try:
            await self._release(
                keys=[self._key(name)], args=[token, limit, self._bus.channel("slots"), message]
            )
        except (RedisError, OSError) as exc:
            log.warning(
                "upstream slot not given back (it lapses with its lease): Redis is unreachable",
                extra={"fields": {"upstream": name, "error": type(exc).__name__}},
            )

    async def wait_for_release(self, name: str, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake[name].wait()

    def clear_wake(self, name: str) -> None:
        self._wake[name].clear()

    def _released_elsewhere(self, payload: str | None) -> None:
        # None (messages may have been lost): wake everyone; their heads ask Redis again.
        for name, event in self._wake.items():
            if payload is None or payload == name:
                event.set()

    async def _zrem(self, key: str, token: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._bus.redis.zrem(key, token)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every_s)
            for name, tokens in list(self._held.items()):
                if not tokens:
                    continue
                try:
                    await self._renew(keys=[self._key(name)], args=[self._lease_ms, *tokens])
                except (RedisError, OSError) as exc:
                    log.warning(
                        "upstream slot leases not renewed: Redis is unreachable",
                        extra={"fields": {"upstream": name, "error": type(exc).__name__}},
                    )


@dataclass(slots=True)
class SharedSlots:
    """One upstream's slots counted over every node (see the module docstring)."""

    name: str
    policy: SlotPolicy
    store: SharedSlotStore
    fallback: UpstreamSlots
    waiting: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    # This node's waiting calls take their turn in order; only the first asks Redis.
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    @asynccontextmanager
    async def hold(self, source: CallSource) -> AsyncIterator[None]:
        """A slot for the enclosed call; ``UpstreamBusy`` when none frees up in time."""
        limit = self.policy.limit
        if not limit:
            yield
            return
        token = await self._take(limit, source)
        if token is None:
            async with self.fallback.hold(source):
                yield
            return
        try:
            yield
        finally:
            await self.store.release(self.name, limit, token)

    async def _take(self, limit: int, source: CallSource) -> str | None:
        """The token of the slot taken, or None to use this node's own slots (Redis failed)."""
        if self.store.degraded():
            return None
        token = secrets.token_hex(8)
        if not self._turn.locked():
            taken = await self.store.try_acquire(self.name, limit, token)
            if taken is None or taken:
                return token if taken else None
        self.waiting[source] = self.waiting.get(source, 0) + 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.wait_s
        try:
            try:
                async with asyncio.timeout(self.policy.wait_s):
                    await self._turn.acquire()
            except TimeoutError:
                raise busy(self.policy) from None
            try:
                # The deadline is checked between the steps rather than by a timeout around them:
                # redis-py can absorb a cancellation that lands inside a command.
                pause = _POLL_MIN_S
                while True:
                    self.store.clear_wake(self.name)
                    taken = await self.store.try_acquire(self.name, limit, token)
                    if taken is None or taken:
                        return token if taken else None
                    left = deadline - loop.time()
                    if left <= 0:
                        raise busy(self.policy)
                    await self.store.wait_for_release(self.name, min(pause, left))
                    pause = min(pause * 2, _POLL_MAX_S)
            finally:
                self._turn.release()
        finally:
            self.waiting[source] -= 1
