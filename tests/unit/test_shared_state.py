"""The Redis-backed shared state of app/cluster and app/upstream/shared_*.py, in one process:
leases that lapse, breaker transitions told to other nodes, and failing safe without Redis.
The two-process proofs are in tests/cluster/test_shared_state.py."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from app.cluster.bus import ClusterBus
from app.core.errors import UpstreamBusy
from app.domain.states import BreakerState
from app.upstream.health import BreakerChange, BreakerConfig, CircuitBreaker
from app.upstream.shared_breakers import SharedBreakers
from app.upstream.shared_slots import SharedSlotStore
from app.upstream.slots import SlotPolicy
from tests.conftest import closed_port
from tests.services import require_redis


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def bus() -> AsyncIterator[ClusterBus]:
    url = require_redis()
    shared = ClusterBus(url, prefix=f"gw:unit:{secrets.token_hex(6)}:")
    yield shared
    await shared.aclose()


async def test_a_lapsed_lease_gives_its_slot_back(bus: ClusterBus) -> None:
    store = SharedSlotStore(bus, lease_s=30)
    slots = store.slots("up", SlotPolicy(limit=2, wait_s=0))
    key = bus.key("slots:up")
    now_ms = int(time.time() * 1000)
    # A node alive (lease runs for another minute) and a dead one (its lease ended a second ago).
    await bus.redis.zadd(key, {"alive": now_ms + 60_000, "dead": now_ms - 1_000})
    async with slots.hold("request"):
        members = await bus.redis.zrange(key, 0, -1)
        assert b"alive" in members and b"dead" not in members and len(members) == 2
        with pytest.raises(UpstreamBusy) as busy:  # alive + this call: the cap of 2 is reached
            async with slots.hold("request"):
                pass
        assert busy.value.status_code == 503
    assert await bus.redis.zrange(key, 0, -1) == [b"alive"]  # released on the way out
    await store.aclose()


async def test_a_waiting_call_gets_the_slot_another_node_gives_back(bus: ClusterBus) -> None:
    ours, theirs = SharedSlotStore(bus), SharedSlotStore(bus)
    policy = SlotPolicy(limit=1, wait_s=30)
    mine, other = ours.slots("up", policy), theirs.slots("up", policy)
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def holder() -> None:
        async with other.hold("request"):
            entered.set()
            await leave.wait()

    held = asyncio.create_task(holder())
    await entered.wait()

    async def waiter() -> None:
        async with mine.hold("request"):
            pass

    waiting = asyncio.create_task(waiter())
    while mine.waiting["request"] == 0:
        await asyncio.sleep(0.01)
    assert not waiting.done()
    leave.set()
    await asyncio.wait_for(asyncio.gather(held, waiting), 30)
    assert mine.waiting["request"] == 0
    await ours.aclose()
    await theirs.aclose()


async def test_without_redis_slots_fall_back_to_this_process_and_nothing_fails() -> None:
    bus = ClusterBus(f"redis://127.0.0.1:{closed_port()}/0", prefix="gw:down:", timeout_s=0.5)
    store = SharedSlotStore(bus)
    slots = store.slots("up", SlotPolicy(limit=1, wait_s=0))
    async with slots.hold("request"):
        assert store.degraded()
        with pytest.raises(UpstreamBusy):  # the local cap still holds
            async with slots.hold("request"):
                pass
    assert not await bus.publish("keys", "key_1")
    shared = SharedBreakers(bus)
    breaker = CircuitBreaker("up", BreakerConfig(failure_threshold=1))
    shared.attach([breaker])
    breaker.record_failure()  # the write to Redis fails on its own task, logged
    await shared.sync()
    assert breaker.state is BreakerState.OPEN
    await shared.aclose()
    await store.aclose()
    await bus.aclose()


async def test_a_breaker_opened_here_is_written_and_published(bus: ClusterBus) -> None:
    shared = SharedBreakers(bus)
    breaker = CircuitBreaker("up", BreakerConfig(failure_threshold=2, open_s=60))
    shared.attach([breaker])
    listener = aioredis.Redis.from_url(require_redis())
    pubsub = listener.pubsub()
    await pubsub.subscribe(bus.channel("breakers"))
    try:
        breaker.record_failure()
        breaker.record_failure()
        message = None
        while message is None or message["type"] != "message":
            message = await pubsub.get_message(timeout=5)
        node, _, payload = message["data"].decode().partition(" ")
        assert node == bus.node_id
        told = json.loads(payload)
        assert told["state"] == "open" and told["name"] == "up" and told["failures"] == 2
        assert 0 < await bus.redis.pttl(bus.key("breaker:up")) <= 60_000
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await shared.aclose()


async def test_a_breaker_opened_elsewhere_opens_here_for_what_is_left(bus: ClusterBus) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("up", BreakerConfig(open_s=30), clock)
    shared = SharedBreakers(bus)
    shared.attach([breaker])
    await bus.redis.set(bus.key("breaker:up"), json.dumps({"name": "up", "failures": 5}), px=10_000)
    await shared.sync()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    retry_in = breaker.snapshot().retry_in_s
    assert retry_in is not None and 9 < retry_in <= 10
    clock.now += 10
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.close_elsewhere()
    assert breaker.state is BreakerState.CLOSED
    await shared.aclose()


def test_transitions_told_are_the_breakers_own() -> None:
    clock = FakeClock()
    told: list[BreakerChange] = []
    breaker = CircuitBreaker("up", BreakerConfig(failure_threshold=1, open_s=30), clock)
    breaker.on_change = told.append
    breaker.open_elsewhere(20)  # heard from another node: not told again
    breaker.close_elsewhere()
    assert told == []
    breaker.record_failure()
    clock.now += 30
    assert breaker.allow()  # the half-open probe
    breaker.record_success(0.1)
    assert [(c.state, c.reason) for c in told] == [
        (BreakerState.OPEN, "consecutive failures"),
        (BreakerState.CLOSED, "probe succeeded"),
    ]
