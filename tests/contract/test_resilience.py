"""Routing and resilience across several upstreams, metrics, secrets and shutdown (issue 8)."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.gateway_process import GatewayProcess
from tests.conftest import (
    ADMIN_KEY,
    UPSTREAM_KEY,
    Gateway,
    closed_port,
    fake_upstream_config,
)
from tests.fakes.openai_upstream import FakeOpenAI, Fault

GEN = "/v1/images/generations"
BREAKER = {"failure_threshold": 2, "open_s": 0.5, "min_requests": 1000}


@pytest.fixture(scope="module")
def second_fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def third_fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


class ManualClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def states(gw: Gateway) -> dict[str, str]:
    body = gw.admin("GET", "/admin/upstreams").json()
    return {u["name"]: u["state"] for u in body["data"]}


def test_faulty_upstreams_trip_their_breakers_and_recover(
    gateway_with: Any, upstream: FakeOpenAI, second_fake: FakeOpenAI, third_fake: FakeOpenAI
) -> None:
    second_fake.clear()
    third_fake.clear()
    second_fake.always_fail = Fault.status(500, "broken")
    third_fake.always_fail = Fault.hang()
    gw = gateway_with(
        {
            "name": "dead",
            "kind": "openai",
            "follows_retirements": False,  # serves the retired gpt-image-1
            "base_url": f"http://127.0.0.1:{closed_port()}/v1",
            "api_key": "k",
        },
        fake_upstream_config(second_fake, name="erroring"),
        fake_upstream_config(third_fake, name="hanging", timeout_s=0.3),
        fake_upstream_config(upstream, name="healthy", priority=5),
        breaker=BREAKER,
        retry={"max_retries_per_upstream": 0},
    )
    # The breakers read a clock the test moves, so a slow run cannot let open_s pass by itself.
    clock = ManualClock(time.monotonic())
    for breaker in gw.server.app.state.gateway.router.breakers.values():
        breaker._clock = clock
    client = gw.client()
    for _ in range(4):
        assert client.images.generate(model="gpt-image-1", prompt="x", quality="low").data
    assert {r["upstream"] for r in gw.ledger()} == {"healthy"}
    assert states(gw) == {"dead": "open", "erroring": "open", "hanging": "open", "healthy": "closed"}
    # While open, the broken upstreams are not even tried.
    tried_before = second_fake.count(GEN)
    assert client.images.generate(model="gpt-image-1", prompt="x", quality="low").data
    assert second_fake.count(GEN) == tried_before

    listed = gw.admin("GET", "/admin/upstreams").json()["data"]
    erroring = next(u for u in listed if u["name"] == "erroring")
    assert erroring["consecutive_failures"] >= 2 and erroring["opened_at"] is not None
    assert "127.0.0.1" not in str(listed)

    # The erroring upstream recovers: after the cool-down a probe goes through and closes it.
    second_fake.always_fail = None
    clock.now += BREAKER["open_s"] + 0.1
    assert client.images.generate(model="gpt-image-1", prompt="x", quality="low").data
    assert states(gw)["erroring"] == "closed"
    third_fake.always_fail = None


def test_a_rate_limited_upstream_yields_to_a_healthy_one(
    gateway_with: Any, upstream: FakeOpenAI, second_fake: FakeOpenAI
) -> None:
    second_fake.clear()
    second_fake.always_fail = Fault.status(429, "slow down", retry_after=30)
    gw = gateway_with(
        fake_upstream_config(second_fake, name="limited"),
        fake_upstream_config(upstream, name="ok", priority=1),
    )
    for _ in range(3):
        assert gw.client().images.generate(model="gpt-image-1", prompt="x").data
    assert [r["upstream"] for r in gw.ledger()] == ["ok"] * 3
    second_fake.always_fail = None


def test_weighted_routing_follows_the_weights(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(
        fake_upstream_config(upstream, name="three", weight=3),
        fake_upstream_config(upstream, name="one", weight=1),
        logging={"level": "WARNING"},
    )
    key, _ = gw.create_key()
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(1000):
            assert (
                client.post(gw.url + GEN, json={"model": "gpt-image-1-mini", "prompt": "x"}).status_code
                == 200
            )
    shares = Counter(r["upstream"] for r in gw.ledger())
    # Binomial(1000, 0.75): the standard deviation is 13.7; ±4 of them is a sane band.
    assert 695 <= shares["three"] <= 805, shares
    assert shares["three"] + shares["one"] == 1000


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_what_happened(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(fake_upstream_config(upstream, name="fake"), retry={"max_retries_per_upstream": 0})
    key, _ = gw.create_key()
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        assert (
            httpx.post(
                gw.url + GEN, json={"model": "gpt-image-1", "prompt": "x"}, headers=headers
            ).status_code
            == 200
        )
    upstream.enqueue_fault(Fault.status(500, "boom"))
    assert (
        httpx.post(gw.url + GEN, json={"model": "gpt-image-1", "prompt": "x"}, headers=headers).status_code
        == 500
    )
    assert httpx.post(gw.url + GEN, json={"model": "gpt-image-1"}, headers=headers).status_code == 400

    metrics = samples(httpx.get(gw.url + "/metrics").text)
    route = ("route", GEN)

    def requests_total(status: str, model: str) -> float:
        key = ("gateway_requests_total", (("method", "POST"), ("model", model), route, ("status", status)))
        return metrics.get(key, 0.0)

    assert requests_total("200", "gpt-image-1") == 3
    assert requests_total("500", "gpt-image-1") == 1
    assert requests_total("400", "none") == 1
    tries = {
        labels: value
        for (name, labels), value in metrics.items()
        if name == "gateway_upstream_tries_total" and ("upstream", "fake") in labels
    }
    assert tries[(("model", "gpt-image-1"), ("outcome", "success"), ("upstream", "fake"))] == 3
    assert tries[(("model", "gpt-image-1"), ("outcome", "rejected"), ("upstream", "fake"))] == 1
    usage = upstream.usage
    image_out = usage["output_tokens_details"]["image_tokens"] * 3
    assert (
        metrics[("gateway_tokens_total", (("kind", "image_output"), ("model", "gpt-image-1")))] == image_out
    )
    ledger_cost = sum(int(r["cost_micros"]) for r in gw.ledger())
    assert metrics[("gateway_cost_micros_total", (("model", "gpt-image-1"),))] == ledger_cost
    assert metrics[("gateway_queue_depth", ())] == 0
    assert metrics[("gateway_upstream_breaker_state", (("state", "closed"), ("upstream", "fake")))] == 1


def test_no_secret_in_logs_error_bodies_or_metrics(upstream: FakeOpenAI, tmp_path: Path) -> None:
    """Every failure path, through a gateway process logging as in production (JSON, INFO)."""
    dead_url = f"http://127.0.0.1:{closed_port()}/v1"
    config = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(tmp_path / "data"),
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"},
        "logging": {"level": "INFO"},
        "retry": {"max_retries_per_upstream": 0},
        "upstreams": [
            fake_upstream_config(upstream, name="main", timeout_s=0.5),
            {
                "name": "dead",
                "kind": "openai",
                "follows_retirements": False,  # serves the retired gpt-image-1
                "base_url": dead_url,
                "api_key": "sk-dead-upstream-secret",
                "priority": 9,
            },
        ],
    }
    process = GatewayProcess(config, tmp_path).wait_ready()
    try:
        created = httpx.post(
            process.url + "/admin/keys",
            json={"name": "leak-check"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ).json()
        key, key_id = created["key"], created["id"]
        headers = {"Authorization": f"Bearer {key}"}
        bodies: list[str] = []
        faults = [
            Fault.status(500, f"internal error at {upstream.base_url} for key {UPSTREAM_KEY}", times=2),
            Fault.status(401, f"Incorrect API key provided: {UPSTREAM_KEY}", times=2),
            Fault.status(429, "slow", retry_after=120, times=2),
            Fault(kind="invalid_json", status_code=200, times=2),
            Fault.close(times=2),
            Fault.delay(2.0, times=2),
            Fault.status(400, f"bad request, see {upstream.base_url}/docs", param="prompt"),
        ]
        for fault in faults:
            upstream.enqueue_fault(fault)
            bodies.append(
                httpx.post(
                    process.url + GEN,
                    json={"model": "gpt-image-1", "prompt": "x"},
                    headers=headers,
                    timeout=30,
                ).text
            )
            upstream.clear()
        bodies.append(
            httpx.post(
                process.url + GEN,
                json={"model": "gpt-image-1", "prompt": "x", "stream": True},
                headers=headers,
            ).text
        )
        wrong = {"Authorization": "Bearer " + key + "x"}
        bodies.append(httpx.post(process.url + GEN, json={"model": "gpt-image-1"}, headers=wrong).text)
        bodies.append(httpx.get(process.url + "/admin/keys", headers=headers).text)
        bodies.append(
            httpx.get(
                process.url + "/admin/keys", headers={"Authorization": "Bearer wrong-admin-key-12345"}
            ).text
        )
        bodies.append(
            httpx.get(process.url + "/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        )
        bodies.append(httpx.get(process.url + "/metrics").text)
    finally:
        process.stop()
    logs = process.logs()
    assert key_id in logs, "the key id should be logged"
    secrets = [
        key,
        key.removeprefix("sk-gw-"),
        ADMIN_KEY,
        UPSTREAM_KEY,
        "sk-dead-upstream-secret",
        upstream.base_url,
        dead_url,
    ]
    for text in [*bodies, logs]:
        for secret in secrets:
            assert secret not in text, (secret, text[:300])


def test_sigterm_lets_a_stream_in_flight_finish(upstream: FakeOpenAI, tmp_path: Path) -> None:
    upstream.stream_delay_s = 0.5
    config = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(tmp_path / "data"),
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"},
        "logging": {"level": "WARNING"},
        "server": {"shutdown_grace_s": 10},
        "upstreams": [fake_upstream_config(upstream)],
    }
    process = GatewayProcess(config, tmp_path).wait_ready()
    key = httpx.post(
        process.url + "/admin/keys", json={"name": "s"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()["key"]
    events: list[str] = []
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            process.url + GEN,
            json={"model": "gpt-image-1", "prompt": "x", "stream": True, "partial_images": 3},
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("event:"):
                events.append(line.removeprefix("event: "))
                if len(events) == 1:
                    process.proc.send_signal(signal.SIGTERM)
    assert events == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert process.proc.wait(30) == 0
    process.stop()
    from tests.conftest import query

    (row,) = query(f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}", "SELECT status, images FROM ledger_entries")
    assert row == {"status": "succeeded", "images": 1}
