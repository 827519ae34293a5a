"""Per-key limits kept in Redis, so every gateway replica enforces the same ones (SPEC §8).

Same sliding-log semantics as the in-process limiter (see ``limits.py``), decided by one Lua script
so the check of every limit and the commit happen atomically: under any number of processes a key
gets at most N requests in any 60 s window.

Why a hand-written script rather than the ``limits`` package: ``limits`` checks one limit per call,
so rpm and ipm would be two round trips with no rollback when the second refuses (a refused request
must consume nothing), it has no weighted "n images but only if all n fit" check that also reports
when they will fit, and no concurrency gauge with expiring leases. One ~60-line script does all three.

Per key, with a hash tag so that the three keys share a cluster slot:
  ``<prefix>{<key_id>}:req``  sorted set, member = grant id, score = grant time (µs)
  ``<prefix>{<key_id>}:img``  sorted set, member = "<grant id>:<images>", score = grant time (µs)
  ``<prefix>{<key_id>}:conc`` sorted set, member = lease id, score = lease expiry (µs)
A lease that is never released (its holder crashed) is purged once it expires, so it cannot hold a
slot forever; ``lease_ttl_s`` must therefore exceed the longest request (upstream timeouts included).

Clock: the script reads the Redis server's ``TIME``, the one clock every replica shares; client
clocks may disagree by more than a window's resolution. Tests may pass ``clock`` to drive time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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

log = logging.getLogger(__name__)

_REASONS: Final[dict[int, Reason]] = {1: "requests", 2: "images", 3: "concurrency", 4: "too_large"}

# KEYS: request log, image log, leases.
# ARGV: now in µs ("" = server TIME), window µs, rpm, ipm, concurrency (-1 = unlimited), images,
#       grant id, lease ttl µs, concurrency retry hint µs.
# Returns: reason (0 = granted), wait µs, requests used, requests reset µs, images used,
#          images reset µs, leases held.
_ACQUIRE: Final = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local window, rpm, ipm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n, id, ttl, conc_wait = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local horizon = now - window
local reason, wait = 0, 0
local function refuse(code, w)
  if reason == 0 or w > wait then reason, wait = code, w end
end
local function weight(member) return tonumber(string.match(member, ':(%d+)$')) end

local req_used = 0
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
  req_used = redis.call('ZCARD', KEYS[1])
  if req_used >= rpm then
    local e = redis.call('ZRANGE', KEYS[1], req_used - rpm, req_used - rpm, 'WITHSCORES')
    refuse(1, tonumber(e[2]) + window - now)
  end
end

local img_used, too_large = 0, false
if ipm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do img_used = img_used + weight(entries[i]) end
  local excess = img_used + n - ipm
  if n > ipm then
    too_large = true
  elseif n > 0 and excess > 0 then
    local freed = 0
    for i = 1, #entries, 2 do
      freed = freed + weight(entries[i])
      if freed >= excess then
        refuse(2, tonumber(entries[i + 1]) + window - now)
        break
      end
    end
  end
end

local held = 0
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  held = redis.call('ZCARD', KEYS[3])
  if held >= conc then refuse(3, conc_wait) end
end
if too_large then reason, wait = 4, window end

if reason == 0 then
  if rpm >= 0 then
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
    req_used = req_used + 1
  end
  if ipm >= 0 and n > 0 then
    redis.call('ZADD', KEYS[2], now, id .. ':' .. n)
    redis.call('PEXPIRE', KEYS[2], math.ceil(window / 1000) + 1000)
    img_used = img_used + n
  end
  if conc >= 0 then
    redis.call('ZADD', KEYS[3], now + ttl, id)
    redis.call('PEXPIRE', KEYS[3], math.ceil(ttl / 1000) + 1000)
    held = held + 1
  end
end

local function reset(key, limit)
  if limit < 0 then return 0 end
  local e = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #e == 0 then return 0 end
  return tonumber(e[2]) + window - now
end
return {reason, wait, req_used, reset(KEYS[1], rpm), img_used, reset(KEYS[2], ipm), held}
"""


class RedisRateLimiter:
    """Limits shared by every process that points at the same Redis and prefix.

    With ``fail_open`` (the default) a Redis outage lets requests through, logged, rather than
    failing all traffic: these limits are about fairness, and spend is guarded by the ledger.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gw:rl:",
        lease_ttl_s: float = 900,
        clock: Callable[[], float] | None = None,
        fail_open: bool = True,
        timeout_s: float = 2.0,
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be positive")
        self._redis: Redis = Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        self._script = self._redis.register_script(_ACQUIRE)
        self._prefix = prefix
        self._lease_ttl_us = round(lease_ttl_s * US)
        # None in production: the script then uses the server's TIME (see the module docstring).
        self._clock = clock
        self._fail_open = fail_open

    def _keys(self, key_id: str) -> list[str]:
        base = f"{self._prefix}{{{key_id}}}"
        return [f"{base}:req", f"{base}:img", f"{base}:conc"]

    async def acquire(self, key_id: str, limits: KeyLimits, *, images: int) -> LimitGrant:
        check_images(images)
        if limits.unlimited:
            return LimitGrant(key_id=key_id, lease_id=None, headers={})
        grant_id = new_lease_id()
        now = "" if self._clock is None else str(round(self._clock() * US))
        args: list[str | int] = [
            now,
            WINDOW_US,
            -1 if limits.rpm is None else limits.rpm,
            -1 if limits.ipm is None else limits.ipm,
            -1 if limits.concurrency is None else limits.concurrency,
            images,
            grant_id,
            self._lease_ttl_us,
            CONCURRENCY_RETRY_US,
        ]
        try:
            raw = await self._script(keys=self._keys(key_id), args=args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if not self._fail_open:
                raise
            log.warning("rate limits not enforced: Redis is unreachable (%s)", exc)
            return LimitGrant(key_id=key_id, lease_id=None, headers={})
        reason, wait, req_used, req_reset, img_used, img_reset, held = (int(v) for v in raw)
        outcome = Outcome(
            reason=_REASONS.get(reason),
            retry_after_s=wait / US,
            requests_used=req_used,
            requests_reset_s=req_reset / US,
            images_used=img_used,
            images_reset_s=img_reset / US,
            concurrent=held,
        )
        return conclude(key_id, limits, outcome, images=images, lease_id=grant_id)

    async def release(self, grant: LimitGrant) -> None:
        if grant.lease_id is None:
            return
        try:
            await self._redis.zrem(self._keys(grant.key_id)[2], grant.lease_id)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # The lease still expires on its own after lease_ttl_s.
            log.warning("could not release a concurrency lease: Redis is unreachable (%s)", exc)

    async def aclose(self) -> None:
        await self._redis.aclose()
