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
    upstream.stream_delay_s = 0.5
    key, _ = gateway.create_key(name="conc", concurrency=2)
    responses = asyncio.run(fire(gateway.url, key, 6, {**BODY, "stream": True, "partial_images": 1}))
    assert sum(r.status_code == 200 for r in responses) >= 2
    assert sum(r.status_code == 429 for r in responses) >= 1
    assert all(r.status_code in (200, 429) for r in responses)
    # Slots are given back when streams end.
    assert (
        httpx.post(
            gateway.url + GEN, json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ).status_code
        == 200
    )


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
