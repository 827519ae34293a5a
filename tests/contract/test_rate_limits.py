"""Per-key rate limits at the HTTP edge: headers, 429s, and one limit shared by two processes."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import httpx
import openai
import pytest

from bench.gateway_process import GatewayProcess
from tests.conftest import ADMIN_KEY, Gateway, fake_upstream_config
from tests.contract.test_metering import fire
from tests.fakes.openai_upstream import FakeOpenAI
from tests.services import require_redis

GEN = "/v1/images/generations"
BODY = {"model": "gpt-image-1", "prompt": "x", "quality": "low", "size": "1024x1024"}


def test_requests_per_minute_with_openai_headers(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = gateway.create_key(name="rpm", rpm=3)
    headers = {"Authorization": f"Bearer {key}"}
    answers = [httpx.post(gateway.url + GEN, json=BODY, headers=headers, timeout=30) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:3]] == ["2", "1", "0"]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    assert answers[0].headers["x-ratelimit-reset-requests"].endswith("s")
    refused = answers[3]
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert upstream.count(GEN) == 3

    with pytest.raises(openai.RateLimitError):
        gateway.client(key).images.generate(model="gpt-image-1", prompt="x")


def test_images_per_minute_counts_n(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = gateway.create_key(name="ipm", ipm=4)
    headers = {"Authorization": f"Bearer {key}"}
    first = httpx.post(gateway.url + GEN, json={**BODY, "n": 3}, headers=headers, timeout=30)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-images"] == "1"
    second = httpx.post(gateway.url + GEN, json={**BODY, "n": 2}, headers=headers, timeout=30)
    assert second.status_code == 429
    assert httpx.post(gateway.url + GEN, json=BODY, headers=headers, timeout=30).status_code == 200


def test_concurrent_requests_limit(gateway: Gateway, upstream: FakeOpenAI) -> None:
    """Exactly `concurrency` requests reach the upstream at once; every other one is refused at once.

    The fake holds every image request (its gate never fills by count: only `release()` opens it),
    so the two admitted requests stay in flight while the other four are answered.
    """
    sent = 6
    key, _ = gateway.create_key(name="conc", concurrency=2)
    headers = {"Authorization": f"Bearer {key}"}
    upstream.hold(until_in_flight=sent + 1)

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=sent)) as client:
            pending = {asyncio.create_task(client.post(gateway.url + GEN, json=BODY, headers=headers))}
            for _ in range(sent - 1):
                pending.add(asyncio.create_task(client.post(gateway.url + GEN, json=BODY, headers=headers)))
            refused: list[httpx.Response] = []
            # The four refusals come back while the upstream still holds the two admitted requests.
            while len(refused) < sent - 2:
                done, pending = await asyncio.wait(pending, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                assert done, f"only {len(refused)} answers while {upstream.in_flight} held upstream"
                refused += [task.result() for task in done]
            assert await asyncio.to_thread(upstream.wait_for_count, 2, GEN)
            assert (upstream.in_flight, upstream.count(GEN)) == (2, 2)
            upstream.release()
            return refused, [await task for task in pending]

    try:
        refused, admitted = asyncio.run(scenario())
    finally:
        upstream.release()
    assert [r.status_code for r in refused] == [429] * 4, [r.text for r in refused]
    for response in refused:
        error = response.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "rate_limit_error",
            "rate_limit_exceeded",
            None,
        )
        assert "Limit 2, In progress 2" in error["message"]
        assert response.headers["retry-after"] == "1"
    assert [r.status_code for r in admitted] == [200, 200]
    assert upstream.count(GEN) == 2 and upstream.max_in_flight == 2
    # Slots are given back when the requests end.
    assert httpx.post(gateway.url + GEN, json=BODY, headers=headers, timeout=30).status_code == 200


def test_two_processes_share_one_limit_through_redis(upstream: FakeOpenAI, tmp_path: Path) -> None:
    redis_url = require_redis()
    config = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(tmp_path / "data"),
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"},
        "redis": {"url": redis_url},
        "rate_limits": {"prefix": f"gw:test:{secrets.token_hex(4)}:"},
        "logging": {"level": "WARNING"},
        "upstreams": [fake_upstream_config(upstream)],
    }
    first = GatewayProcess(config, tmp_path).wait_ready()
    second = GatewayProcess(config, tmp_path).wait_ready()
    try:
        created = httpx.post(
            first.url + "/admin/keys",
            json={"name": "shared-rpm", "rpm": 10},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ).json()

        async def both() -> list[httpx.Response]:
            halves = await asyncio.gather(
                fire(first.url, created["key"], 15, BODY), fire(second.url, created["key"], 15, BODY)
            )
            return [r for half in halves for r in half]

        responses = asyncio.run(both())
    finally:
        first.stop()
        second.stop()
    assert sum(r.status_code == 200 for r in responses) == 10
    assert sum(r.status_code == 429 for r in responses) == 20
