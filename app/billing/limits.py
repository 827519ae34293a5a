"""Per-key rate and concurrency limits (SPEC §7, §8): requests per minute, images per minute, in flight.

Algorithm: an exact *sliding log* over a trailing 60 s window. Every granted request is logged with
its time (and, for images, its image count); a request is granted only if, counting it, the entries
younger than 60 s stay within the limit. So "N per minute" means at most N in *any* 60 s window,
with no boundary burst (a fixed window allows 2N across a boundary) and no burst allowance (GCRA
with burst N admits up to ~2N-1 in a 60 s span). The cost is memory: at most N entries per key and
limit, which is small for per-minute limits on image requests.

Every check is all-or-nothing: a request refused by any limit consumes nothing from the others.

Headers follow OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,images}``; ``reset`` is the
time until the window frees a slot (its oldest entry leaves it, and ``remaining`` goes up), on a
success as on a 429, formatted as a Go-style duration ("20ms", "1s", "6m0s") as OpenAI does. A
refusal adds ``retry-after`` (whole seconds, rounded up, at least 1) and ``retry-after-ms``, which
the official SDKs honour.

This module holds what both back ends share (the types, the decision's conclusion, the headers);
``InProcessRateLimiter`` (``limits_memory.py``) serves one process, ``RedisRateLimiter``
(``limits_redis.py``) shares the counters between gateway replicas, and ``limiters.py`` picks one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal, Protocol

from app.core.errors import RateLimitError

# Times are integer microseconds inside the limiters, so that both backends do the same exact
# arithmetic (a float window edge can be off by one ulp) and Redis scores stay integral.
US = 1_000_000
WINDOW_US = 60 * US
# A refusal for concurrency cannot know when a slot frees up; this is the retry hint it gives.
CONCURRENCY_RETRY_US = 1 * US

Reason = Literal["requests", "images", "concurrency", "too_large"]


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; None means unlimited."""

    rpm: int | None = None
    ipm: int | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "ipm", "concurrency"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.ipm is None and self.concurrency is None


@dataclass(frozen=True, slots=True)
class LimitGrant:
    """A granted request: the headers to send, and the concurrency lease to give back."""

    key_id: str
    lease_id: str | None
    headers: dict[str, str]


class RateLimiter(Protocol):
    async def acquire(self, key_id: str, limits: KeyLimits, *, images: int) -> LimitGrant:
        """Count one request for ``images`` images, or raise RateLimitError having counted nothing."""
        ...

    async def release(self, grant: LimitGrant) -> None:
        """End the grant's concurrency lease; calling it again does nothing."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a limiter backend decided, before it becomes a grant or an error (times in seconds)."""

    reason: Reason | None
    retry_after_s: float
    requests_used: int
    requests_reset_s: float
    images_used: int
    images_reset_s: float
    concurrent: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format, Go-style: "0s", "20ms", "1.5s", "6m0s", "1h0m0s"; rounded up to 1 ms."""
    ms = max(0, _ceil_div(round(seconds * US), 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(limits: KeyLimits, outcome: Outcome) -> dict[str, str]:
    """The x-ratelimit-* headers for the limits that are set."""
    headers: dict[str, str] = {}
    for kind, limit, used, reset in (
        ("requests", limits.rpm, outcome.requests_used, outcome.requests_reset_s),
        ("images", limits.ipm, outcome.images_used, outcome.images_reset_s),
    ):
        if limit is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(reset)
    return headers


def _refusal_message(limits: KeyLimits, outcome: Outcome, images: int) -> str:
    wait = format_duration(outcome.retry_after_s)
    if outcome.reason == "too_large":
        return (
            f"Request too large for this API key on images per min (IPM): Limit {limits.ipm}, "
            f"Requested {images}. Ask for fewer images per request."
        )
    if outcome.reason == "concurrency":
        return (
            f"Too many concurrent requests for this API key: Limit {limits.concurrency}, "
            f"In progress {outcome.concurrent}. Please try again when one finishes."
        )
    if outcome.reason == "images":
        return (
            f"Rate limit reached for this API key on images per min (IPM): Limit {limits.ipm}, "
            f"Used {outcome.images_used}, Requested {images}. Please try again in {wait}."
        )
    return (
        f"Rate limit reached for this API key on requests per min (RPM): Limit {limits.rpm}, "
        f"Used {outcome.requests_used}, Requested 1. Please try again in {wait}."
    )


def conclude(
    key_id: str, limits: KeyLimits, outcome: Outcome, *, images: int, lease_id: str | None
) -> LimitGrant:
    """Turn a backend's decision into a grant, or raise the 429 that explains it."""
    headers = ratelimit_headers(limits, outcome)
    if outcome.reason is not None:
        raise RateLimitError(
            _refusal_message(limits, outcome, images),
            retry_after_s=outcome.retry_after_s,
            headers=headers,
            retryable=outcome.reason != "too_large",
        )
    return LimitGrant(
        key_id=key_id, lease_id=lease_id if limits.concurrency is not None else None, headers=headers
    )


def check_images(images: int) -> None:
    if isinstance(images, bool) or images < 0:
        raise ValueError(f"images must be a non-negative integer, not {images!r}")


def new_lease_id() -> str:
    return uuid.uuid4().hex
