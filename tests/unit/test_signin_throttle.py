"""Issue 23 item 10: the console's sign-in throttle, on an injected clock, in memory and on Redis.

On 9a64885 there was no throttle (100 wrong sign-ins took 2.5 s) and a 16-character admin key was
accepted; ``app.console.throttle`` did not exist.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from app.console.throttle import MemoryFailures, RedisFailures, SignInThrottle, ThrottlePolicy
from app.runtime.settings import build_settings
from tests.services import require_redis

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[[], SignInThrottle]


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest) -> tuple[Factory, Clock]:
    """A factory (a Redis client belongs to the loop it is made in: each scenario makes its own)."""
    clock = Clock()
    policy = ThrottlePolicy(free=3, base_s=2.0, max_lock_s=60.0, window_s=600.0)
    if request.param == "memory":
        memory = MemoryFailures()
        return (lambda: SignInThrottle(memory, policy=policy, clock=clock)), clock
    url = require_redis()
    prefix = f"test:signin:{secrets.token_hex(4)}:"
    return (lambda: SignInThrottle(RedisFailures(url, prefix=prefix), policy=policy, clock=clock)), clock


def run(scenario: Callable[[SignInThrottle], Awaitable[T]], factory: Factory) -> T:
    async def go() -> T:
        throttle = factory()
        try:
            return await scenario(throttle)
        finally:
            await throttle.aclose()

    return asyncio.run(go())


def test_failures_are_free_then_slowed_then_refused_with_a_growing_wait(
    make: tuple[Factory, Clock],
) -> None:
    factory, clock = make

    async def scenario(throttle: SignInThrottle) -> list[int]:
        subjects = throttle.subjects("198.51.100.7", "sk-guess-000000000000")
        waits = []
        for _ in range(6):
            waits.append(await throttle.wait_s(subjects))
            await throttle.failed(subjects)
        waits.append(await throttle.wait_s(subjects))
        return waits

    # Three free failures, then locks of 2, 4, 8 s (each measured right after the failure).
    assert run(scenario, factory) == [0, 0, 0, 0, 2, 4, 8]


def test_a_lock_ends_and_is_capped_so_the_owner_is_never_locked_out_for_good(
    make: tuple[Factory, Clock],
) -> None:
    factory, clock = make

    async def scenario(throttle: SignInThrottle) -> tuple[int, int, int]:
        subjects = throttle.subjects("198.51.100.8", "")
        for _ in range(40):
            await throttle.failed(subjects)
        capped = await throttle.wait_s(subjects)
        clock.now += 61
        after = await throttle.wait_s(subjects)
        # A success clears the address: the next failure is free again.
        await throttle.succeeded(subjects)
        await throttle.failed(subjects)
        return capped, after, await throttle.wait_s(subjects)

    assert run(scenario, factory) == (60, 0, 0)


def test_the_address_and_the_key_prefix_are_counted_apart(make: tuple[Factory, Clock]) -> None:
    factory, clock = make

    async def scenario(throttle: SignInThrottle) -> tuple[int, int, int]:
        # A guesser spreading over addresses is still caught by the key prefix it tries.
        for n in range(5):
            await throttle.failed(throttle.subjects(f"203.0.113.{n}", "sk-gw-victimprefix-rest"))
        by_prefix = await throttle.wait_s(throttle.subjects("203.0.113.99", "sk-gw-victimprefix-other"))
        other_key = await throttle.wait_s(throttle.subjects("203.0.113.99", "sk-gw-someoneelse-xyz"))
        # A quiet window forgets everything.
        clock.now += 601
        forgotten = await throttle.wait_s(throttle.subjects("203.0.113.99", "sk-gw-victimprefix-other"))
        return by_prefix, other_key, forgotten

    by_prefix, other_key, forgotten = run(scenario, factory)
    assert by_prefix > 0 and other_key == 0 and forgotten == 0


def test_the_counts_are_shared_through_redis() -> None:
    url = require_redis()
    prefix = f"test:signin:{secrets.token_hex(4)}:"
    clock = Clock()
    policy = ThrottlePolicy(free=1, base_s=10.0, max_lock_s=60.0, window_s=600.0)

    async def scenario() -> int:
        node_a = SignInThrottle(RedisFailures(url, prefix=prefix), policy=policy, clock=clock)
        node_b = SignInThrottle(RedisFailures(url, prefix=prefix), policy=policy, clock=clock)
        try:
            subjects = node_a.subjects("192.0.2.1", "")
            await node_a.failed(subjects)
            await node_b.failed(subjects)
            return await node_a.wait_s(subjects)
        finally:
            await node_a.aclose()
            await node_b.aclose()

    assert asyncio.run(scenario()) == 10


def test_a_redis_outage_does_not_lock_the_operator_out() -> None:
    clock = Clock()

    async def scenario() -> int:
        throttle = SignInThrottle(RedisFailures("redis://127.0.0.1:1/0", timeout_s=0.5), clock=clock)
        try:
            subjects = throttle.subjects("192.0.2.2", "k")
            await throttle.failed(subjects)
            return await throttle.wait_s(subjects)
        finally:
            await throttle.aclose()

    assert asyncio.run(scenario()) == 0


@pytest.mark.parametrize("key", ["x" * 16, "sk-admin-0123456789abcdef012345"])
def test_an_admin_key_under_32_characters_is_refused_at_start(key: str) -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        build_settings({"admin_key": key})


def test_an_admin_key_of_32_characters_is_accepted() -> None:
    settings = build_settings({"admin_key": "k" * 8 + secrets.token_hex(12)})
    assert settings.admin_key is not None
