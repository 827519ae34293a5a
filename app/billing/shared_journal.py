"""The settlement journal's copy in Redis, so that any node can write what a lost node kept.

The file journal (app/billing/journal.py) is on the node's own disk: when a node is lost for good,
so are the settlements its database refused. With ``redis.url`` set, each refused settlement is
also pushed onto one Redis list that every node's reconciler replays, under a Redis lock so that
one node at a time walks it. Replaying is idempotent (a settlement whose ledger row exists is only
dropped, app/billing/ledger.py), so the same settlement in both journals is written once.

Redis is the second copy, not the only one: the file is still written and synced first, and a
Redis that cannot be reached only costs the cross-node copy (logged), never the request.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.billing.journal import Apply, encode_line, parse_line

log = logging.getLogger(__name__)

# Longer than one replay of a long list takes; a replayer that died frees the lock by its expiry.
LOCK_TTL_S = 60.0


class SharedJournal:
    def __init__(self, redis: Redis, key: str) -> None:
        self._redis = redis
        self.key = key

    async def append(self, hold: Any, entry: dict[str, Any]) -> bool:
        """Push one settlement; False (logged) when Redis refused it."""
        try:
            await self._redis.rpush(self.key, encode_line(hold, entry))
        except RedisError as exc:
            log.warning(
                "a refused settlement could not be copied to Redis; only this node's journal has it",
                extra={"fields": {"request_id": entry.get("request_id"), "error": type(exc).__name__}},
            )
            return False
        return True

    async def replay(self, apply: Apply) -> int:
        """Write what the list holds, dropping each line once its row exists; returns how many
        were written or found written. Skipped while another node replays, or without Redis."""
        try:
            lock = self._redis.lock(self.key + ":replay", timeout=LOCK_TTL_S, blocking=False)
            if not await lock.acquire():
                return 0
        except RedisError:
            return 0
        done = 0
        try:
            for line in await self._redis.lrange(self.key, 0, -1):
                raw = line if isinstance(line, bytes) else line.encode()
                item = parse_line(raw)
                try:
                    written = item is not None and await apply(item)
                except Exception:
                    log.warning("a settlement journaled in Redis is still refused; kept for the next tick")
                    continue
                if written:
                    done += 1
                # Written now or before, or unreadable: either way it leaves the list (one copy:
                # a settlement is pushed once).
                await self._redis.lrem(self.key, 1, raw.decode())  # orjson writes UTF-8
        except RedisError as exc:
            log.warning(
                "the settlement journal in Redis could not be replayed",
                extra={"fields": {"error": type(exc).__name__}},
            )
        finally:
            try:
                await lock.release()
            except RedisError:
                pass  # it expires
            except Exception:  # redis.exceptions.LockNotOwnedError after a very long replay
                log.warning("the journal replay outlived its Redis lock")
        return done
