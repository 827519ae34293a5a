"""Every answer names the upstream that served it in `x-gateway-upstream` (issue 23 item 1): a sync
answer, a stream, a finished task's result, and an error an upstream gave; the same name the
ledger (and so the console) and the access log record. `server.upstream_header: false` hides it."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import LOCAL_UPSTREAM, Gateway

GEN = "/v1/images/generations"
BODY = {"model": "gpt-image-2", "prompt": "a lighthouse", "size": "1024x1024", "quality": "low"}


def post(gw: Gateway, key: str, body: dict[str, Any], **params: str) -> httpx.Response:
    return httpx.post(
        gw.url + GEN, json=body, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def finished_task(gw: Gateway, key: str, task_id: str) -> httpx.Response:
    deadline = time.monotonic() + 120  # bounds a failure only; the loop ends when the task does
    while time.monotonic() < deadline:
        polled = httpx.get(
            gw.url + f"/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        if polled.json()["status"] in ("succeeded", "failed"):
            return polled
        assert "x-gateway-upstream" not in polled.headers  # not served yet
        time.sleep(0.05)
    raise AssertionError("the task did not finish")


def test_sync_stream_and_task_answers_name_their_upstream(local_gateway: Gateway) -> None:
    key, key_id = local_gateway.create_key(name="header")
    assert post(local_gateway, key, BODY).headers["x-gateway-upstream"] == "local"
    with httpx.stream(
        "POST",
        local_gateway.url + GEN,
        json=BODY | {"stream": True, "partial_images": 1},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as stream:
        assert stream.headers["x-gateway-upstream"] == "local"
        assert "image_generation.completed" in stream.read().decode()
    submitted = post(local_gateway, key, BODY, **{"async": "true"})
    assert submitted.status_code == 202
    assert finished_task(local_gateway, key, submitted.json()["id"]).headers["x-gateway-upstream"] == "local"
    rows = [r for r in local_gateway.ledger() if r["key_id"] == key_id]
    assert [r["upstream"] for r in rows] == ["local"] * 3


def test_an_operator_can_keep_upstream_names_from_tenants(gateway_with: Any) -> None:
    gw: Gateway = gateway_with(LOCAL_UPSTREAM, server={"upstream_header": False})
    key, _ = gw.create_key(name="hidden")
    answered = post(gw, key, BODY)
    assert answered.status_code == 200 and "x-gateway-upstream" not in answered.headers
    submitted = post(gw, key, BODY, **{"async": "true"})
    assert "x-gateway-upstream" not in finished_task(gw, key, submitted.json()["id"]).headers
    # The ledger still knows.
    assert {r["upstream"] for r in gw.ledger()} == {"local"}


def test_a_refusal_before_any_upstream_names_none(local_gateway: Gateway) -> None:
    key, _ = local_gateway.create_key(name="refused")
    refused = post(local_gateway, key, BODY | {"n": 99})
    assert refused.status_code == 400 and "x-gateway-upstream" not in refused.headers
