"""Stability AI v2beta behind /v1/images/* (issue 19): the official SDK through the gateway to a fake
Stability API that speaks its multipart wire format."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest
from openai.types import ImageGenCompletedEvent
from PIL import Image

from tests.conftest import Gateway, make_settings, start_gateway
from tests.contract.providers import ASYNC, decoded, poll_task, uncharged
from tests.fakes import image_files as files
from tests.fakes.provider_fake import Outcome
from tests.fakes.stability_upstream import SIZES, FakeStability

KEY = "sk-stability-0123456789abcdef"
CORE = "stable-image-core"
ULTRA = "stable-image-ultra"
SD35 = "sd3.5-large"


def stability_upstream(fake: FakeStability, name: str = "stability-a", **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "stability", "base_url": fake.url, "api_key": KEY, "timeout_s": 10, **extra}


@pytest.fixture(scope="module")
def stability_fake() -> Iterator[FakeStability]:
    with FakeStability(KEY) as fake:
        yield fake


@pytest.fixture
def stability(stability_fake: FakeStability) -> FakeStability:
    stability_fake.clear()
    return stability_fake


@pytest.fixture(scope="module")
def gw(stability_fake: FakeStability, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("stability-gateway")
    upstreams = [
        stability_upstream(stability_fake),
        stability_upstream(stability_fake, "stability-b", priority=1),
    ]
    gateway = start_gateway(make_settings(data_dir, upstreams), data_dir)
    yield gateway
    gateway.close()


def test_core_generation_is_multipart_with_ratio_and_format(gw: Gateway, stability: FakeStability) -> None:
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(
        model=CORE,
        prompt="a castle",
        size="1792x1024",
        n=2,
        output_format="webp",
        extra_body={"negative_prompt": "fog", "seed": 9},
    )
    calls = stability.requests
    assert [r.path for r in calls] == ["/v2beta/stable-image/generate/core"] * 2
    call = calls[0]
    assert call.headers["authorization"] == f"Bearer {KEY}" and call.headers["accept"] == "application/json"
    assert call.headers["content-type"].startswith("multipart/form-data")
    assert call.form == {
        "prompt": ["a castle"],
        "output_format": ["webp"],
        "aspect_ratio": ["16:9"],
        "negative_prompt": ["fog"],
        "seed": ["9"],
    }
    assert result.data is not None and len(result.data) == 2
    assert {decoded(d.b64_json).format for d in result.data} == {"WEBP"}
    assert result.size == "{}x{}".format(*SIZES["16:9"])
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    # 3 credits at 0.01 per image.
    assert (row["images"], int(row["cost_micros"])) == (2, 2 * 30_000)


def test_sd35_goes_to_the_sd3_endpoint_with_its_model(gw: Gateway, stability: FakeStability) -> None:
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=SD35, prompt="x", size="1024x1536", output_format="webp")
    (call,) = stability.requests
    assert call.path == "/v2beta/stable-image/generate/sd3"
    assert call.form["model"] == ["sd3.5-large"] and call.form["aspect_ratio"] == ["2:3"]
    # SD3 makes png or jpeg: asked webp, it is asked png and re-encoded.
    assert call.form["output_format"] == ["png"]
    assert decoded(result.data[0].b64_json).format == "WEBP"  # type: ignore[index]
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert int(row["cost_micros"]) == 65_000


def test_edit_with_a_mask_goes_to_inpaint_with_the_mask_inverted(
    gw: Gateway, stability: FakeStability
) -> None:
    image, mask = files.png(64, 64), files.mask(64, 64)
    result = gw.client().images.edit(
        model=ULTRA, image=("a.png", image, "image/png"), mask=("m.png", mask, "image/png"), prompt="a door"
    )
    (call,) = stability.requests
    assert call.path == "/v2beta/stable-image/edit/inpaint"
    assert call.files["image"][0][0] == image
    sent = Image.open(io.BytesIO(call.files["mask"][0][0]))
    original = Image.open(io.BytesIO(mask)).convert("RGBA").getchannel("A")
    # OpenAI's transparent (edit) pixels are Stability's white ones, and opaque ones black.
    assert sent.mode == "L" and sent.size == original.size
    assert sent.tobytes() == bytes(255 - a for a in original.tobytes())
    assert call.form["prompt"] == ["a door"] and "aspect_ratio" not in call.form
    assert decoded(result.data[0].b64_json).size == (64, 64)  # type: ignore[index]


def test_edit_without_mask_uses_the_image_alpha(gw: Gateway, stability: FakeStability) -> None:
    with_alpha = files.png(64, 64, mode="RGBA")
    gw.client().images.edit(model=CORE, image=("a.png", with_alpha, "image/png"), prompt="x")
    (call,) = stability.requests
    assert call.path == "/v2beta/stable-image/edit/inpaint" and "mask" not in call.files


def test_edit_without_mask_or_alpha_is_refused(gw: Gateway, stability: FakeStability) -> None:
    """Refused by validation, from the image's header, before anything is reserved or routed: no
    ledger row at all (a refusal by the adapter used to leave a failed, free row behind)."""
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.edit(model=CORE, image=("a.jpg", files.jpeg(64, 64), "image/jpeg"), prompt="x")
    assert caught.value.body["param"] == "mask"  # type: ignore[index]
    assert caught.value.body["code"] == "invalid_value"  # type: ignore[index]
    assert stability.requests == []
    assert [r for r in gw.ledger() if r["key_id"] == key_id] == []
    uncharged(gw, key_id)


def test_content_filtered_is_moderation_blocked_and_free(gw: Gateway, stability: FakeStability) -> None:
    stability.enqueue(Outcome("content_filtered"))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=CORE, prompt="x")
    assert caught.value.code == "moderation_blocked"
    assert caught.value.body["moderation_details"]["moderation_stage"] == "output"  # type: ignore[index]
    assert len(stability.requests) == 1
    uncharged(gw, key_id)


def test_content_moderation_403_is_moderation_blocked_not_a_key_problem(
    gw: Gateway, stability: FakeStability
) -> None:
    stability.enqueue(Outcome("content_moderation"))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=CORE, prompt="x")
    assert caught.value.code == "moderation_blocked"
    assert caught.value.body["moderation_details"]["moderation_stage"] == "input"  # type: ignore[index]
    assert len(stability.requests) == 1
    uncharged(gw, key_id)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_429_and_5xx_fail_over(gw: Gateway, stability: FakeStability, status: int) -> None:
    body = orjson.dumps({"id": "e", "name": "rate_limit_exceeded", "errors": ["slow down"]})
    stability.enqueue(Outcome("status", status=status, body=body, headers={"retry-after": "1"}))
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=CORE, prompt="x", size="1024x1024")
    assert decoded(result.data[0].b64_json).size == (1024, 1024)  # type: ignore[index]
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert row["upstream"] == "stability-b" and len(stability.requests) == 2


def test_malformed_answer_is_502(gateway_with: Callable[..., Gateway], stability: FakeStability) -> None:
    gw = gateway_with(stability_upstream(stability))
    stability.enqueue(Outcome("malformed", times=10))
    key, key_id = gw.create_key()
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client(key).images.generate(model=CORE, prompt="x")
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_error")
    uncharged(gw, key_id)


def test_a_bad_request_keeps_its_status_and_is_scrubbed(gw: Gateway, stability: FakeStability) -> None:
    message = f"prompt: too long (see {stability.url}/docs) key {KEY}"
    body = orjson.dumps({"id": "e", "name": "bad_request", "errors": [message]})
    stability.enqueue(Outcome("status", status=400, body=body))
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client().images.generate(model=CORE, prompt="x")
    assert caught.value.code == "invalid_value"
    assert KEY not in caught.value.response.text and stability.url not in caught.value.response.text
    assert len(stability.requests) == 1


def test_stream_and_async(gw: Gateway, stability: FakeStability) -> None:
    client = gw.client()
    events = list(client.images.generate(model=CORE, prompt="x", size="1024x1024", stream=True))
    assert [type(e) for e in events] == [ImageGenCompletedEvent]
    raw = client.images.with_raw_response.generate(model=ULTRA, prompt="x", extra_query=ASYNC)
    task = poll_task(client, raw.http_response.json()["id"])
    assert task["status"] == "succeeded" and task["result"]["size"] == "1024x1024"
    assert stability.requests[-1].path == "/v2beta/stable-image/generate/ultra"
