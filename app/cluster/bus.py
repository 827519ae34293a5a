"""One Redis client and one pub/sub listener per process, shared by everything cluster-wide.

Commands (slot scripts, breaker writes, ``PUBLISH``) go through one connection pool with short
timeouts and no client-side retries: a caller on the request path falls back to its local state
at once rather than waiting out retries (each caller says how it fails safe).

Invalidations arrive on one pub/sub connection. A message is ``<node id> <payload>`` on
``<prefix>bus:<channel>``; handlers run on the event loop, must not block, and get ``None`` when
messages may have been missed (the listener lost its connection and came back), so that a cache
drops everything rather than keep what a lost message would have invalidated. A dead connection
is noticed by a ping every ``ping_s`` that must be answered within ``2 × ping_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# A payload, or None: "messages may have been missed, forget what you cached".
Handler = Callable[[str | None], None]
_PING = "gw-bus-ping"


def no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


class ClusterBus:
    """The process's link to the shared Redis: ``redis`` for commands, ``publish`` and
    ``subscribe`` for invalidations. ``start`` before serving, ``aclose`` at shutdown."""

    def __init__(self, url: str, *, prefix: str = "gw:", timeout_s: float = 2.0, ping_s: float = 5.0) -> None:
        self.prefix = prefix
        self.node_id = secrets.token_hex(6)
        self.redis: Redis = Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=no_retry()
        )
        self._url, self._timeout_s, self._ping_s = url, timeout_s, ping_s
        self._handlers: dict[str, list[Handler]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def key(self, name: str) -> str:
        """A Redis key under this cluster's prefix."""
        return self.prefix + name

    def channel(self, name: str) -> str:
        return f"{self.prefix}bus:{name}"

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Call ``handler`` with each payload other nodes publish on ``channel`` (before ``start``)."""
        if self._listener is not None:
            raise RuntimeError("subscribe before the bus starts")
        self._handlers.setdefault(self.channel(channel), []).append(handler)

    async def publish(self, channel: str, payload: str) -> bool:
        """Tell the other nodes; False (logged) when Redis cannot be reached: their caches then
        fall back on their TTLs."""
        try:
            await self.redis.publish(self.channel(channel), f"{self.node_id} {payload}")
        except (RedisError, OSError) as exc:
            log.warning("cluster message not sent: Redis is unreachable (%s)", type(exc).__name__)
            return False
        return True

    async def start(self) -> None:
        """Start listening; waits (up to the timeout) for the first subscription, so that a node
        that says it is ready does not miss what is published right after."""
        if not self._handlers or self._listener is not None:
            return
        self._listener = asyncio.create_task(self._listen_forever(), name="cluster-bus")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout_s):
                await self._subscribed.wait()
        if not self._subscribed.is_set():
            log.warning("cluster bus not subscribed yet: Redis is unreachable; caches rely on their TTLs")

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.redis.aclose()

    async def _listen_forever(self) -> None:
        delay = 0.1
        first = True
        while True:
            client = Redis.from_url(
                self._url, socket_connect_timeout=self._timeout_s, socket_timeout=None, retry=no_retry()
            )
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(*self._handlers)
                if not first:
                    log.info("cluster bus subscribed again")
                # Whatever was published while we were away is lost: every cache starts afresh.
                self._dispatch_all(None)
                first = False
                self._subscribed.set()
                delay = 0.1
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("cluster bus lost Redis (%s); retrying", type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            self._dispatch_all(None)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _read(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        while True:
            message: dict[str, Any] | None = await pubsub.get_message(timeout=self._ping_s / 2)
            now = loop.time()
            if message is not None:
                heard, pinged = now, False
                if message.get("type") == "message":
                    self._dispatch(message)
                continue
            if now - heard > 2 * self._ping_s:
                raise TimeoutError("no answer to the cluster bus ping")
            if not pinged and now - heard > self._ping_s:
                await pubsub.ping(_PING)
                pinged = True

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = _text(message.get("channel"))
        node, _, payload = _text(message.get("data")).partition(" ")
        if node == self.node_id:
            return  # this node applied its own change already
        for handler in self._handlers.get(channel, ()):
            try:
                handler(payload)
            except Exception:
                log.exception("cluster message handler failed", extra={"fields": {"channel": channel}})

    def _dispatch_all(self, payload: str | None) -> None:
        for channel, handlers in self._handlers.items():
            for handler in handlers:
                try:
                    handler(payload)
                except Exception:
                    log.exception("cluster message handler failed", extra={"fields": {"channel": channel}})


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value or "")
