"""Issue 28's catalog gaps, against the BFL and Google fakes: FLUX.2 on the BFL adapter, Kontext
labelled legacy, Gemini 3 Pro's 14-image edits, provider-specific values checked from the catalog
before any call, a provider's 4xx in OpenAI's shape, and Gemini's NO_IMAGE neither retried nor
charged."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import Gateway, make_settings, start_gateway
from tests.contract.providers import decoded, uncharged
from tests.contract.test_provider_bfl import KEY as BFL_KEY
from tests.contract.test_provider_bfl import flux_upstream
from tests.contract.test_provider_google import KEY as GOOGLE_KEY
from tests.contract.test_provider_google import generate_calls, google_upstreams
from tests.fakes import image_files as files
from tests.fakes.bfl_upstream import FakeBFL
from tests.fakes.google_upstream import FakeGoogle
from tests.fakes.provider_fake import Outcome

FLUX2_PRO, FLUX2_FLEX, FLUX1 = "flux-2-pro", "flux-2-flex", "flux-pro-1.1"
GEMINI_PRO, IMAGEN = "gemini-3-pro-image-preview", "imagen-4.0-generate-001"


@pytest.fixture(scope="module")
def bfl_fake() -> Iterator[FakeBFL]:
    with FakeBFL(BFL_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def google_fake() -> Iterator[FakeGoogle]:
    with FakeGoogle(GOOGLE_KEY) as fake:
        yield fake


@pytest.fixture
def bfl(bfl_fake: FakeBFL) -> FakeBFL:
    bfl_fake.clear()
    return bfl_fake


@pytest.fixture
def google(google_fake: FakeGoogle) -> FakeGoogle:
    google_fake.clear()
    return google_fake


@pytest.fixture(scope="module")
def gw(
    bfl_fake: FakeBFL, google_fake: FakeGoogle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("gaps-gateway")
    upstreams = [
        flux_upstream(bfl_fake),
        flux_upstream(bfl_fake, "flux-b", priority=1),
        *google_upstreams(google_fake),
    ]
    gateway = start_gateway(make_settings(data_dir, upstreams), data_dir)
    yield gateway
    gateway.close()


def post(gw: Gateway, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


# -- FLUX.2 ------------------------------------------------------------------------------------------


def test_flux2_pro_generates_at_4_megapixels_priced_by_size(gw: Gateway, bfl: FakeBFL) -> None:
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(
        model=FLUX2_PRO, prompt="a glass harbour", size="2048x2048", extra_body={"safety_tolerance": 5}
    )
    (submitted,) = bfl.submissions
    assert submitted.path == f"/v1/{FLUX2_PRO}"
    assert submitted.json == {
        "prompt": "a glass harbour",
        "output_format": "png",
        "width": 2048,
        "height": 2048,
        "safety_tolerance": 5,
    }
    assert decoded(result.data[0].b64_json).size == (2048, 2048)  # type: ignore[index]
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["status"], row["images"], int(row["cost_micros"])) == ("succeeded", 1, 75_000)


def test_flux2_flex_takes_steps_and_guidance_and_rounds_to_16(gw: Gateway, bfl: FakeBFL) -> None:
    key, key_id = gw.create_key()
    gw.client(key).images.generate(
        model=FLUX2_FLEX,
        prompt="a poster",
        size="1000x1500",
        n=2,
        extra_body={"steps": 28, "guidance": 4.5, "prompt_upsampling": False},
    )
    assert len(bfl.submissions) == 2
    body = bfl.submissions[0].json
    assert (body["width"], body["height"]) == (992, 1504)  # multiples of 16, the ratio kept
    assert (body["steps"], body["guidance"], body["prompt_upsampling"]) == (28, 4.5, False)
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    # 1000x1500 is not on the table: the table's dearest (4 MP) per image.
    assert (row["images"], int(row["cost_micros"])) == (2, 2 * 240_000)


def test_flux2_edit_takes_eight_images_and_keeps_the_first_ones_size(gw: Gateway, bfl: FakeBFL) -> None:
    images = [files.png(96, 64)] + [files.jpeg(32, 32) for _ in range(7)]
    result = gw.client().images.edit(
        model=FLUX2_PRO,
        image=[(f"{i}.img", data, "image/png" if i == 0 else "image/jpeg") for i, data in enumerate(images)],
        prompt="combine them",
        extra_body={"safety_tolerance": "2"},  # multipart: text, sent to BFL as the integer
    )
    (submitted,) = bfl.submissions
    names = ["input_image"] + [f"input_image_{i}" for i in range(2, 9)]
    assert [base64.b64decode(submitted.json[n]) for n in names] == images
    assert "width" not in submitted.json and submitted.json["safety_tolerance"] == 2
    assert decoded(result.data[0].b64_json).size == (96, 64)  # type: ignore[index]


def test_flux2_edit_refuses_a_ninth_image_before_any_call(gw: Gateway, bfl: FakeBFL) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client().images.edit(
            model=FLUX2_PRO,
            image=[(f"{i}.png", files.png(16, 16), "image/png") for i in range(9)],
            prompt="x",
        )
    assert caught.value.code == "too_many_images" and bfl.requests == []


def test_kontext_is_listed_as_legacy_with_its_replacement(gw: Gateway) -> None:
    key, _ = gw.create_key()
    listing = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    models = {m["id"]: m for m in listing.json()["data"]}
    assert (models["flux-kontext-pro"]["state"], models["flux-kontext-pro"]["replacement"]) == (
        "legacy",
        FLUX2_PRO,
    )
    assert models["flux-kontext-max"]["state"] == "legacy"
    assert models[FLUX2_PRO]["state"] == "active"


# -- provider-specific values: 400 before any call ---------------------------------------------------


@pytest.mark.parametrize(
    ("model", "fields", "param"),
    [
        (FLUX1, {"safety_tolerance": 7}, "safety_tolerance"),
        (FLUX2_PRO, {"safety_tolerance": 6}, "safety_tolerance"),
        (FLUX2_PRO, {"seed": 1.5}, "seed"),
        (FLUX2_FLEX, {"steps": 51}, "steps"),
        (FLUX2_FLEX, {"guidance": 1}, "guidance"),
        (FLUX2_FLEX, {"prompt_upsampling": "maybe"}, "prompt_upsampling"),
        (IMAGEN, {"person_generation": "everyone"}, "person_generation"),
        (FLUX2_PRO, {"safety_tolerance": "high"}, "safety_tolerance"),
    ],
)
def test_provider_values_the_provider_would_refuse_are_400_before_any_call(
    gw: Gateway, bfl: FakeBFL, google: FakeGoogle, model: str, fields: dict[str, Any], param: str
) -> None:
    key, key_id = gw.create_key()
    answer = post(gw, key, {"model": model, "prompt": "x", **fields})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value")
    assert bfl.requests == [] and google.requests == []
    uncharged(gw, key_id)


def test_a_valid_person_generation_reaches_imagen(gw: Gateway, google: FakeGoogle) -> None:
    result = gw.client().images.generate(
        model=IMAGEN, prompt="x", extra_body={"person_generation": "allow_all"}
    )
    assert result.data
    (call,) = [r.json for r in google.requests if r.path.endswith(":predict")]
    assert call["parameters"]["personGeneration"] == "allow_all"


def test_a_bfl_422_reaches_the_client_as_openai_400(gw: Gateway, bfl: FakeBFL) -> None:
    detail = {"detail": [{"loc": ["body", "prompt"], "msg": "String should have at most 10000 characters"}]}
    bfl.enqueue(Outcome("status", status=422, body=orjson.dumps(detail), path="/v1/flux"))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=FLUX2_PRO, prompt="x")
    assert caught.value.status_code == 400
    assert (caught.value.type, caught.value.code) == ("invalid_request_error", "invalid_value")
    assert "at most 10000 characters" in caught.value.message
    assert len(bfl.submissions) == 1  # the request's fault: not tried elsewhere
    uncharged(gw, key_id)


# -- Gemini 3 Pro: 14 images; NO_IMAGE -------------------------------------------------------------


def test_gemini_3_pro_edits_take_14_images(gw: Gateway, google: FakeGoogle) -> None:
    images = [files.png(32 + i, 32) for i in range(14)]
    result = gw.client().images.edit(
        model=GEMINI_PRO,
        image=[(f"{i}.png", data, "image/png") for i, data in enumerate(images)],
        prompt="a group photo",
        size="1024x1024",
    )
    assert result.data
    (body,) = generate_calls(google)
    inline = [p["inlineData"]["data"] for p in body["contents"][0]["parts"][1:]]
    assert [base64.b64decode(d) for d in inline] == images


def test_gemini_3_pro_refuses_a_15th_image_before_any_call(gw: Gateway, google: FakeGoogle) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client().images.edit(
            model=GEMINI_PRO,
            image=[(f"{i}.png", files.png(16, 16), "image/png") for i in range(15)],
            prompt="x",
        )
    assert caught.value.code == "too_many_images" and google.requests == []


@pytest.mark.parametrize("reason", ["NO_IMAGE", "IMAGE_OTHER"])
def test_gemini_no_image_is_the_prompts_answer_not_retried_not_charged(
    gw: Gateway, google: FakeGoogle, reason: str
) -> None:
    google.enqueue(Outcome("finish", detail=reason, times=5))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=GEMINI_PRO, prompt="an essay about lighthouses")
    error = caught.value
    assert (error.type, error.code, error.param) == (
        "image_generation_user_error",
        "image_generation_failed",
        "prompt",
    )
    assert len(generate_calls(google)) == 1  # neither retried nor failed over to gemini-b
    uncharged(gw, key_id)
