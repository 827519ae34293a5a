"""fal.ai behind /v1/images/* (issue 28): the official SDK through the gateway to a fake fal queue
that speaks fal's wire format (submit, status, result, download), over the provider contract
matrix: sizes, n, formats, stream, async, moderation, 429/5xx failover, 4xx shape, billing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types import ImageGenCompletedEvent

from tests.conftest import Gateway, make_settings, start_gateway
from tests.contract.providers import (
    ASYNC,
    books_violations,
    decoded,
    poll_task,
    resume_after_kill,
    uncharged,
)
from tests.fakes import image_files as files
from tests.fakes.fal_upstream import FakeFal
from tests.fakes.provider_fake import Outcome

KEY = "fal-key-0123456789abcdef:secretpart"
FLUX = "fal-flux-dev"
SD = "fal-sd3.5-large"
KONTEXT = "fal-flux-kontext-pro"
SUBMIT = "/fal-ai/"


def fal_upstream(fake: FakeFal, name: str = "fal-a", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "fal",
        "base_url": fake.url,
        "api_key": KEY,
        "models": ["*"],
        "timeout_s": 10,
        "delivery_hosts": [f"127.0.0.1:{fake.server.port}"],
        "poll_interval_s": 0.02,
        "poll_max_interval_s": 0.05,
        "poll_budget_s": 10,
        **extra,
    }


@pytest.fixture(scope="module")
def fal_fake() -> Iterator[FakeFal]:
    with FakeFal(KEY) as fake:
        yield fake


@pytest.fixture
def fal(fal_fake: FakeFal) -> FakeFal:
    fal_fake.clear()
    return fal_fake


@pytest.fixture(scope="module")
def gw(fal_fake: FakeFal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("fal-gateway")
    upstreams = [fal_upstream(fal_fake), fal_upstream(fal_fake, "fal-b", priority=1)]
    gateway = start_gateway(make_settings(data_dir, upstreams), data_dir)
    yield gateway
    gateway.close()


def test_flux_generation_submits_polls_reads_and_downloads(gw: Gateway, fal: FakeFal) -> None:
    fal.enqueue(Outcome("slow", detail=2, path=SUBMIT))
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(
        model=FLUX, prompt="a red kite", size="1536x1024", n=2, output_format="jpeg", extra_body={"seed": 7}
    )
    (submitted,) = fal.submissions
    assert submitted.path == "/fal-ai/flux/dev"
    assert submitted.headers["authorization"] == f"Key {KEY}"
    assert submitted.json == {
        "prompt": "a red kite",
        "num_images": 2,
        "output_format": "jpeg",
        "enable_safety_checker": True,
        "image_size": {"width": 1536, "height": 1024},
        "seed": 7,
    }
    assert fal.count("/status") == 3  # IN_QUEUE, IN_PROGRESS, COMPLETED
    assert result.data is not None and len(result.data) == 2
    assert all(decoded(d.b64_json).format == "JPEG" for d in result.data)
    assert result.size == "1536x1024" and result.output_format == "jpeg"
    media = [r for r in fal.requests if r.path.startswith("/media/")]
    assert len(media) == 2 and all("authorization" not in r.headers for r in media)
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["status"], row["images"], int(row["cost_micros"])) == ("succeeded", 2, 2 * 50_000)
    assert books_violations(gw, [key_id]) == []


def test_sd35_fits_the_size_and_reencodes_webp(gw: Gateway, fal: FakeFal) -> None:
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=SD, prompt="x", size="2048x1024", output_format="webp")
    (submitted,) = fal.submissions
    assert submitted.path == "/fal-ai/stable-diffusion-v35-large"
    assert submitted.json["image_size"] == {"width": 1536, "height": 768}
    assert submitted.json["output_format"] == "png"
    image = decoded(result.data[0].b64_json)  # type: ignore[index]
    assert image.format == "WEBP" and image.size == (1536, 768)
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert int(row["cost_micros"]) == 65_000


def test_stream_answers_completed_events(gw: Gateway, fal: FakeFal) -> None:
    events = list(gw.client().images.generate(model=FLUX, prompt="x", size="1024x1024", stream=True))
    assert [type(e) for e in events] == [ImageGenCompletedEvent]
    assert decoded(events[0].b64_json).size == (1024, 1024)  # type: ignore[union-attr]


def test_async_task(gw: Gateway, fal: FakeFal) -> None:
    client = gw.client()
    raw = client.images.with_raw_response.generate(
        model=FLUX, prompt="x", size="1024x1024", extra_query=ASYNC
    )
    task = poll_task(client, raw.http_response.json()["id"])
    assert task["status"] == "succeeded", task
    assert decoded(task["result"]["data"][0]["b64_json"]).size == (1024, 1024)


def test_edits_of_a_generation_only_model_are_refused_before_any_call(gw: Gateway, fal: FakeFal) -> None:
    with pytest.raises(openai.BadRequestError):
        gw.client().images.edit(model=FLUX, image=("a.png", files.png(32, 32), "image/png"), prompt="x")
    assert fal.requests == []


def test_kontext_generation_maps_the_size_to_a_ratio(gw: Gateway, fal: FakeFal) -> None:
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=KONTEXT, prompt="x", size="1536x1024", n=2)
    (submitted,) = fal.submissions
    assert submitted.path == "/fal-ai/flux-pro/kontext/text-to-image"
    assert submitted.json["aspect_ratio"] == "3:2" and "image_size" not in submitted.json
    assert result.data is not None and len(result.data) == 2
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["images"], int(row["cost_micros"])) == (2, 80_000)


def test_a_kontext_edit_sends_the_image_inline_as_a_data_uri(gw: Gateway, fal: FakeFal) -> None:
    key, key_id = gw.create_key()
    image = files.png(320, 240)
    result = gw.client(key).images.edit(
        model=KONTEXT,
        image=("a.png", image, "image/png"),
        prompt="make it blue",
        output_format="jpeg",
        extra_body={"seed": "5"},
    )
    (submitted,) = fal.submissions
    assert submitted.path == "/fal-ai/flux-pro/kontext"
    assert submitted.json["image_url"].startswith("data:image/png;base64,")
    # size=auto: neither a size nor a ratio, so the output keeps the input's size.
    assert "aspect_ratio" not in submitted.json and "image_size" not in submitted.json
    assert submitted.json["seed"] == 5  # the multipart "5" sent as the integer fal takes
    assert fal.jobs[next(iter(fal.jobs))].inputs == [image]
    out = decoded(result.data[0].b64_json)  # type: ignore[index]
    assert (out.format, out.size) == ("JPEG", (320, 240))
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["endpoint"], row["images"], int(row["cost_micros"])) == ("edits", 1, 40_000)
    assert books_violations(gw, [key_id]) == []


def test_a_kontext_edit_of_several_images_goes_to_the_multi_endpoint(gw: Gateway, fal: FakeFal) -> None:
    images = [files.png(64, 48), files.jpeg(48, 64), files.webp(32, 32)]
    result = gw.client().images.edit(
        model=KONTEXT,
        image=[
            ("a.png", images[0], "image/png"),
            ("b.jpg", images[1], "image/jpeg"),
            ("c.webp", images[2], "image/webp"),
        ],
        prompt="x",
        size="1024x1024",
    )
    (submitted,) = fal.submissions
    assert submitted.path == "/fal-ai/flux-pro/kontext/multi"
    uris = submitted.json["image_urls"]
    assert [u.split(";", 1)[0] for u in uris] == ["data:image/png", "data:image/jpeg", "data:image/webp"]
    assert "image_url" not in submitted.json and submitted.json["aspect_ratio"] == "1:1"
    assert len(fal.jobs[next(iter(fal.jobs))].inputs) == 3
    assert decoded(result.data[0].b64_json).size == (1024, 1024)  # type: ignore[index]


def test_kontext_refuses_masks_and_too_many_images_before_any_call(gw: Gateway, fal: FakeFal) -> None:
    image = ("a.png", files.png(32, 32), "image/png")
    with pytest.raises(openai.BadRequestError):
        gw.client().images.edit(model=KONTEXT, image=[image] * 5, prompt="x")
    with pytest.raises(openai.BadRequestError):
        gw.client().images.edit(
            model=KONTEXT, image=image, mask=("m.png", files.mask(32, 32), "image/png"), prompt="x"
        )
    assert fal.requests == []


def test_flagged_images_are_dropped_and_not_charged(gw: Gateway, fal: FakeFal) -> None:
    fal.enqueue(Outcome("nsfw", detail=1, path=SUBMIT))
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=FLUX, prompt="x", size="1024x1024", n=2)
    assert result.data is not None and len(result.data) == 1
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["images"], int(row["cost_micros"])) == (1, 25_000)


def test_all_images_flagged_is_moderation_blocked_and_free(gw: Gateway, fal: FakeFal) -> None:
    fal.enqueue(Outcome("nsfw", detail=4, path=SUBMIT))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=FLUX, prompt="x", n=2)
    assert caught.value.code == "moderation_blocked"
    assert caught.value.body["moderation_details"]["moderation_stage"] == "output"  # type: ignore[index]
    assert len(fal.submissions) == 1
    uncharged(gw, key_id)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_submit_429_and_5xx_fail_over(gw: Gateway, fal: FakeFal, status: int) -> None:
    body = orjson.dumps({"detail": "Too many requests"})
    fal.enqueue(Outcome("status", status=status, body=body, headers={"retry-after": "2"}, path=SUBMIT))
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=FLUX, prompt="x", size="1024x1024")
    assert result.data and len(fal.submissions) == 2
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["upstream"], int(row["cost_micros"])) == ("fal-b", 25_000)


def test_a_validation_error_is_openai_400_not_retried(gw: Gateway, fal: FakeFal) -> None:
    detail = {"detail": [{"loc": ["body", "prompt"], "msg": "Prompt is too long", "type": "value_error"}]}
    fal.enqueue(Outcome("result_error", status=422, body=orjson.dumps(detail), path=SUBMIT))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=FLUX, prompt="x")
    assert (caught.value.status_code, caught.value.type) == (400, "invalid_request_error")
    assert "Prompt is too long" in caught.value.message
    assert len(fal.submissions) == 1
    uncharged(gw, key_id)


def test_bad_provider_values_are_400_before_any_call(gw: Gateway, fal: FakeFal) -> None:
    key, key_id = gw.create_key()
    answer = httpx.post(
        gw.url + "/v1/images/generations",
        json={"model": FLUX, "prompt": "x", "num_inference_steps": 500},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "num_inference_steps"
    assert fal.requests == []
    uncharged(gw, key_id)


def test_media_outside_the_allowed_hosts_is_never_fetched(
    gateway_with: Callable[..., Gateway], fal: FakeFal
) -> None:
    gw = gateway_with(fal_upstream(fal))
    fal.enqueue(Outcome("foreign_media", path=SUBMIT, times=10))
    key, key_id = gw.create_key()
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client(key).images.generate(model=FLUX, prompt="x")
    assert caught.value.status_code == 502 and "169.254" not in caught.value.response.text
    assert not [r for r in fal.requests if r.path.startswith("/media/")]
    uncharged(gw, key_id)


def test_a_refused_key_is_502_and_nothing_leaks(gateway_with: Callable[..., Gateway], fal: FakeFal) -> None:
    wrong = "fal-wrong-key:0123456789"
    gw = gateway_with(fal_upstream(fal, api_key=wrong))
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model=FLUX, prompt="x")
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_error")
    for secret in (wrong, fal.url, "127.0.0.1"):
        assert secret not in caught.value.response.text


def test_an_async_task_records_its_request_before_polling(gw: Gateway, fal: FakeFal) -> None:
    client = gw.client()
    raw = client.images.with_raw_response.generate(
        model=FLUX, prompt="x", size="1024x1024", extra_query=ASYNC
    )
    task_id = raw.http_response.json()["id"]
    assert poll_task(client, task_id)["status"] == "succeeded"
    (row,) = gw.query(f"SELECT provider_job FROM tasks WHERE id = '{task_id}'")
    recorded = orjson.loads(row["provider_job"])
    (job_id,) = fal.jobs
    assert recorded["upstream"] in ("fal-a", "fal-b") and recorded["request"]["request_id"] == job_id
    assert recorded["request"]["status_url"].endswith(f"/requests/{job_id}/status")


def test_a_task_killed_after_submit_resumes_polling_and_is_billed_once(fal: FakeFal, tmp_path: Path) -> None:
    seen = resume_after_kill(
        fal,
        fal_upstream(fal),
        {"model": FLUX, "prompt": "a kite", "size": "1024x1024", "n": 2},
        tmp_path,
        poll_path="/status",
    )
    assert seen.task["status"] == "succeeded", seen.task
    assert len(seen.task["result"]["data"]) == 2
    assert len(fal.submissions) == 1  # resumed: polled again, never submitted twice
    assert seen.provider_job["request"]["request_id"] == next(iter(fal.jobs))
    assert [(r["status"], r["images"], int(r["cost_micros"])) for r in seen.ledger] == [
        ("succeeded", 2, 50_000)
    ]
    assert (int(seen.key["spent_micros"]), int(seen.key["reserved_micros"])) == (50_000, 0)
