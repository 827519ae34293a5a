"""Upstream failures: OpenAI-shaped 502/503/504, failover to the next upstream, nothing leaked."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import closed_port, fake_upstream_config
from tests.fakes.openai_upstream import FakeOpenAI, Fault

NO_RETRY = {"max_retries_per_upstream": 0}


def assert_clean(error: openai.APIStatusError, *secrets: str) -> None:
    text = error.response.text
    for secret in secrets:
        assert secret not in text


def test_connect_error_is_502(gateway_with: Any) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    gw = gateway_with(
        {
            "name": "dead",
            "kind": "openai",
            "base_url": dead,
            "api_key": "sk-dead-secret-key",
            "follows_retirements": False,
        }
    )
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model="gpt-image-1", prompt="x")
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    assert caught.value.type == "api_error"
    assert_clean(caught.value, "sk-dead-secret-key", dead, "127.0.0.1")
    (row,) = gw.ledger()
    assert row["status"] == "failed" and row["cost_micros"] == 0 and row["upstream"] == "dead"


def test_timeout_is_504(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(fake_upstream_config(upstream, timeout_s=0.5), retry=NO_RETRY)
    upstream.enqueue_fault(Fault.hang())  # a stall that never ends: no margin for a slow box to eat
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model="gpt-image-1", prompt="x")
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"


def test_invalid_upstream_answer_is_502(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(fake_upstream_config(upstream), retry=NO_RETRY)
    upstream.enqueue_fault(Fault(kind="invalid_json", status_code=200))
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model="gpt-image-1", prompt="x")
    assert caught.value.status_code == 502 and caught.value.code == "upstream_error"


def test_dropped_connection_is_502(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(fake_upstream_config(upstream), retry=NO_RETRY)
    upstream.enqueue_fault(Fault(kind="close"))
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model="gpt-image-1", prompt="x")
    assert caught.value.status_code == 502


def test_server_error_fails_over_to_the_next_upstream(gateway_with: Any, upstream: FakeOpenAI) -> None:
    dead = {
        "name": "dead",
        "kind": "openai",
        "follows_retirements": False,  # serves the retired gpt-image-1
        "base_url": f"http://127.0.0.1:{closed_port()}/v1",
        "api_key": "k",
    }
    flaky = fake_upstream_config(upstream, name="flaky", priority=0)
    gw = gateway_with(
        dead | {"priority": 0}, flaky | {"priority": 0}, {"name": "local", "kind": "local", "priority": 5}
    )
    upstream.enqueue_fault(Fault.status(500, "boom"))
    # Whatever order the tier is tried in, the request ends on a working upstream: a real one.
    # `local` (not named in a fallback_for) never stands in for upstreams configured for the model.
    raw = gw.client().images.with_raw_response.generate(
        model="gpt-image-1", prompt="x", size="1024x1024", quality="low"
    )
    assert raw.parse().data
    assert raw.http_response.headers["x-gateway-upstream"] == "flaky"
    rows = gw.ledger()
    assert [r["status"] for r in rows] == ["succeeded"]
    assert rows[0]["upstream"] == "flaky"


def test_local_stands_in_only_for_the_models_the_operator_names(
    gateway_with: Any, upstream: FakeOpenAI
) -> None:
    """SPEC §2: a failing real upstream's error reaches the client, uncharged, unless `local` is
    named for that model in its `fallback_for`; then the answer says `local` served it."""
    local = {"name": "local", "kind": "local", "priority": 5, "fallback_for": ["gpt-image-1.5"]}
    gw = gateway_with(fake_upstream_config(upstream), local, retry=NO_RETRY)
    upstream.always_fail = Fault.status(500, "down", path="/v1/images/generations")
    client = gw.client()
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(model="gpt-image-1", prompt="x", size="1024x1024", quality="low")
    assert caught.value.response.headers["x-gateway-upstream"] == "fake"
    named = client.images.with_raw_response.generate(
        model="gpt-image-1.5", prompt="x", size="1024x1024", quality="low"
    )
    assert named.http_response.headers["x-gateway-upstream"] == "local"
    rows = gw.ledger()
    assert [(r["upstream"], r["status"], r["cost_micros"] > 0) for r in rows] == [
        ("fake", "failed", False),
        ("local", "succeeded", True),
    ]


def test_a_429_beyond_the_retry_after_cap_is_relayed(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(fake_upstream_config(upstream))
    # 120 s is beyond the policy's 60 s cap: not waited for, so the last 429 goes back as it is.
    upstream.enqueue_fault(
        Fault.status(429, "slow down", type="rate_limit_error", code="rate_limit_exceeded", retry_after=120)
    )
    response = httpx.post(
        gw.url + "/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "x"},
        headers={"Authorization": f"Bearer {gw.create_key()[0]}"},
        timeout=30,
    )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "120"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert upstream.count("/v1/images/generations") == 1


def test_a_short_retry_after_is_honoured_on_the_same_upstream(
    gateway_with: Any, upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream))
    upstream.enqueue_fault(Fault.status(429, "slow down", retry_after=1))
    result = gw.client().images.generate(model="gpt-image-1", prompt="x")
    assert result.data
    first, second = upstream.requests
    assert second.received_at - first.received_at >= 0.9, "retry-after was not waited for"


def test_a_429_fails_over_at_once_when_another_upstream_exists(
    gateway_with: Any, upstream: FakeOpenAI
) -> None:
    gw = gateway_with(
        fake_upstream_config(upstream, name="a"), fake_upstream_config(upstream, name="b", priority=1)
    )
    upstream.enqueue_fault(Fault.status(429, "slow down", retry_after=30))
    assert gw.client().images.generate(model="gpt-image-1", prompt="x").data
    first, second = upstream.requests
    assert second.received_at - first.received_at < 5
    assert [r["upstream"] for r in gw.ledger()] == ["b"]


def test_upstream_client_error_is_not_retried(gateway_with: Any, upstream: FakeOpenAI) -> None:
    second = fake_upstream_config(upstream, name="second", priority=1)
    gw = gateway_with(fake_upstream_config(upstream), second)
    upstream.enqueue_fault(Fault.status(400, "bad prompt", code="invalid_value", param="prompt"))
    with pytest.raises(openai.BadRequestError):
        gw.client().images.generate(model="gpt-image-1", prompt="x")
    assert upstream.count("/v1/images/generations") == 1


def test_upstream_refusing_our_key_is_not_a_client_401(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(fake_upstream_config(upstream, api_key="sk-wrong-upstream-key"))
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model="gpt-image-1", prompt="x")
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    assert_clean(caught.value, "sk-wrong-upstream-key")


def test_readyz_reports_this_node_not_its_upstreams(gateway_with: Any, upstream: FakeOpenAI) -> None:
    """An upstream's outage is every node's: it must not take nodes out of rotation (SPEC §9)."""
    dead = {
        "name": "dead",
        "kind": "openai",
        "follows_retirements": False,  # serves the retired gpt-image-1
        "base_url": f"http://127.0.0.1:{closed_port()}/v1",
        "api_key": "k",
    }
    gw = gateway_with(fake_upstream_config(upstream), dead)
    ready = httpx.get(gw.url + "/readyz", timeout=30)
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "database": "ok",
        "redis": "not_configured",
        "draining": "false",
    }
    assert httpx.get(gw.url + "/healthz", timeout=30).json()["status"] == "ok"

    only_dead = gateway_with(dead)
    assert httpx.get(only_dead.url + "/readyz", timeout=30).status_code == 200
    assert upstream.count() == 0  # nothing was probed
