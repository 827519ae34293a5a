"""In-process per-key limits: exact sliding windows, all-or-nothing checks, leases and headers."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.billing.limiters import build_limiter
from app.billing.limits import KeyLimits, LimitGrant, format_duration
from app.billing.limits_memory import InProcessRateLimiter
from app.billing.limits_redis import RedisRateLimiter
from app.core.errors import GatewayError, RateLimitError


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def refused(
    limiter: InProcessRateLimiter, key: str, limits: KeyLimits, images: int = 1
) -> RateLimitError:
    with pytest.raises(RateLimitError) as info:
        await limiter.acquire(key, limits, images=images)
    return info.value


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-3, "0s"),
        (0.0001, "1ms"),
        (0.02, "20ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (55.25, "55.25s"),
        (59.9999, "1m0s"),
        (90.125, "1m30.125s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
    ],
)
def test_durations_are_formatted_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def test_rpm_grants_exactly_n_then_refuses_with_retry_after_and_headers() -> None:
    clock = FakeClock(0.0)
    limiter = InProcessRateLimiter(clock=clock)
    limits = KeyLimits(rpm=5)
    for i in range(5):
        clock.now = i * 10.0
        grant = await limiter.acquire("k", limits, images=1)
        assert grant.headers == {
            "x-ratelimit-limit-requests": "5",
            "x-ratelimit-remaining-requests": str(4 - i),
            # The time until the window frees a slot: the oldest request (t=0) leaves at t=60.
            "x-ratelimit-reset-requests": format_duration(60.0 - i * 10.0),
        }
        assert grant.lease_id is None
    clock.now = 45.0
    error = await refused(limiter, "k", limits)
    assert isinstance(error, GatewayError)
    assert (error.status_code, error.error_type, error.code) == (
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
    )
    assert error.to_body()["error"]["type"] == "rate_limit_error"
    assert "requests per min" in error.message
    # The oldest request (t=0) leaves the window at t=60; the newest (t=40) at t=100.
    assert error.headers["retry-after"] == "15"
    assert error.headers["retry-after-ms"] == "15000"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"] == "15s"
    assert "x-should-retry" not in error.headers


async def test_retry_after_rounds_up_to_whole_seconds() -> None:
    clock = FakeClock(0.0)
    limiter = InProcessRateLimiter(clock=clock)
    await limiter.acquire("k", KeyLimits(rpm=1), images=1)
    clock.now = 59.6
    error = await refused(limiter, "k", KeyLimits(rpm=1))
    assert error.headers["retry-after"] == "1"
    assert error.headers["retry-after-ms"] == "400"


async def test_window_slides_instead_of_resetting() -> None:
    clock = FakeClock(0.0)
    limiter = InProcessRateLimiter(clock=clock)
    limits = KeyLimits(rpm=2)
    await limiter.acquire("k", limits, images=1)
    clock.now = 30.0
    await limiter.acquire("k", limits, images=1)
    clock.now = 59.999
    await refused(limiter, "k", limits)
    clock.now = 60.0  # the t=0 request has left the window; the t=30 one still counts
    grant = await limiter.acquire("k", limits, images=1)
    assert grant.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now = 89.0
    error = await refused(limiter, "k", limits)
    assert error.headers["retry-after"] == "1"
    clock.now = 90.0
    await limiter.acquire("k", limits, images=1)


async def test_refused_requests_consume_nothing() -> None:
    clock = FakeClock(0.0)
    limiter = InProcessRateLimiter(clock=clock)
    limits = KeyLimits(rpm=1)
    await limiter.acquire("k", limits, images=1)
    for step in range(1, 60):
        clock.now = float(step)
        await refused(limiter, "k", limits)
    clock.now = 60.0
    await limiter.acquire("k", limits, images=1)


async def test_ipm_counts_images_and_a_partial_fit_consumes_nothing() -> None:
    clock = FakeClock(0.0)
    limiter = InProcessRateLimiter(clock=clock)
    limits = KeyLimits(rpm=10, ipm=5)
    grant = await limiter.acquire("k", limits, images=3)
    assert grant.headers["x-ratelimit-remaining-images"] == "2"
    assert grant.headers["x-ratelimit-limit-images"] == "5"
    clock.now = 10.0
    error = await refused(limiter, "k", limits, images=3)
    assert "images per min" in error.message
    assert error.headers["x-ratelimit-remaining-images"] == "2"
    assert error.headers["x-ratelimit-remaining-requests"] == "9"
    assert error.headers["retry-after"] == "50"
    grant = await limiter.acquire("k", limits, images=2)
    assert grant.headers["x-ratelimit-remaining-images"] == "0"
    assert grant.headers["x-ratelimit-remaining-requests"] == "8"
    # A request that asks for no images is not held back by the image limit.
    await limiter.acquire("k", limits, images=0)


async def test_ipm_retry_after_waits_for_enough_images_to_leave() -> None:
    clock = FakeClock(0.0)
    limiter = InProcessRateLimiter(clock=clock)
    limits = KeyLimits(ipm=4)
    for t in (0.0, 10.0, 20.0, 30.0):
        clock.now = t
        await limiter.acquire("k", limits, images=1)
    clock.now = 40.0
    # Three images must leave; the third oldest (t=20) leaves at t=80.
    error = await refused(limiter, "k", limits, images=3)
    assert error.headers["retry-after"] == "40"


async def test_a_request_larger_than_ipm_is_refused_without_retry() -> None:
    limiter = InProcessRateLimiter(clock=FakeClock())
    error = await refused(limiter, "k", KeyLimits(ipm=2), images=3)
    assert error.headers["x-should-retry"] == "false"
    assert "Request too large" in error.message
    assert error.headers["x-ratelimit-remaining-images"] == "2"


async def test_concurrency_leases_and_idempotent_release() -> None:
    limiter = InProcessRateLimiter(clock=FakeClock())
    limits = KeyLimits(concurrency=2)
    first = await limiter.acquire("k", limits, images=1)
    second = await limiter.acquire("k", limits, images=1)
    assert first.lease_id is not None and second.lease_id is not None
    assert first.lease_id != second.lease_id
    error = await refused(limiter, "k", limits)
    assert "concurrent" in error.message
    assert error.headers["retry-after"] == "1"
    await limiter.release(first)
    await limiter.release(first)
    third = await limiter.acquire("k", limits, images=1)
    # Releasing `first` twice freed one slot, not two.
    await refused(limiter, "k", limits)
    await limiter.release(second)
    await limiter.release(third)
    await limiter.acquire("k", limits, images=1)
    await limiter.acquire("k", limits, images=1)


async def test_a_full_concurrency_gauge_refuses_without_consuming_rate() -> None:
    limiter = InProcessRateLimiter(clock=FakeClock())
    limits = KeyLimits(rpm=3, ipm=10, concurrency=1)
    held = await limiter.acquire("k", limits, images=2)
    error = await refused(limiter, "k", limits, images=2)
    assert error.headers["x-ratelimit-remaining-requests"] == "2"
    assert error.headers["x-ratelimit-remaining-images"] == "8"
    await limiter.release(held)
    grant = await limiter.acquire("k", limits, images=2)
    assert grant.headers["x-ratelimit-remaining-requests"] == "1"


async def test_keys_are_limited_independently_and_unlimited_keys_get_no_headers() -> None:
    limiter = InProcessRateLimiter(clock=FakeClock())
    await limiter.acquire("a", KeyLimits(rpm=1), images=1)
    await refused(limiter, "a", KeyLimits(rpm=1))
    await limiter.acquire("b", KeyLimits(rpm=1), images=1)
    grant = await limiter.acquire("a", KeyLimits(), images=5)
    assert grant == LimitGrant(key_id="a", lease_id=None, headers={})
    await limiter.release(grant)
    await limiter.aclose()


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rpm"):
        KeyLimits(rpm=0)
    with pytest.raises(ValueError, match="concurrency"):
        KeyLimits(concurrency=-1)
    assert KeyLimits().unlimited
    assert not KeyLimits(ipm=1).unlimited


async def test_negative_image_counts_are_a_programming_error() -> None:
    limiter = InProcessRateLimiter()
    with pytest.raises(ValueError, match="images"):
        await limiter.acquire("k", KeyLimits(ipm=3), images=-1)


async def test_build_limiter_picks_the_backend_from_the_url() -> None:
    local = build_limiter(None)
    assert isinstance(local, InProcessRateLimiter)
    shared = build_limiter("redis://127.0.0.1:6379/0")  # connects lazily: no I/O here
    assert isinstance(shared, RedisRateLimiter)
    await local.aclose()
    await shared.aclose()


def reference(times: list[int], images: list[int], rpm: int, ipm: int) -> list[tuple[bool, float]]:
    """Brute force over times in ms: granted iff every limit, counting it, holds over (t - 60 s, t].

    A refusal's wait is the least delay after which the same request would be granted.
    """
    granted: list[tuple[int, int]] = []
    answers: list[tuple[bool, float]] = []

    def fits(at: int, n: int) -> bool:
        live = [(s, k) for s, k in granted if s > at - 60_000]
        return len(live) < rpm and sum(k for _, k in live) + n <= ipm

    for t, n in zip(times, images, strict=True):
        if n > ipm:
            answers.append((False, 60.0))
        elif fits(t, n):
            granted.append((t, n))
            answers.append((True, 0.0))
        else:
            wait = min(s + 60_000 - t for s, _ in granted if s + 60_000 > t and fits(s + 60_000, n))
            answers.append((False, wait / 1000))
    return answers


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 4)), min_size=1, max_size=60),
    st.integers(1, 6),
    st.integers(1, 8),
)
def test_decisions_match_a_brute_force_sliding_window(
    steps: list[tuple[int, int]], rpm: int, ipm: int
) -> None:
    times, images = [], []
    elapsed = 0
    for gap, n in steps:
        elapsed += gap * 10  # up to 50 s between requests, in whole milliseconds
        times.append(elapsed)
        images.append(n)

    async def run() -> list[tuple[bool, float]]:
        clock = FakeClock()
        limiter = InProcessRateLimiter(clock=clock)
        answers: list[tuple[bool, float]] = []
        for ms, n in zip(times, images, strict=True):
            clock.now = ms / 1000
            try:
                await limiter.acquire("k", KeyLimits(rpm=rpm, ipm=ipm), images=n)
            except RateLimitError as exc:
                answers.append((False, exc.retry_after_s))
            else:
                answers.append((True, 0.0))
        return answers

    got = asyncio.run(run())
    expected = reference(times, images, rpm, ipm)
    assert [ok for ok, _ in got] == [ok for ok, _ in expected]
    for (_, wait), (_, want) in zip(got, expected, strict=True):
        assert wait == pytest.approx(want, abs=1e-6)
