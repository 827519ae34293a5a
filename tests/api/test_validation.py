"""Every generation rule of SPEC §1.1: one accepted and one rejected request each.

Rejections must carry the exact OpenAI error fields and must never reach the upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.fakes.openai_upstream import FakeOpenAI

GEN = "/v1/images/generations"


@dataclass(frozen=True)
class Rule:
    name: str
    accepted: dict[str, Any]
    rejected: dict[str, Any]
    param: str | None
    code: str
    drop: tuple[str, ...] = ()  # fields removed from the base body for the rejected case
    status: int = 400
    error_type: str = "invalid_request_error"
    extra: dict[str, Any] = field(default_factory=dict)


def body(model: str = "gpt-image-1", **fields: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "a cat", **fields}


RULES = [
    Rule("prompt required", body(), {"model": "gpt-image-1"}, "prompt", "missing_required_parameter"),
    Rule("prompt non-empty", body(prompt="x"), body(prompt=""), "prompt", "empty_string"),
    Rule("prompt blank", body(prompt=" a "), body(prompt="   "), "prompt", "empty_string"),
    Rule("prompt type", body(), body(prompt=5), "prompt", "invalid_type"),
    Rule(
        "gpt-image prompt ≤ 32000",
        body(prompt="p" * 32000),
        body(prompt="p" * 32001),
        "prompt",
        "string_above_max_length",
    ),
    Rule(
        "dall-e-3 prompt ≤ 4000",
        body("dall-e-3", prompt="p" * 4000),
        body("dall-e-3", prompt="p" * 4001),
        "prompt",
        "string_above_max_length",
    ),
    Rule(
        "dall-e-2 prompt ≤ 1000",
        body("dall-e-2", prompt="p" * 1000),
        body("dall-e-2", prompt="p" * 1001),
        "prompt",
        "string_above_max_length",
    ),
    Rule("model required", body(), {"prompt": "a cat"}, "model", "missing_required_parameter"),
    Rule("unknown model", body("gpt-image-1-mini"), body("gpt-image-9"), "model", "invalid_value"),
    Rule("n ≤ 10", body(n=10, quality="low"), body(n=11), "n", "integer_above_max_value"),
    Rule("n ≥ 1", body(n=1), body(n=0), "n", "integer_below_min_value"),
    Rule("n is an integer", body(n=2), body(n="2"), "n", "invalid_type"),
    Rule("dall-e-3 only n=1", body("dall-e-3", n=1), body("dall-e-3", n=2), "n", "invalid_value"),
    Rule("gpt-image sizes", body(size="1536x1024"), body(size="1792x1024"), "size", "invalid_value"),
    Rule("gpt-image auto size", body(size="auto"), body(size="512x512"), "size", "invalid_value"),
    Rule(
        "dall-e-3 sizes",
        body("dall-e-3", size="1024x1792"),
        body("dall-e-3", size="1536x1024"),
        "size",
        "invalid_value",
    ),
    Rule("dall-e-3 no auto", body("dall-e-3"), body("dall-e-3", size="auto"), "size", "invalid_value"),
    Rule(
        "dall-e-2 sizes",
        body("dall-e-2", size="512x512"),
        body("dall-e-2", size="1024x1536"),
        "size",
        "invalid_value",
    ),
    Rule("gpt-image qualities", body(quality="high"), body(quality="hd"), "quality", "invalid_value"),
    Rule(
        "dall-e-3 qualities",
        body("dall-e-3", quality="hd"),
        body("dall-e-3", quality="high"),
        "quality",
        "invalid_value",
    ),
    Rule(
        "dall-e-2 qualities",
        body("dall-e-2", quality="standard"),
        body("dall-e-2", quality="hd"),
        "quality",
        "invalid_value",
    ),
    Rule(
        "background values", body(background="opaque"), body(background="blue"), "background", "invalid_value"
    ),
    Rule(
        "background is GPT-Image only",
        body(background="auto"),
        body("dall-e-3", background="opaque"),
        "background",
        "unsupported_parameter",
    ),
    Rule(
        "transparent needs png or webp",
        body(background="transparent", output_format="webp"),
        body(background="transparent", output_format="jpeg"),
        "background",
        "invalid_value",
    ),
    Rule(
        "output_format values",
        body(output_format="jpeg"),
        body(output_format="gif"),
        "output_format",
        "invalid_value",
    ),
    Rule(
        "output_format is GPT-Image only",
        body(output_format="png"),
        body("dall-e-2", output_format="png"),
        "output_format",
        "unsupported_parameter",
    ),
    Rule(
        "output_compression ≤ 100",
        body(output_format="jpeg", output_compression=100),
        body(output_format="jpeg", output_compression=101),
        "output_compression",
        "integer_above_max_value",
    ),
    Rule(
        "output_compression ≥ 0",
        body(output_format="webp", output_compression=0),
        body(output_format="webp", output_compression=-1),
        "output_compression",
        "integer_below_min_value",
    ),
    Rule(
        "output_compression below 100 needs jpeg or webp",
        body(output_format="png", output_compression=100),
        body(output_format="png", output_compression=50),
        "output_compression",
        "invalid_value",
    ),
    Rule(
        "output_compression is GPT-Image only",
        body(output_format="jpeg", output_compression=50),
        body("dall-e-3", output_compression=50),
        "output_compression",
        "unsupported_parameter",
    ),
    Rule("moderation values", body(moderation="low"), body(moderation="high"), "moderation", "invalid_value"),
    Rule(
        "stream is GPT-Image only",
        body("dall-e-3", stream=False),
        body("dall-e-3", stream=True),
        "stream",
        "unsupported_parameter",
    ),
    Rule("stream is a boolean", body(stream=False), body(stream="yes"), "stream", "invalid_type"),
    Rule(
        "partial_images ≤ 3",
        body(partial_images=3),
        body(partial_images=4),
        "partial_images",
        "integer_above_max_value",
    ),
    Rule(
        "partial_images ≥ 0",
        body(partial_images=0),
        body(partial_images=-1),
        "partial_images",
        "integer_below_min_value",
    ),
    Rule(
        "partial_images is GPT-Image only",
        body(partial_images=1),
        body("dall-e-2", partial_images=1),
        "partial_images",
        "unsupported_parameter",
    ),
    Rule(
        "response_format values",
        body(response_format="b64_json"),
        body(response_format="png"),
        "response_format",
        "invalid_value",
    ),
    Rule(
        "style only where the catalog allows it",
        body("dall-e-3", style="vivid"),
        body(style="vivid"),
        "style",
        "unsupported_parameter",
    ),
    Rule(
        "input_fidelity is not a dall-e field",
        body(input_fidelity="low"),
        body("dall-e-2", input_fidelity="low"),
        "input_fidelity",
        "unsupported_parameter",
    ),
]


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_rule(gateway: Gateway, upstream: FakeOpenAI, rule: Rule) -> None:
    key, _ = gateway.create_key(name="validation")
    headers = {"Authorization": f"Bearer {key}"}

    rejected = httpx.post(gateway.url + GEN, json=rule.rejected, headers=headers, timeout=30)
    assert rejected.status_code == rule.status, rejected.text
    error = rejected.json()["error"]
    assert error["type"] == rule.error_type
    assert error["param"] == rule.param
    assert error["code"] == rule.code
    assert error["message"]
    assert upstream.count() == 0, "a rejected request reached the upstream"

    accepted = httpx.post(gateway.url + GEN, json=rule.accepted, headers=headers, timeout=30)
    assert accepted.status_code == 200, accepted.text
    assert upstream.count() == 1


def test_unknown_model_lists_the_valid_ones(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = gateway.create_key(name="listing", models=["gpt-image-1", "dall-e-3"])
    response = httpx.post(
        gateway.url + GEN, json=body("gpt-image-7"), headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "gpt-image-1" in message and "dall-e-3" in message and "dall-e-2" not in message


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"", "invalid_json"),
        (b"null", "invalid_json"),
    ],
)
def test_malformed_bodies(gateway: Gateway, upstream: FakeOpenAI, content: bytes, code: str) -> None:
    key, _ = gateway.create_key(name="malformed")
    response = httpx.post(
        gateway.url + GEN,
        content=content,
        headers={"Authorization": f"Bearer {key}", "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": None,
        "code": code,
    }
    assert upstream.count() == 0


def test_oversized_json_body_is_413(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = gateway.create_key(name="big")
    huge = body(prompt="p" * (3 * 1024 * 1024))
    response = httpx.post(
        gateway.url + GEN, json=huge, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "payload_too_large")
    assert upstream.count() == 0


def test_unknown_route_and_method_are_openai_shaped(gateway: Gateway) -> None:
    missing = httpx.get(gateway.url + "/v1/nothing-here", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    wrong = httpx.get(gateway.url + GEN, timeout=30)
    assert wrong.status_code == 405
    assert set(wrong.json()["error"]) == {"message", "type", "param", "code"}
