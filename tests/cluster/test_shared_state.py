"""Issue 24, acceptance 2: state shared by two real gateway nodes through Redis (SPEC §10).

Two API nodes started from the Kubernetes manifests (tests/cluster/nodes.py), each with its own
data directory, on one PostgreSQL database, one S3 server and one Redis (each test under its own key
prefix, so parallel tests never meet), in front of one fake upstream that counts what reaches it:

- a key revoked or disabled on A (or revoked with the CLI) is refused by B within 1 s, although B
  caches keys for 300 s;
- ``rpm: 10`` over A and B together: 30 requests, exactly 10 succeed;
- ``max_concurrency: 4``: 16 slow calls over A and B, the upstream never sees more than 4 at once,
  and all 16 complete, each billed once;
- the slots of a node killed mid-call come back once their lease lapses;
- an upstream tripped on A is skipped by B (B's calls never reach it).

Nothing waits on a wall-clock margin: each step waits (bounded) for a condition the nodes report.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from bench.books import ledger_violations, query
from tests.cluster.nodes import Launcher, Node, deep_merge, service_config, service_secrets
from tests.conftest import ADMIN_KEY, fake_upstream_config
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.s3_server import FakeS3
from tests.services import fresh_postgres_database, require_redis

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

GEN = "/v1/images/generations"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Nodes that share a database share the pepper of its key hashes (each has its own data dir).
PEPPER = "cluster-test-pepper-" + "0123456789abcdef" * 2
PROMPT = {"model": "gpt-image-1", "prompt": "a lighthouse", "quality": "low", "size": "1024x1024"}


class Cluster:
    """Two nodes, A and B, sharing a database and a Redis prefix."""

    def __init__(self, nodes: list[Node], db_url: str, redis_url: str, prefix: str) -> None:
        self.a, self.b = nodes
        self.db_url = db_url
        self.redis = redis.Redis.from_url(redis_url)
        self.prefix = prefix

    def slots_taken(self, upstream: str = "fake") -> int:
        return int(self.redis.zcard(f"{self.prefix}slots:{upstream}"))

    def create_key(self, **fields: Any) -> tuple[str, str]:
        response = httpx.post(self.a.url + "/admin/keys", json={"name": "cluster", **fields}, headers=ADMIN)
        assert response.status_code == 201, response.text
        return response.json()["key"], response.json()["id"]

    @staticmethod
    def upstream_row(node: Node) -> dict[str, Any]:
        response = httpx.get(node.url + "/admin/upstreams", headers=ADMIN, timeout=10)
        assert response.status_code == 200, response.text
        (row,) = response.json()["data"]
        return dict(row)


@pytest.fixture(scope="module")
def s3() -> Iterator[FakeS3]:
    with FakeS3() as server:
        yield server


@pytest.fixture
def cluster(upstream: FakeOpenAI, s3: FakeS3, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    redis_url = require_redis()
    prefix = f"gw:test:{secrets.token_hex(6)}:"
    launchers: list[Launcher] = []
    clusters: list[Cluster] = []
    with fresh_postgres_database() as db_url:
        keys = service_secrets(
            database_url=db_url,
            redis_url=redis_url,
            upstream=upstream,
            key_pepper=PEPPER,
            signing_key="cluster-signing-key-" + "0123456789abcdef" * 2,
        )
        base = service_config(s3=s3, upstream=upstream, redis_prefix=prefix)
        # Short backoffs, as a test of retries wants them; each test its own bucket.
        base["retry"] = {"initial_delay_s": 0.01, "max_delay_s": 0.05}
        base["tasks"] = {"poll_s": 0.1}
        base["storage"]["bucket"] = "shared-" + secrets.token_hex(4)

        def start(upstream_extra: dict[str, Any] | None = None, **extra: Any) -> Cluster:
            config = deep_merge(base, extra)
            config["upstreams"] = [
                {**fake_upstream_config(upstream), "timeout_s": 60, **(upstream_extra or {})}
            ]
            nodes = Launcher(tmp_path / f"cluster-{len(launchers)}", secrets=keys, config=config)
            launchers.append(nodes)
            if len(launchers) == 1:
                nodes.migrate()
            started = [nodes.api(name, ready=False) for name in ("a", "b")]
            for node in started:
                node.wait_ready()
            clusters.append(Cluster(started, db_url, redis_url, prefix))
            return clusters[-1]

        try:
            yield start
        finally:
            upstream.release()
            for launcher in launchers:
                launcher.stop_all()
            for each in clusters:
                each.redis.close()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Bounded wait for a condition the system reports; the bound only limits a failure."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sdk(node: Node, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_a_key_revoked_on_one_node_is_refused_by_the_other_within_a_second(
    cluster: Callable[..., Cluster],
) -> None:
    # B caches keys for 300 s: only the invalidation through Redis can explain a quick refusal.
    nodes = cluster(security={"key_cache_ttl_s": 300})

    def refused_by_b(key: str) -> bool:
        client = openai.OpenAI(base_url=nodes.b.url + "/v1", api_key=key, max_retries=0, timeout=30)
        try:
            client.models.list()
        except openai.AuthenticationError:
            return True
        finally:
            client.close()
        return False

    for change in ("revoke", "disable", "revoke with the CLI"):
        key, key_id = nodes.create_key()
        assert not refused_by_b(key)  # B has it cached now
        if change == "revoke":
            response = httpx.delete(nodes.a.url + f"/admin/keys/{key_id}", headers=ADMIN)
            assert response.status_code == 200, response.text
        elif change == "disable":
            response = httpx.patch(
                nodes.a.url + f"/admin/keys/{key_id}", json={"enabled": False}, headers=ADMIN
            )
            assert response.status_code == 200, response.text
        else:  # `python -m app keys revoke` in A's pod: the database and Redis, no server
            done = nodes.a.exec("keys", "revoke", key_id)
            assert done.returncode == 0, done.stderr.decode()
        changed_at = time.monotonic()
        wait_for(lambda key=key: refused_by_b(key), f"B to refuse the key after {change}", timeout_s=30)
        elapsed = time.monotonic() - changed_at
        print(f"{change}: refused by B {elapsed * 1000:.0f} ms after A answered")
        assert elapsed <= 1.0, f"B refused the key {elapsed:.2f} s after A's change"


def test_rpm_is_one_limit_across_both_nodes(cluster: Callable[..., Cluster], upstream: FakeOpenAI) -> None:
    nodes = cluster()
    key, key_id = nodes.create_key(rpm=10)

    async def one(node: Node) -> str:
        async with sdk(node, key) as client:
            try:
                await client.images.generate(**PROMPT)
            except openai.RateLimitError:
                return "limited"
        return "ok"

    async def spread() -> list[str]:
        return await asyncio.gather(*(one(nodes.a if i % 2 else nodes.b) for i in range(30)))

    outcomes = asyncio.run(spread())
    assert outcomes.count("ok") == 10 and outcomes.count("limited") == 20, outcomes
    assert upstream.count(GEN) == 10
    assert ledger_violations(nodes.db_url, [key_id], None) == []


def test_max_concurrency_counts_calls_on_both_nodes(
    cluster: Callable[..., Cluster], upstream: FakeOpenAI
) -> None:
    nodes = cluster(upstream_extra={"max_concurrency": 4, "queue_timeout_s": 120})
    key, key_id = nodes.create_key()
    # Every call is held at the upstream until the test lets them all go.
    upstream.hold(until_in_flight=1_000, timeout_s=120)

    def held_and_waiting() -> bool:
        waiting = sum(sum(Cluster.upstream_row(node)["waiting"].values()) for node in (nodes.a, nodes.b))
        return upstream.in_flight == 4 and waiting == 12

    async def run() -> list[int]:
        async def one(node: Node) -> int:
            async with sdk(node, key) as client:
                result = await client.images.generate(**PROMPT)
            return len(result.data or [])

        calls = [asyncio.ensure_future(one(nodes.a if i % 2 else nodes.b)) for i in range(16)]
        # 4 calls at the upstream and the other 12 waiting for a slot, on A and B together.
        await asyncio.to_thread(wait_for, held_and_waiting, "4 calls in flight and 12 waiting")
        upstream.release()
        return await asyncio.gather(*calls)

    try:
        images = asyncio.run(run())
    finally:
        upstream.release()
    assert images == [1] * 16
    assert upstream.count(GEN) == 16
    assert upstream.max_in_flight == 4, "the upstream saw more calls at once than max_concurrency"
    assert ledger_violations(nodes.db_url, [key_id], None) == []
    assert len(query(nodes.db_url, f"SELECT 1 FROM ledger_entries WHERE key_id = '{key_id}'")) == 16


def test_an_upstream_tripped_on_one_node_is_skipped_by_the_other(
    cluster: Callable[..., Cluster], upstream: FakeOpenAI
) -> None:
    nodes = cluster(breaker={"failure_threshold": 2, "open_s": 300})
    key, key_id = nodes.create_key()
    upstream.always_fail = Fault.status(500)

    async def call(node: Node) -> openai.APIStatusError:
        async with sdk(node, key) as client:
            with pytest.raises(openai.APIStatusError) as failure:
                await client.images.generate(**PROMPT)
        return failure.value

    asyncio.run(call(nodes.a))  # A retries the upstream until its breaker opens
    assert Cluster.upstream_row(nodes.a)["state"] == "open"
    wait_for(lambda: Cluster.upstream_row(nodes.b)["state"] == "open", "B to see the breaker open")
    reached = upstream.count(GEN)
    refused = [asyncio.run(call(nodes.b)) for _ in range(3)]
    assert upstream.count(GEN) == reached, "B sent calls to an upstream A had tripped"
    assert {error.status_code for error in refused} == {503}
    assert "cooling down" in str(refused[0].message)
    assert ledger_violations(nodes.db_url, [key_id], None) == []


def test_the_slots_of_a_killed_node_come_back_when_their_lease_lapses(
    cluster: Callable[..., Cluster], upstream: FakeOpenAI
) -> None:
    nodes = cluster(
        upstream_extra={"max_concurrency": 2, "queue_timeout_s": 120},
        redis={"slot_lease_s": 1},
    )
    key, key_id = nodes.create_key()
    upstream.hold(until_in_flight=1_000, timeout_s=120)

    async def one(node: Node) -> int:
        async with sdk(node, key) as client:
            result = await client.images.generate(**PROMPT)
        return len(result.data or [])

    async def on_a_then_killed() -> None:
        calls = [asyncio.ensure_future(one(nodes.a)) for _ in range(2)]
        await asyncio.to_thread(wait_for, lambda: upstream.in_flight == 2, "A's 2 calls at the upstream")
        nodes.a.kill()
        await asyncio.gather(*calls, return_exceptions=True)

    asyncio.run(on_a_then_killed())
    # A died holding both slots: B can only call once their leases lapse (nobody renews them).
    assert nodes.slots_taken() == 2
    upstream.release()

    async def on_b() -> list[int]:
        return await asyncio.gather(one(nodes.b), one(nodes.b))

    assert asyncio.run(on_b()) == [1, 1]
    assert nodes.slots_taken() == 0
    billed = query(
        nodes.db_url, f"SELECT status FROM ledger_entries WHERE key_id = '{key_id}' AND images > 0"
    )
    assert len(billed) == 2  # B's two calls; A died before settling its own
