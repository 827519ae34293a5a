"""Breaker state shared by every node: an upstream one node tripped cools down on all of them.

When a node's breaker opens (``health.py``), it writes ``<prefix>breaker:<upstream>`` to Redis,
which expires when the cool-down ends (``open_s``), and publishes the change on the cluster bus;
every other node opens its own breaker for what is left of the cool-down. A probe that succeeds
deletes the key and publishes the close. Each node also reads every breaker key once a second, so
a node that missed a message (or started after it) follows within a second all the same.

What stays per node: the counts that decide to open (each node opens on its own failures, then
tells the others), and the half-open probe (after the cool-down each node may send its own).

Failing safe: when Redis cannot be reached, each node's breakers work on their own, as without
Redis; the failure is logged and nothing is refused for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, Final

from redis.exceptions import RedisError

from app.cluster.bus import ClusterBus
from app.domain.states import BreakerState
from app.upstream.health import BreakerChange, CircuitBreaker

log = logging.getLogger(__name__)

SYNC_EVERY_S: Final = 1.0


class SharedBreakers:
    """This process's breakers, kept in step with the cluster's through Redis."""

    def __init__(self, bus: ClusterBus, *, sync_every_s: float = SYNC_EVERY_S) -> None:
        self._bus = bus
        self._sync_every_s = sync_every_s
        self._breakers: dict[str, CircuitBreaker] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._syncer: asyncio.Task[None] | None = None
        self._failing = False
        bus.subscribe("breakers", self._heard)

    def attach(self, breakers: Iterable[CircuitBreaker]) -> None:
        for breaker in breakers:
            self._breakers[breaker.name] = breaker
            breaker.on_change = self._changed

    async def start(self) -> None:
        if self._syncer is None:
            await self.sync()
            self._syncer = asyncio.create_task(self._sync_forever(), name="breaker-sync")

    async def aclose(self) -> None:
        tasks = [t for t in (self._syncer, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _key(self, name: str) -> str:
        return self._bus.key(f"breaker:{name}")

    def _changed(self, change: BreakerChange) -> None:
        # Called from the breaker, which never awaits: the write goes out on its own task.
        task = asyncio.get_running_loop().create_task(self._share(change))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _share(self, change: BreakerChange) -> None:
        key = self._key(change.name)
        record = {"name": change.name, "failures": change.consecutive_failures, "reason": change.reason}
        try:
            if change.state is BreakerState.OPEN:
                open_ms = max(1, round(change.open_s * 1000))
                await self._bus.redis.set(key, json.dumps(record), px=open_ms)
                message = {**record, "state": "open", "remaining_ms": open_ms}
            else:
                await self._bus.redis.delete(key)
                message = {**record, "state": "closed"}
        except (RedisError, OSError) as exc:
            self._warn(exc)
            return
        await self._bus.publish("breakers", json.dumps(message))

    def _heard(self, payload: str | None) -> None:
        if payload is None:  # messages may have been lost: read the state now
            self._spawn(self.sync())
            return
        try:
            message = json.loads(payload)
            breaker = self._breakers.get(str(message["name"]))
            if breaker is None:
                return  # an upstream this node does not have (configs differ between nodes)
            if message["state"] == "open":
                breaker.open_elsewhere(int(message["remaining_ms"]) / 1000, failures=int(message["failures"]))
            else:
                breaker.close_elsewhere()
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable breaker message on the cluster bus")

    async def sync(self) -> None:
        """Open here every breaker that is open in Redis."""
        names = list(self._breakers)
        if not names:
            return
        try:
            async with self._bus.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.get(self._key(name))
                    pipe.pttl(self._key(name))
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._warn(exc)
            return
        self._failing = False
        for index, name in enumerate(names):
            record, ttl_ms = replies[2 * index], replies[2 * index + 1]
            if record is None or int(ttl_ms) <= 0:
                continue
            with contextlib.suppress(ValueError, TypeError, KeyError):
                failures = int(json.loads(record)["failures"])
                self._breakers[name].open_elsewhere(int(ttl_ms) / 1000, failures=failures)

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sync_every_s)
            await self.sync()

    def _warn(self, exc: BaseException) -> None:
        if not self._failing:
            log.warning(
                "breaker state not shared for now: Redis is unreachable",
                extra={"fields": {"error": type(exc).__name__}},
            )
        self._failing = True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
