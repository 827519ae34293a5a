"""Whether this node can serve: the shared engines it needs answer, and it is not draining.

``/readyz`` is what a load balancer or Kubernetes reads to send a node traffic, so it says only
what is true of *this node*. Upstreams are left out on purpose: an upstream outage is the same
for every node, and taking them all out of rotation would refuse even the requests the healthy
upstreams could serve (their state is on ``/admin/upstreams`` and in metrics).

Each check is bounded (``timeout_s``), so the probe answers in time whatever the database or
Redis does. A pool with every connection checked out is a database that answers (those
connections are in use), so a busy node stays ready rather than all nodes leaving at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

OK, BUSY, UNAVAILABLE, NOT_CONFIGURED = "ok", "busy", "unavailable", "not_configured"


@dataclass(slots=True)
class Readiness:
    engine: AsyncEngine
    redis_url: str | None = None
    # Per check; both checks run together, so the probe answers within about this.
    timeout_s: float = 0.8
    # Set on SIGTERM (app/runtime/drain.py): the node still serves, but asks to be taken out of rotation.
    draining: bool = False
    _redis: Any = field(default=None, init=False)

    async def check(self) -> tuple[bool, dict[str, str]]:
        database, redis = await asyncio.gather(self._database(), self._redis_state())
        ready = not self.draining and database in (OK, BUSY) and redis in (OK, NOT_CONFIGURED)
        return ready, {"database": database, "redis": redis, "draining": str(self.draining).lower()}

    async def _database(self) -> str:
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
            return OK
        except TimeoutError:
            return BUSY if _pool_saturated(self.engine) else UNAVAILABLE
        except Exception as exc:  # any failure means "not ready"; the reason goes to the log
            log.warning("readiness: database check failed (%s)", type(exc).__name__)
            return UNAVAILABLE

    async def _redis_state(self) -> str:
        if not self.redis_url:
            return NOT_CONFIGURED
        try:
            if self._redis is None:
                from redis.asyncio import Redis

                self._redis = Redis.from_url(
                    self.redis_url, socket_connect_timeout=self.timeout_s, socket_timeout=self.timeout_s
                )
            async with asyncio.timeout(self.timeout_s):
                await self._redis.ping()
            return OK
        except Exception as exc:
            log.warning("readiness: Redis check failed (%s)", type(exc).__name__)
            return UNAVAILABLE

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def _pool_saturated(engine: AsyncEngine) -> bool:
    """Every connection the pool may open is checked out (by live work), so waiting timed out."""
    pool = engine.sync_engine.pool
    checkedout = getattr(pool, "checkedout", None)
    size = getattr(pool, "size", None)
    if checkedout is None or size is None:
        return False
    limit = int(size()) + max(0, int(getattr(pool, "_max_overflow", 0)))
    return int(checkedout()) >= limit
