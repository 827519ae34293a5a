"""The official `openai` SDK against a gateway on loopback, served by the fake upstream or `local`."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
import pytest
from openai.types import ImagesResponse
from PIL import Image

from tests.conftest import ALL_MODELS, Gateway
from tests.fakes.openai_upstream import FakeOpenAI

SIZES = {
    "gpt-image-1.5": "1536x1024",
    "gpt-image-1": "1024x1536",
    "gpt-image-1-mini": "1024x1024",
    "dall-e-3": "1792x1024",
    "dall-e-2": "256x256",
}


def decode(b64: str | None) -> Image.Image:
    assert b64, "expected base64 image data"
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def fetch(url: str | None) -> Image.Image:
    """A `response_format=url` image, downloaded from the gateway's signed link."""
    assert url, "expected an image URL"
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


@pytest.mark.parametrize("model", ALL_MODELS)
def test_each_model_through_the_fake_upstream(gateway: Gateway, upstream: FakeOpenAI, model: str) -> None:
    client = gateway.client()
    result = client.images.generate(model=model, prompt="a lighthouse at dawn", size=SIZES[model])  # type: ignore[arg-type]

    assert isinstance(result, ImagesResponse)
    assert result.data and len(result.data) == 1
    # dall-e answers `url` by default, as OpenAI's did; GPT image models base64.
    if model.startswith("dall-e"):
        assert result.data[0].b64_json is None
        image = fetch(result.data[0].url)
    else:
        assert result.data[0].url is None
        image = decode(result.data[0].b64_json)
    assert f"{image.width}x{image.height}" == SIZES[model]
    assert image.format == "PNG"

    sent = upstream.last.json
    assert sent is not None and sent["prompt"] == "a lighthouse at dawn"
    expected_name = "gpt-image-1-mini-2025" if model == "gpt-image-1-mini" else model
    assert sent["model"] == expected_name
    # GPT-Image models reject response_format; dall-e is asked for base64 so the gateway can relay it.
    if model.startswith("dall-e"):
        assert sent["response_format"] == "b64_json"
        assert "moderation" not in sent
    else:
        assert "response_format" not in sent


@pytest.mark.parametrize("model", ALL_MODELS)
def test_each_model_through_the_local_backend(local_gateway: Gateway, model: str) -> None:
    client = local_gateway.client()
    result = client.images.generate(model=model, prompt="a red fox in snow", size=SIZES[model])  # type: ignore[arg-type]
    assert result.data
    image = fetch(result.data[0].url) if model.startswith("dall-e") else decode(result.data[0].b64_json)
    assert f"{image.width}x{image.height}" == SIZES[model]
    assert image.format == "PNG"
    if model.startswith("gpt-image"):
        assert result.usage is not None and result.usage.output_tokens > 0
        assert result.size == SIZES[model]
    else:
        assert result.usage is None


@pytest.mark.parametrize(
    ("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_local_formats_and_n(local_gateway: Gateway, output_format: str, pil_format: str) -> None:
    client = local_gateway.client()
    kwargs: dict[str, Any] = {}
    if output_format != "png":
        kwargs["output_compression"] = 60
    result = client.images.generate(
        model="gpt-image-1",
        prompt="three teacups",
        n=2,
        size="1024x1024",
        quality="low",
        output_format=output_format,  # type: ignore[arg-type]
        **kwargs,
    )
    assert result.data is not None and len(result.data) == 2
    images = [decode(d.b64_json) for d in result.data]
    assert all(img.format == pil_format and img.size == (1024, 1024) for img in images)
    assert result.data[0].b64_json != result.data[1].b64_json
    assert result.output_format == output_format


@pytest.mark.parametrize("output_format", ["png", "webp"])
def test_local_transparent_background_has_real_alpha(local_gateway: Gateway, output_format: str) -> None:
    client = local_gateway.client()
    result = client.images.generate(
        model="gpt-image-1-mini",
        prompt="a sticker of a cat",
        background="transparent",
        output_format=output_format,  # type: ignore[arg-type]
        size="1024x1024",
    )
    image = decode(result.data[0].b64_json if result.data else None)
    assert image.mode in ("RGBA", "LA")
    alpha = image.getchannel("A")
    assert alpha.getpixel((0, 0)) == 0
    assert alpha.getextrema() == (0, 255)
    assert result.background == "transparent"


def test_local_is_deterministic(local_gateway: Gateway) -> None:
    client = local_gateway.client()
    first = client.images.generate(model="gpt-image-1", prompt="same prompt", size="1024x1024")
    second = client.images.generate(model="gpt-image-1", prompt="same prompt", size="1024x1024")
    other = client.images.generate(model="gpt-image-1", prompt="other prompt", size="1024x1024")
    assert first.data and second.data and other.data
    assert first.data[0].b64_json == second.data[0].b64_json
    assert first.data[0].b64_json != other.data[0].b64_json


def test_unknown_fields_are_forwarded_unchanged(gateway: Gateway, upstream: FakeOpenAI) -> None:
    client = gateway.client()
    client.images.generate(
        model="gpt-image-1",
        prompt="a boat",
        safety_identifier="user-1234",
        user="end-user-7",
        extra_body={"complexity": "high", "future_knob": {"nested": [1, 2, 3]}},
    )
    sent = upstream.last.json
    assert sent is not None
    assert sent["safety_identifier"] == "user-1234"
    assert sent["user"] == "end-user-7"
    assert sent["complexity"] == "high"
    assert sent["future_knob"] == {"nested": [1, 2, 3]}


def test_gpt_image_fields_and_upstream_auth_are_forwarded(gateway: Gateway, upstream: FakeOpenAI) -> None:
    client = gateway.client()
    client.images.generate(
        model="gpt-image-1.5",
        prompt="a glass bottle",
        quality="high",
        background="transparent",
        output_format="webp",
        output_compression=80,
        moderation="low",
        n=2,
    )
    recorded = upstream.last
    assert recorded.headers["authorization"] == "Bearer sk-upstream-test"
    assert recorded.json is not None
    for name, value in {
        "quality": "high",
        "background": "transparent",
        "output_format": "webp",
        "output_compression": 80,
        "moderation": "low",
        "n": 2,
    }.items():
        assert recorded.json[name] == value


def test_ledger_row_and_cost_header_match_the_upstream_usage(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.usage = {
        "input_tokens": 1234,
        "input_tokens_details": {"text_tokens": 1000, "image_tokens": 234},
        "output_tokens": 4173,
        "output_tokens_details": {"text_tokens": 13, "image_tokens": 4160},
        "total_tokens": 5407,
    }
    key, key_id = gateway.create_key(name="metered")
    client = gateway.client(key)
    raw = client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="metered", quality="high")
    result = raw.parse()
    assert result.usage is not None and result.usage.total_tokens == 5407

    rows = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert len(rows) == 1
    row = rows[0]
    assert (row["text_input_tokens"], row["image_input_tokens"]) == (1000, 234)
    assert (row["text_output_tokens"], row["image_output_tokens"]) == (13, 4160)
    # gpt-image-1.5, PTC per 1M tokens: text in 5, image in 8, text out 10, image out 32.
    # Micro-units: tokens × price / 1M × 1M = tokens × price.
    expected = 1000 * 5 + 234 * 8 + 13 * 10 + 4160 * 32
    assert expected == 140_122
    assert row["cost_micros"] == expected
    assert row["status"] == "succeeded"
    assert row["upstream"] == "fake" and row["model"] == "gpt-image-1.5"
    assert row["endpoint"] == "generations" and row["images"] == 1
    assert row["estimated"] == 0
    assert row["request_id"] == raw.headers["x-request-id"]
    assert raw.headers["x-gateway-cost"] == "0.140122"


def test_dalle_is_charged_per_image(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gateway.create_key(name="dalle")
    raw = gateway.client(key).images.with_raw_response.generate(
        model="dall-e-3", prompt="a city", quality="hd", size="1792x1024"
    )
    assert raw.headers["x-gateway-cost"] == "0.120000"
    (row,) = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert row["cost_micros"] == 120_000 and row["images"] == 1


def test_missing_usage_is_estimated_from_the_catalog(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.usage = None
    key, key_id = gateway.create_key(name="estimated")
    gateway.client(key).images.generate(
        model="gpt-image-1", prompt="abcdefgh", quality="low", size="1024x1536"
    )
    (row,) = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert row["estimated"] == 1
    assert row["image_output_tokens"] == 408 and row["text_input_tokens"] == 2
    assert row["cost_micros"] == (2 * 5 + 408 * 40)


def test_upstream_client_error_is_relayed_without_leaking(gateway: Gateway, upstream: FakeOpenAI) -> None:
    from tests.fakes.openai_upstream import Fault

    upstream.enqueue_fault(
        Fault.status(
            400,
            f"Your request was rejected by {upstream.base_url} using key sk-upstream-test",
            type="invalid_request_error",
            code="content_policy_violation",
            param="prompt",
        )
    )
    key, key_id = gateway.create_key(name="rejected")
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client(key).images.generate(model="gpt-image-1", prompt="something")
    error = caught.value
    assert error.status_code == 400
    assert error.code == "content_policy_violation" and error.param == "prompt"
    text = error.response.text
    assert "sk-upstream-test" not in text and upstream.base_url not in text and "127.0.0.1" not in text
    (row,) = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert row["status"] == "failed" and row["cost_micros"] == 0
