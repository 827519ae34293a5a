"""Gemini image models and Imagen behind /v1/images/* (issue 19), driven by the official SDK through
the gateway to a fake Gemini API that speaks Google's wire format."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types import ImageGenCompletedEvent, ImagesResponse

from tests.conftest import Gateway, make_settings, start_gateway
from tests.contract.providers import ASYNC, GEMINI_FLASH_PRICES, decoded, poll_task, token_cost, uncharged
from tests.fakes import image_files as files
from tests.fakes.google_upstream import IMAGE_TOKENS, INPUT_IMAGE_TOKENS, PROMPT_TEXT_TOKENS, FakeGoogle, dims
from tests.fakes.provider_fake import Outcome

KEY = "google-key-0123456789abcdef"
FLASH = "gemini-2.5-flash-image"
PRO = "gemini-3-pro-image-preview"
IMAGEN = "imagen-4.0-generate-001"


def google_upstreams(fake: FakeGoogle, **extra: Any) -> list[dict[str, Any]]:
    """Two Gemini and two Imagen upstreams on the fake: a primary and a backup tier each."""
    common = {"base_url": fake.url + "/v1beta", "api_key": KEY, "timeout_s": 10, **extra}
    return [
        {"name": "gemini-a", "kind": "gemini", "models": [FLASH, PRO], "priority": 0, **common},
        {"name": "gemini-b", "kind": "gemini", "models": ["*"], "priority": 1, **common},
        {"name": "imagen-a", "kind": "imagen", "models": [IMAGEN], "priority": 0, **common},
        {"name": "imagen-b", "kind": "imagen", "models": [IMAGEN], "priority": 1, **common},
    ]


@pytest.fixture(scope="module")
def google_fake() -> Iterator[FakeGoogle]:
    with FakeGoogle(KEY) as fake:
        yield fake


@pytest.fixture
def google(google_fake: FakeGoogle) -> FakeGoogle:
    google_fake.clear()
    return google_fake


@pytest.fixture(scope="module")
def gw(google_fake: FakeGoogle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("google-gateway")
    gateway = start_gateway(make_settings(data_dir, google_upstreams(google_fake)), data_dir)
    yield gateway
    gateway.close()


def generate_calls(fake: FakeGoogle) -> list[dict[str, Any]]:
    return [r.json for r in fake.requests if r.path.endswith(":generateContent")]


# -- Gemini: generations, edits, streams, tasks ------------------------------------------------------


def test_gemini_generation_maps_size_n_and_format_and_reports_tokens(gw: Gateway, google: FakeGoogle) -> None:
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(
        model=FLASH,
        prompt="a lighthouse at dawn",
        size="1536x1024",
        n=2,
        output_format="jpeg",
        output_compression=60,
    )
    assert isinstance(result, ImagesResponse)
    calls = [r for r in google.requests if r.path.endswith(":generateContent")]
    # n=2 → two calls (one image each), each to the catalog's provider model id, with Google's key header.
    assert [r.path for r in calls] == [f"/v1beta/models/{FLASH}:generateContent"] * 2
    assert all(r.headers["x-goog-api-key"] == KEY and "authorization" not in r.headers for r in calls)
    body = calls[0].json
    assert body["contents"] == [{"role": "user", "parts": [{"text": "a lighthouse at dawn"}]}]
    assert body["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"]
    # 1536x1024 is 3:2 exactly; the 2.5 Flash model takes no imageSize.
    assert body["generationConfig"]["imageConfig"] == {"aspectRatio": "3:2"}
    width, height = dims("3:2")
    assert result.size == f"{width}x{height}" and result.output_format == "jpeg"
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        image = decoded(item.b64_json)
        # Gemini answers PNG: the gateway re-encoded it as the JPEG that was asked for.
        assert (image.format, image.size) == ("JPEG", (width, height))
    # Token usage, summed over both calls, split by modality as Gemini reports it.
    assert result.usage is not None
    assert result.usage.input_tokens == 2 * PROMPT_TEXT_TOKENS
    assert result.usage.output_tokens_details.image_tokens == 2 * IMAGE_TOKENS["1K"]  # type: ignore[union-attr]
    assert result.usage.output_tokens_details.text_tokens == 2 * 7  # type: ignore[union-attr]
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert row["status"] == "succeeded" and row["images"] == 2 and row["upstream"] == "gemini-a"
    assert (row["text_input_tokens"], row["image_output_tokens"], row["text_output_tokens"]) == (24, 2580, 14)
    assert not row["estimated"]
    assert int(row["cost_micros"]) == token_cost(GEMINI_FLASH_PRICES, row) == 77_443
    assert int(gw.key_row(key_id)["spent_micros"]) == int(row["cost_micros"])


def test_gemini_pro_maps_the_size_to_a_resolution_tier(gw: Gateway, google: FakeGoogle) -> None:
    result = gw.client().images.generate(model=PRO, prompt="a map", size="2048x2048")
    (body,) = generate_calls(google)
    assert body["generationConfig"]["imageConfig"] == {"aspectRatio": "1:1", "imageSize": "2K"}
    assert result.size == "2048x2048" and decoded(result.data[0].b64_json).size == (2048, 2048)  # type: ignore[index]


def test_gemini_edit_sends_the_images_inline(gw: Gateway, google: FakeGoogle) -> None:
    images = [files.png(64, 64), files.jpeg(48, 32)]
    result = gw.client().images.edit(
        model=FLASH,
        image=[("a.png", images[0], "image/png"), ("b.jpg", images[1], "image/jpeg")],
        prompt="put them together",
        size="1024x1024",
    )
    (body,) = generate_calls(google)
    parts = body["contents"][0]["parts"]
    assert parts[0] == {"text": "put them together"}
    assert [p["inlineData"]["mimeType"] for p in parts[1:]] == ["image/png", "image/jpeg"]
    assert [base64.b64decode(p["inlineData"]["data"]) for p in parts[1:]] == images
    assert decoded(result.data[0].b64_json).size == (1024, 1024)  # type: ignore[index]
    assert (
        result.usage is not None and result.usage.input_tokens_details.image_tokens == 2 * INPUT_IMAGE_TOKENS
    )  # type: ignore[union-attr]


def test_gemini_refuses_a_mask_before_calling(gw: Gateway, google: FakeGoogle) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client().images.edit(
            model=FLASH,
            image=("a.png", files.png(64, 64), "image/png"),
            mask=("m.png", files.mask(64, 64), "image/png"),
            prompt="x",
        )
    assert caught.value.body["param"] == "mask"  # type: ignore[index]
    assert google.requests == []


def test_gemini_stream_answers_completed_events(gw: Gateway, google: FakeGoogle) -> None:
    events = list(gw.client().images.generate(model=FLASH, prompt="a fox", size="1024x1024", stream=True))
    assert [type(e) for e in events] == [ImageGenCompletedEvent]
    done = events[0]
    assert isinstance(done, ImageGenCompletedEvent)
    assert decoded(done.b64_json).size == (1024, 1024)
    assert done.usage.output_tokens == IMAGE_TOKENS["1K"] + 7
    assert len(generate_calls(google)) == 1


def test_gemini_async_task(gw: Gateway, google: FakeGoogle) -> None:
    client = gw.client()
    raw = client.images.with_raw_response.generate(
        model=FLASH, prompt="later", size="1024x1536", extra_query=ASYNC
    )
    assert raw.status_code == 202
    task = poll_task(client, raw.http_response.json()["id"])
    assert task["status"] == "succeeded", task
    assert task["result"]["size"] == "{}x{}".format(*dims("2:3"))
    assert decoded(task["result"]["data"][0]["b64_json"]).size == dims("2:3")
    assert task["result"]["usage"]["output_tokens_details"]["image_tokens"] == IMAGE_TOKENS["1K"]


# -- refusals before anything is sent ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"style": "vivid"}, "style", "unsupported_parameter"),
        ({"user": "u-1"}, "user", "unsupported_parameter"),
        ({"negative_prompt": "cats"}, "negative_prompt", "unsupported_parameter"),
        ({"background": "transparent", "output_format": "png"}, "background", "invalid_value"),
        ({"quality": "high"}, "quality", "invalid_value"),
        ({"partial_images": 2, "stream": True}, "partial_images", "integer_above_max_value"),
    ],
)
def test_fields_that_do_not_map_are_refused(
    gw: Gateway, google: FakeGoogle, fields: dict[str, Any], param: str, code: str
) -> None:
    key, _ = gw.create_key()
    answer = httpx.post(
        gw.url + "/v1/images/generations",
        json={"model": FLASH, "prompt": "x", **fields},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 400, answer.text
    assert (answer.json()["error"]["param"], answer.json()["error"]["code"]) == (param, code)
    assert google.requests == []


# -- moderation, errors, failover --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "stage"),
    [
        (Outcome("block", detail="SAFETY"), "input"),
        (Outcome("block", detail="PROHIBITED_CONTENT"), "input"),
        (Outcome("finish", detail="SAFETY"), "output"),
        (Outcome("finish", detail="IMAGE_SAFETY"), "output"),
        (Outcome("finish", detail="PROHIBITED_CONTENT"), "output"),
    ],
    ids=["block-safety", "block-prohibited", "finish-safety", "finish-image-safety", "finish-prohibited"],
)
def test_gemini_safety_refusals_are_moderation_blocked_and_free(
    gw: Gateway, google: FakeGoogle, outcome: Outcome, stage: str
) -> None:
    google.enqueue(outcome)
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=FLASH, prompt="something bad")
    error = caught.value
    assert (error.type, error.code) == ("image_generation_user_error", "moderation_blocked")
    assert error.body["moderation_details"]["moderation_stage"] == stage  # type: ignore[index]
    assert len(generate_calls(google)) == 1  # not retried, not failed over
    uncharged(gw, key_id)


def test_imagen_all_filtered_is_moderation_blocked_and_free(gw: Gateway, google: FakeGoogle) -> None:
    google.enqueue(Outcome("empty"))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=IMAGEN, prompt="something bad", n=2)
    assert caught.value.code == "moderation_blocked"
    assert caught.value.body["moderation_details"]["moderation_stage"] == "output"  # type: ignore[index]
    uncharged(gw, key_id)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_429_and_5xx_fail_over_to_the_other_upstream(gw: Gateway, google: FakeGoogle, status: int) -> None:
    error = {
        "error": {"code": status, "message": "Resource has been exhausted.", "status": "RESOURCE_EXHAUSTED"}
    }
    google.enqueue(Outcome("status", status=status, body=orjson.dumps(error), headers={"retry-after": "1"}))
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=FLASH, prompt="x", size="1024x1024")
    assert decoded(result.data[0].b64_json).size == (1024, 1024)  # type: ignore[index]
    assert len(generate_calls(google)) == 2
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert row["status"] == "succeeded" and row["upstream"] == "gemini-b"


def test_imagen_5xx_fails_over(gw: Gateway, google: FakeGoogle) -> None:
    google.enqueue(Outcome("status", status=500, body=b'{"error": {"code": 500, "message": "Internal"}}'))
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=IMAGEN, prompt="x", n=2)
    assert result.data is not None and len(result.data) == 2
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["upstream"], row["images"], int(row["cost_micros"])) == ("imagen-b", 2, 2 * 40_000)


def test_429_with_retry_after_on_the_only_upstream_is_waited_for(
    gateway_with: Callable[..., Gateway], google: FakeGoogle
) -> None:
    upstream = {
        "name": "only",
        "kind": "gemini",
        "base_url": google.url + "/v1beta",
        "api_key": KEY,
        "models": ["*"],
    }
    gw = gateway_with(upstream)
    error = {"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}}
    google.enqueue(Outcome("status", status=429, body=orjson.dumps(error), headers={"retry-after": "1"}))
    result = gw.client().images.generate(model=FLASH, prompt="x", size="1024x1024")
    assert result.data is not None and len(generate_calls(google)) == 2


def test_malformed_answers_are_502_and_free(gateway_with: Callable[..., Gateway], google: FakeGoogle) -> None:
    # A gateway of its own: the failures open the breakers of its upstreams.
    gw = gateway_with(*google_upstreams(google))
    google.enqueue(Outcome("malformed", times=20))
    key, key_id = gw.create_key()
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client(key).images.generate(model=FLASH, prompt="x")
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_error")
    assert len(generate_calls(google)) >= 2  # every candidate was tried
    uncharged(gw, key_id)


def test_an_answer_without_image_is_502(gateway_with: Callable[..., Gateway], google: FakeGoogle) -> None:
    gw = gateway_with(*google_upstreams(google))
    google.enqueue(Outcome("no_image", times=20))
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model=FLASH, prompt="x")
    assert caught.value.status_code == 502


def test_a_refused_key_is_502_and_nothing_leaks(
    gateway_with: Callable[..., Gateway], google: FakeGoogle
) -> None:
    wrong = "AIzaSyWRONG-0123456789abcdefghij"
    gw = gateway_with({"name": "g", "kind": "gemini", "base_url": google.url + "/v1beta", "api_key": wrong})
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model=FLASH, prompt="x")
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_error")
    assert google.requests[-1].headers["x-goog-api-key"] == wrong
    for secret in (wrong, google.url, "127.0.0.1", "v1beta"):
        assert secret not in caught.value.response.text


# -- Imagen ------------------------------------------------------------------------------------------


def test_imagen_maps_n_to_sample_count_and_size_to_ratio_and_tier(gw: Gateway, google: FakeGoogle) -> None:
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(
        model=IMAGEN,
        prompt="a kite",
        n=3,
        size="1024x1536",
        quality="standard",
        output_format="webp",
        extra_body={"person_generation": "dont_allow"},
    )
    (call,) = [r for r in google.requests if r.path.endswith(":predict")]
    assert call.path == f"/v1beta/models/{IMAGEN}:predict" and call.headers["x-goog-api-key"] == KEY
    assert call.json == {
        "instances": [{"prompt": "a kite"}],
        "parameters": {
            "sampleCount": 3,
            "includeRaiReason": True,
            "aspectRatio": "3:4",
            "imageSize": "1K",
            "personGeneration": "dont_allow",
        },
    }
    assert result.data is not None and len(result.data) == 3
    assert {decoded(d.b64_json).format for d in result.data} == {"WEBP"}
    assert result.size == "{}x{}".format(*dims("3:4")) and result.usage is None
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["images"], int(row["cost_micros"])) == (3, 3 * 40_000)


def test_imagen_hd_quality_asks_for_2k(gw: Gateway, google: FakeGoogle) -> None:
    gw.client().images.generate(model=IMAGEN, prompt="x", quality="hd", size="1024x1024")
    (call,) = [r for r in google.requests if r.path.endswith(":predict")]
    assert call.json["parameters"]["imageSize"] == "2K"


def test_imagen_partly_filtered_returns_and_charges_the_rest(gw: Gateway, google: FakeGoogle) -> None:
    google.enqueue(Outcome("filtered", detail=1))
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=IMAGEN, prompt="x", n=2)
    assert result.data is not None and len(result.data) == 1
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["images"], int(row["cost_micros"])) == (1, 40_000)


def test_imagen_has_no_edits(gw: Gateway, google: FakeGoogle) -> None:
    with pytest.raises(openai.BadRequestError):
        gw.client().images.edit(model=IMAGEN, image=("a.png", files.png(64, 64), "image/png"), prompt="x")
    assert google.requests == []


def test_usage_report_groups_provider_models_like_openai(gw: Gateway, google: FakeGoogle) -> None:
    key, key_id = gw.create_key()
    client = gw.client(key)
    client.images.generate(model=FLASH, prompt="x", size="1024x1024")
    client.images.generate(model=IMAGEN, prompt="x", n=2)
    report = gw.admin("GET", "/admin/usage", params={"group_by": "model", "key_id": key_id}).json()
    groups = {g["model"]: g for g in report["data"]}
    assert set(groups) == {FLASH, IMAGEN}
    assert groups[IMAGEN]["images"] == 2 and groups[IMAGEN]["cost_micros"] == 80_000
    assert groups[IMAGEN]["image_output_tokens"] == 0
    assert groups[FLASH]["images"] == 1 and groups[FLASH]["image_output_tokens"] == IMAGE_TOKENS["1K"]
    rows = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert report["totals"]["cost_micros"] == sum(int(r["cost_micros"]) for r in rows)
