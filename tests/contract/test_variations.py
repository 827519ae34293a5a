"""`POST /v1/images/variations`: dall-e-2's legacy endpoint.

OpenAI retired it with dall-e-2 (2026-05-12): where no upstream still serves dall-e-2 the answer
is OpenAI's 404 `model_not_found` naming the retirement, before anything is reserved; where one
does (a compatible server, or `local`), the request is forwarded to it and billed per image.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import Gateway, fake_upstream_config
from tests.fakes.image_files import png
from tests.fakes.openai_upstream import FakeOpenAI

SOURCE = png(256, 256)
# The SDK marks `images.create_variation` deprecated (the endpoint is retired at OpenAI).
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")


def test_variations_are_forwarded_to_an_upstream_that_serves_dall_e_2(
    gateway: Gateway, upstream: FakeOpenAI
) -> None:
    key, key_id = gateway.create_key(name="variations")
    result = gateway.client(key).images.create_variation(
        image=("photo.png", SOURCE, "image/png"), n=2, size="256x256", user="end-user-1"
    )
    assert result.data and len(result.data) == 2
    for item in result.data:  # dall-e's default answer: links to the images the gateway stored
        assert item.url and item.b64_json is None
        downloaded = httpx.get(item.url, timeout=30)
        assert downloaded.status_code == 200
        assert Image.open(io.BytesIO(downloaded.content)).size == (256, 256)
    recorded = upstream.last
    assert recorded.path == "/v1/images/variations"
    assert [f.data for f in recorded.files_for("image")] == [SOURCE]
    assert recorded.form["model"] == ["dall-e-2"] and recorded.form["n"] == ["2"]
    assert recorded.form["user"] == ["end-user-1"]
    assert recorded.form["response_format"] == ["b64_json"]
    (row,) = [r for r in gateway.ledger() if r["endpoint"] == "variations"]
    assert row["model"] == "dall-e-2" and row["images"] == 2
    assert row["cost_micros"] == 2 * 16_000  # 2 x $0.016 (256x256)
    assert gateway.key_row(key_id)["spent_micros"] == row["cost_micros"]


def test_variations_name_the_retirement_where_nothing_serves_dall_e_2(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    as_openai = fake_upstream_config(upstream, models=["*"])
    as_openai.pop("follows_retirements")  # OpenAI itself: follows its retirements
    gw = gateway_with(as_openai)
    key, key_id = gw.create_key(name="variations-retired")
    with pytest.raises(openai.NotFoundError) as raised:
        gw.client(key).images.create_variation(image=("p.png", SOURCE, "image/png"))
    error = raised.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "model",
        "model_not_found",
    )
    assert "dall-e-2" in error["message"] and "2026-05-12" in error["message"]
    assert "/v1/images/edits" in error["message"]
    assert upstream.count() == 0
    assert gw.ledger() == [] and gw.key_row(key_id)["reserved_micros"] == 0


def test_variations_only_for_dall_e_2(gateway: Gateway, upstream: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client().images.create_variation(image=("p.png", SOURCE, "image/png"), model="gpt-image-1.5")
    assert raised.value.code == "invalid_value" and raised.value.param == "model"
    with pytest.raises(openai.BadRequestError) as non_square:
        gateway.client().images.create_variation(image=("p.png", png(256, 128), "image/png"))
    assert non_square.value.param == "image"
    assert upstream.count() == 0


def test_variations_through_local(local_gateway: Gateway) -> None:
    result = local_gateway.client().images.create_variation(
        image=("p.png", SOURCE, "image/png"), size="512x512", response_format="b64_json"
    )
    assert result.data and result.data[0].b64_json
