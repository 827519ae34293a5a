"""Which limiter serves this process: Redis when configured (shared by replicas), else in-process."""

from __future__ import annotations

from app.billing.limits import RateLimiter
from app.billing.limits_memory import InProcessRateLimiter
from app.billing.limits_redis import RedisRateLimiter


def build_limiter(
    redis_url: str | None, *, prefix: str = "gw:rl:", lease_ttl_s: float = 900, fail_open: bool = True
) -> RateLimiter:
    """Redis-backed limits when a URL is configured (shared by replicas), in-process otherwise."""
    if not redis_url:
        return InProcessRateLimiter()
    return RedisRateLimiter(redis_url, prefix=prefix, lease_ttl_s=lease_ttl_s, fail_open=fail_open)
