"""Redis-backed limits: the in-process semantics, shared atomically between limiters and processes.

Needs the Redis service on 127.0.0.1:6379 (or GATEWAY_TEST_REDIS_URL). When it is down these tests
skip locally but fail when CI is set, so a broken CI service cannot pass silently.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.billing.limits import KeyLimits, LimitGrant
from app.billing.limits_memory import InProcessRateLimiter
from app.billing.limits_redis import RedisRateLimiter
from app.core.errors import RateLimitError

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# A second process sharing the limit: waits for "go" on stdin, then fires its share of acquires.
CHILD_BURST = """
import asyncio, sys
from app.billing.limits import KeyLimits
from app.core.errors import RateLimitError
from app.billing.limits_redis import RedisRateLimiter

async def main() -> None:
    url, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    limiter = RedisRateLimiter(url, prefix=prefix, fail_open=False)

    async def one() -> int:
        try:
            await limiter.acquire("shared", KeyLimits(rpm=20), images=1)
        except RateLimitError:
            return 0
        return 1

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    granted = sum(await asyncio.gather(*(one() for _ in range(count))))
    await limiter.aclose()
    print(granted, flush=True)

asyncio.run(main())
"""

# A holder that takes a concurrency slot and dies without releasing it.
CHILD_CRASH = """
import asyncio, os, sys
from app.billing.limits import KeyLimits
from app.billing.limits_redis import RedisRateLimiter

async def main() -> None:
    limiter = RedisRateLimiter(sys.argv[1], prefix=sys.argv[2], lease_ttl_s=30, fail_open=False)
    await limiter.acquire("crash", KeyLimits(concurrency=1), images=1)
    os._exit(0)

asyncio.run(main())
"""


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_url() -> str:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=10)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is required when CI is set: {exc}")
        pytest.skip(f"Redis at {REDIS_URL} is not reachable: {exc}")
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    value = f"gw:test:{uuid.uuid4().hex}:"
    yield value
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{value}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def redis_time(redis_url: str) -> float:
    client = Redis.from_url(redis_url)
    try:
        seconds, micros = await client.time()
    finally:
        await client.aclose()
    return seconds + micros / 1_000_000


@pytest.fixture
async def server_now(redis_url: str) -> float:
    return await redis_time(redis_url)


async def refused(limiter: RedisRateLimiter, key: str, limits: KeyLimits, images: int = 1) -> RateLimitError:
    with pytest.raises(RateLimitError) as info:
        await limiter.acquire(key, limits, images=images)
    return info.value


@pytest.mark.redis
async def test_rpm_grants_exactly_n_on_the_server_clock(redis_url: str, prefix: str) -> None:
    limiter = RedisRateLimiter(redis_url, prefix=prefix, fail_open=False)
    try:
        limits = KeyLimits(rpm=5)
        remaining = [
            (await limiter.acquire("k", limits, images=1)).headers["x-ratelimit-remaining-requests"]
            for _ in range(5)
        ]
        assert remaining == ["4", "3", "2", "1", "0"]
        error = await refused(limiter, "k", limits)
        assert (error.status_code, error.error_type, error.code) == (
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
        )
        assert error.headers["x-ratelimit-limit-requests"] == "5"
        assert error.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(error.headers["retry-after"]) <= 60
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_window_slides_and_refusals_consume_nothing(redis_url: str, prefix: str) -> None:
    clock = FakeClock(1_700_000_000.0)
    limiter = RedisRateLimiter(redis_url, prefix=prefix, clock=clock, fail_open=False)
    try:
        limits = KeyLimits(rpm=2)
        await limiter.acquire("k", limits, images=1)
        clock.now += 30
        await limiter.acquire("k", limits, images=1)
        for _ in range(29):
            clock.now += 1
            error = await refused(limiter, "k", limits)
        assert error.headers["retry-after"] == "1"
        assert error.headers["x-ratelimit-reset-requests"] == "1s"
        clock.now += 1  # t=60: the first request has left the window
        grant = await limiter.acquire("k", limits, images=1)
        assert grant.headers == {
            "x-ratelimit-limit-requests": "2",
            "x-ratelimit-remaining-requests": "0",
            # The oldest request left in the window (t=30) frees its slot at t=90.
            "x-ratelimit-reset-requests": "30s",
        }
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_ipm_partial_fit_consumes_nothing(redis_url: str, prefix: str) -> None:
    clock = FakeClock(1_700_000_000.0)
    limiter = RedisRateLimiter(redis_url, prefix=prefix, clock=clock, fail_open=False)
    try:
        limits = KeyLimits(rpm=10, ipm=5)
        await limiter.acquire("k", limits, images=3)
        clock.now += 10
        error = await refused(limiter, "k", limits, images=3)
        assert error.headers["x-ratelimit-remaining-images"] == "2"
        assert error.headers["x-ratelimit-remaining-requests"] == "9"
        assert error.headers["retry-after"] == "50"
        grant = await limiter.acquire("k", limits, images=2)
        assert grant.headers["x-ratelimit-remaining-images"] == "0"
        too_large = await refused(limiter, "k", KeyLimits(ipm=2), images=3)
        assert too_large.headers["x-should-retry"] == "false"
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_concurrency_release_is_idempotent(redis_url: str, prefix: str) -> None:
    limiter = RedisRateLimiter(redis_url, prefix=prefix, fail_open=False)
    try:
        limits = KeyLimits(rpm=100, concurrency=2)
        first = await limiter.acquire("k", limits, images=1)
        second = await limiter.acquire("k", limits, images=1)
        error = await refused(limiter, "k", limits)
        assert error.headers["x-ratelimit-remaining-requests"] == "98"
        await limiter.release(first)
        await limiter.release(first)
        third = await limiter.acquire("k", limits, images=1)
        await refused(limiter, "k", limits)
        for grant in (second, third):
            await limiter.release(grant)
        await limiter.acquire("k", limits, images=1)
        await limiter.release(LimitGrant(key_id="k", lease_id=None, headers={}))
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_an_unreleased_lease_expires(redis_url: str, prefix: str) -> None:
    clock = FakeClock(1_700_000_000.0)
    limiter = RedisRateLimiter(redis_url, prefix=prefix, lease_ttl_s=10, clock=clock, fail_open=False)
    try:
        limits = KeyLimits(concurrency=1)
        await limiter.acquire("k", limits, images=1)  # never released: its holder "crashed"
        clock.now += 9.9
        await refused(limiter, "k", limits)
        clock.now += 0.1
        await limiter.acquire("k", limits, images=1)
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_a_crashed_process_lease_expires_on_the_server_clock(redis_url: str, prefix: str) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_CRASH, redis_url, prefix, cwd=ROOT
    )
    assert await child.wait() == 0
    # Read the server's clock only once the child has taken its lease: however slowly the child
    # started, its lease expires by then + 30 s, so the "later" limiter's clock is past it.
    after = await redis_time(redis_url)
    limits = KeyLimits(concurrency=1)
    now = RedisRateLimiter(redis_url, prefix=prefix, fail_open=False)
    later = RedisRateLimiter(redis_url, prefix=prefix, clock=lambda: after + 31, fail_open=False)
    try:
        await refused(now, "crash", limits)
        await later.acquire("crash", limits, images=1)
    finally:
        await now.aclose()
        await later.aclose()


@pytest.mark.redis
async def test_two_limiters_share_one_rpm_limit_exactly(redis_url: str, prefix: str) -> None:
    limiters = [RedisRateLimiter(redis_url, prefix=prefix, fail_open=False) for _ in range(2)]

    async def one(limiter: RedisRateLimiter) -> bool:
        try:
            await limiter.acquire("shared", KeyLimits(rpm=20), images=1)
        except RateLimitError:
            return False
        return True

    try:
        results = await asyncio.gather(*(one(limiters[i % 2]) for i in range(50)))
        assert sum(results) == 20
        assert sum(results[0::2]) > 0 and sum(results[1::2]) > 0
    finally:
        for limiter in limiters:
            await limiter.aclose()


@pytest.mark.redis
async def test_two_processes_share_one_rpm_limit_exactly(redis_url: str, prefix: str) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD_BURST,
        redis_url,
        prefix,
        "25",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    limiter = RedisRateLimiter(redis_url, prefix=prefix, fail_open=False)

    async def one() -> int:
        try:
            await limiter.acquire("shared", KeyLimits(rpm=20), images=1)
        except RateLimitError:
            return 0
        return 1

    try:
        assert (await child.stdout.readline()).strip() == b"ready"
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        mine = sum(await asyncio.gather(*(one() for _ in range(25))))
        theirs = int((await child.stdout.readline()).strip())
        assert await child.wait() == 0
        assert mine + theirs == 20
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await limiter.aclose()


@pytest.mark.redis
async def test_redis_and_in_process_limiters_decide_alike(redis_url: str, prefix: str) -> None:
    start = 1_700_000_000.0
    clock = FakeClock(start)
    shared = RedisRateLimiter(redis_url, prefix=prefix, clock=clock, fail_open=False)
    local = InProcessRateLimiter(clock=clock)
    rng = random.Random(5)
    limits = KeyLimits(rpm=4, ipm=7, concurrency=2)
    held: list[tuple[LimitGrant, LimitGrant]] = []
    try:
        for _ in range(300):
            clock.now += rng.randrange(0, 15_000) / 1000
            if held and rng.random() < 0.4:
                pair = held.pop(rng.randrange(len(held)))
                await shared.release(pair[0])
                await local.release(pair[1])
                continue
            images = rng.randrange(0, 5)
            answers: list[LimitGrant | RateLimitError] = []
            for limiter in (shared, local):
                try:
                    answers.append(await limiter.acquire("k", limits, images=images))
                except RateLimitError as exc:
                    answers.append(exc)
            a, b = answers
            if isinstance(a, LimitGrant) and isinstance(b, LimitGrant):
                assert a.headers == b.headers
                held.append((a, b))
            else:
                assert isinstance(a, RateLimitError) and isinstance(b, RateLimitError)
                assert (a.message, a.headers) == (b.message, b.headers)
    finally:
        await shared.aclose()
        await local.aclose()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_redis_fails_open_or_raises_as_configured() -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    lenient = RedisRateLimiter(url, timeout_s=0.5)
    strict = RedisRateLimiter(url, timeout_s=0.5, fail_open=False)
    try:
        grant = await lenient.acquire("k", KeyLimits(rpm=1, concurrency=1), images=1)
        assert grant == LimitGrant(key_id="k", lease_id=None, headers={})
        with pytest.raises(RedisConnectionError):
            await strict.acquire("k", KeyLimits(rpm=1), images=1)
        await lenient.release(LimitGrant(key_id="k", lease_id="gone", headers={}))
    finally:
        await lenient.aclose()
        await strict.aclose()
