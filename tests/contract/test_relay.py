"""Non-streamed base64 answers are relayed as the upstream's own bytes, and still billed."""

from __future__ import annotations

import base64
import json

import httpx
import orjson

from tests.conftest import Gateway
from tests.fakes.openai_upstream import FakeOpenAI, Fault

GEN = "/v1/images/generations"
USAGE = {
    "input_tokens": 20,
    "input_tokens_details": {"text_tokens": 20, "image_tokens": 0},
    "output_tokens": 8320,
    "output_tokens_details": {"text_tokens": 0, "image_tokens": 8320},
    "total_tokens": 8340,
}
# gpt-image-1, micro-PTC per token: text in 5, image out 40.
COST = 20 * 5 + 8320 * 40


def post(gateway: Gateway, key: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(gateway.url + GEN, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_a_large_answer_is_relayed_byte_for_byte(gateway: Gateway, upstream: FakeOpenAI) -> None:
    # Indented JSON: re-encoding it (as the gateway once did) would change its whitespace.
    upstream.pretty_json = True
    upstream.noise_images = True
    upstream.usage = dict(USAGE)
    key, key_id = gateway.create_key(name="relay")

    response = post(gateway, key, {"model": "gpt-image-1", "prompt": "noise", "n": 2, "size": "1536x1024"})

    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    assert len(response.content) > 10 * 1024 * 1024
    assert response.content == upstream.last_answer
    body = orjson.loads(response.content)
    assert len(body["data"]) == 2 and base64.b64decode(body["data"][0]["b64_json"], validate=True)

    assert response.headers["x-gateway-cost"] == f"0.{COST:06d}"
    (row,) = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert (row["status"], row["images"], row["cost_micros"]) == ("succeeded", 2, COST)
    assert (row["text_input_tokens"], row["image_output_tokens"], row["estimated"]) == (20, 8320, 0)
    assert json.loads(row["usage"]) == USAGE


def test_an_answer_with_escaped_slashes_is_relayed_too(gateway: Gateway, upstream: FakeOpenAI) -> None:
    # `\/` inside the base64 makes the gateway parse the whole body; it still relays the original.
    image = base64.b64encode(bytes(range(256)) * 64).decode()
    answer = json.dumps({"created": 1, "data": [{"b64_json": image}], "usage": USAGE}).replace("/", "\\/")
    upstream.enqueue_fault(Fault.invalid_json(answer.encode(), path=GEN))
    key, key_id = gateway.create_key(name="escaped")

    response = post(gateway, key, {"model": "gpt-image-1", "prompt": "escaped"})

    assert response.status_code == 200, response.text[:300]
    assert response.content == answer.encode()
    assert response.json()["data"][0]["b64_json"] == image
    assert response.headers["x-gateway-cost"] == f"0.{COST:06d}"
    (row,) = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert (row["images"], row["cost_micros"]) == (1, COST)


def test_url_delivery_still_reads_the_images(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.pretty_json = True
    key, _ = gateway.create_key(name="urls")

    response = post(gateway, key, {"model": "gpt-image-1", "prompt": "linked", "response_format": "url"})

    assert response.status_code == 200, response.text[:300]
    (item,) = response.json()["data"]
    assert "b64_json" not in item
    image = httpx.get(item["url"], timeout=30)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
