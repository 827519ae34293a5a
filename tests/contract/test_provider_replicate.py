"""Replicate behind /v1/images/* (issue 28): the official SDK through the gateway to a fake
Replicate API that speaks its wire format (a prediction created with ``Prefer: wait``, polled when
the wait ends first, its output downloaded), over the provider contract matrix."""

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
from tests.fakes.provider_fake import Outcome
from tests.fakes.replicate_upstream import FakeReplicate

KEY = "r8_key0123456789abcdefghij"
MODEL = "replicate-flux-schnell"
KONTEXT = "replicate-flux-kontext-pro"
CREATE = "/predictions"


def replicate_upstream(fake: FakeReplicate, name: str = "rep-a", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "replicate",
        "base_url": fake.url + "/v1",
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
def rep_fake() -> Iterator[FakeReplicate]:
    with FakeReplicate(KEY) as fake:
        yield fake


@pytest.fixture
def rep(rep_fake: FakeReplicate) -> FakeReplicate:
    rep_fake.clear()
    return rep_fake


@pytest.fixture(scope="module")
def gw(rep_fake: FakeReplicate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("replicate-gateway")
    upstreams = [replicate_upstream(rep_fake), replicate_upstream(rep_fake, "rep-b", priority=1)]
    gateway = start_gateway(make_settings(data_dir, upstreams), data_dir)
    yield gateway
    gateway.close()


def test_a_prediction_finished_within_the_wait_is_not_polled(gw: Gateway, rep: FakeReplicate) -> None:
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(
        model=MODEL, prompt="a red kite", size="1536x1024", n=3, output_format="jpeg", extra_body={"seed": 3}
    )
    (created,) = rep.creations
    assert created.path == "/v1/models/black-forest-labs/flux-schnell/predictions"
    assert created.headers["authorization"] == f"Bearer {KEY}" and created.headers["prefer"] == "wait"
    assert created.json == {
        "input": {
            "prompt": "a red kite",
            "num_outputs": 3,
            "output_format": "jpg",
            "aspect_ratio": "3:2",
            "seed": 3,
        }
    }
    assert rep.count("/v1/predictions/") == 0
    assert result.data is not None and len(result.data) == 3
    assert all(decoded(d.b64_json).format == "JPEG" for d in result.data)
    downloads = [r for r in rep.requests if r.path.startswith("/delivery/")]
    assert len(downloads) == 3 and all("authorization" not in r.headers for r in downloads)
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["status"], row["images"], int(row["cost_micros"])) == ("succeeded", 3, 3 * 3_000)
    assert books_violations(gw, [key_id]) == []


def test_a_prediction_still_running_after_the_wait_is_polled(gw: Gateway, rep: FakeReplicate) -> None:
    rep.enqueue(Outcome("slow", detail=2, path=CREATE))
    result = gw.client().images.generate(model=MODEL, prompt="x", size="1024x1024", output_format="webp")
    assert rep.count("/v1/predictions/") == 3  # processing, processing, succeeded
    assert decoded(result.data[0].b64_json).format == "WEBP"  # type: ignore[index]


def test_a_single_output_string_is_one_image(gw: Gateway, rep: FakeReplicate) -> None:
    rep.enqueue(Outcome("single", path=CREATE))
    result = gw.client().images.generate(model=MODEL, prompt="x", output_format="png")
    assert result.data is not None and len(result.data) == 1


def test_stream_and_async(gw: Gateway, rep: FakeReplicate) -> None:
    client = gw.client()
    events = list(client.images.generate(model=MODEL, prompt="x", size="1024x1024", stream=True))
    assert [type(e) for e in events] == [ImageGenCompletedEvent]
    raw = client.images.with_raw_response.generate(model=MODEL, prompt="x", extra_query=ASYNC)
    task = poll_task(client, raw.http_response.json()["id"])
    assert task["status"] == "succeeded", task


def test_edits_of_a_generation_only_model_are_refused_before_any_call(
    gw: Gateway, rep: FakeReplicate
) -> None:
    with pytest.raises(openai.BadRequestError):
        gw.client().images.edit(model=MODEL, image=("a.png", files.png(32, 32), "image/png"), prompt="x")
    assert rep.requests == []


def test_a_kontext_edit_sends_a_small_image_inline(gw: Gateway, rep: FakeReplicate) -> None:
    key, key_id = gw.create_key()
    image = files.png(320, 240)
    result = gw.client(key).images.edit(
        model=KONTEXT, image=("a.png", image, "image/png"), prompt="make it blue", output_format="webp"
    )
    (created,) = rep.creations
    assert created.path == "/v1/models/black-forest-labs/flux-kontext-pro/predictions"
    sent = created.json["input"]
    assert sent["input_image"].startswith("data:image/png;base64,")
    # size=auto: no ratio, so the output keeps the input's size; webp is re-encoded from png.
    assert "aspect_ratio" not in sent and "num_outputs" not in sent and sent["output_format"] == "png"
    assert next(iter(rep.predictions.values())).inputs == [image]
    out = decoded(result.data[0].b64_json)  # type: ignore[index]
    assert (out.format, out.size) == ("WEBP", (320, 240))
    assert not [r for r in rep.requests if r.path == "/v1/files"]
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["endpoint"], row["images"], int(row["cost_micros"])) == ("edits", 1, 40_000)
    assert books_violations(gw, [key_id]) == []


def test_a_kontext_edit_uploads_a_large_image_to_the_files_api(gw: Gateway, rep: FakeReplicate) -> None:
    image = files.padded_png(1024 * 1024 + 1, 64, 48)
    result = gw.client().images.edit(
        model=KONTEXT, image=("a.png", image, "image/png"), prompt="x", size="1536x1024"
    )
    (upload,) = [r for r in rep.requests if r.path == "/v1/files"]
    assert upload.headers["authorization"] == f"Bearer {KEY}"
    assert upload.files["content"] == [(image, "image/png")]
    (created,) = rep.creations
    assert created.json["input"]["input_image"] == f"{rep.url}/v1/files/{next(iter(rep.files))}"
    assert created.json["input"]["aspect_ratio"] == "3:2"
    assert decoded(result.data[0].b64_json).size == (1248, 832)  # type: ignore[index]


def test_kontext_takes_one_image_and_makes_one(gw: Gateway, rep: FakeReplicate) -> None:
    image = ("a.png", files.png(32, 32), "image/png")
    with pytest.raises(openai.BadRequestError):
        gw.client().images.edit(model=KONTEXT, image=[image, image], prompt="x")
    with pytest.raises(openai.BadRequestError):
        gw.client().images.generate(model=KONTEXT, prompt="x", n=2)
    assert rep.requests == []


def test_an_nsfw_failure_is_moderation_blocked_and_free(gw: Gateway, rep: FakeReplicate) -> None:
    rep.enqueue(Outcome("nsfw", path=CREATE))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=MODEL, prompt="x")
    assert caught.value.code == "moderation_blocked" and len(rep.creations) == 1
    uncharged(gw, key_id)


def test_a_failed_prediction_fails_over(gw: Gateway, rep: FakeReplicate) -> None:
    rep.enqueue(Outcome("failed", path=CREATE))
    key, key_id = gw.create_key()
    assert gw.client(key).images.generate(model=MODEL, prompt="x").data
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["upstream"], len(rep.creations)) == ("rep-b", 2)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_429_and_5xx_fail_over(gw: Gateway, rep: FakeReplicate, status: int) -> None:
    body = orjson.dumps({"title": "Throttled", "detail": "Request was throttled.", "status": status})
    rep.enqueue(Outcome("status", status=status, body=body, headers={"retry-after": "2"}, path=CREATE))
    key, key_id = gw.create_key()
    assert gw.client(key).images.generate(model=MODEL, prompt="x").data
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert row["upstream"] == "rep-b"


def test_a_validation_error_is_openai_400_not_retried(gw: Gateway, rep: FakeReplicate) -> None:
    body = orjson.dumps(
        {"title": "Input validation failed", "detail": "- input.prompt: too long", "status": 422}
    )
    rep.enqueue(Outcome("status", status=422, body=body, path=CREATE))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=MODEL, prompt="x")
    assert (caught.value.status_code, caught.value.type) == (400, "invalid_request_error")
    assert "too long" in caught.value.message and len(rep.creations) == 1
    uncharged(gw, key_id)


def test_bad_provider_values_are_400_before_any_call(gw: Gateway, rep: FakeReplicate) -> None:
    key, _ = gw.create_key()
    answer = httpx.post(
        gw.url + "/v1/images/generations",
        json={"model": MODEL, "prompt": "x", "go_fast": "sometimes"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "go_fast"
    assert rep.requests == []


def test_output_outside_the_allowed_hosts_is_never_fetched(
    gateway_with: Callable[..., Gateway], rep: FakeReplicate
) -> None:
    gw = gateway_with(replicate_upstream(rep))
    rep.enqueue(Outcome("foreign_output", path=CREATE, times=10))
    key, key_id = gw.create_key()
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client(key).images.generate(model=MODEL, prompt="x")
    assert caught.value.status_code == 502 and "169.254" not in caught.value.response.text
    assert not [r for r in rep.requests if r.path.startswith("/delivery/")]
    uncharged(gw, key_id)


def test_a_refused_key_is_502_and_nothing_leaks(
    gateway_with: Callable[..., Gateway], rep: FakeReplicate
) -> None:
    wrong = "r8_wrongkey0123456789"
    gw = gateway_with(replicate_upstream(rep, api_key=wrong))
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model=MODEL, prompt="x")
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_error")
    for secret in (wrong, rep.url, "127.0.0.1"):
        assert secret not in caught.value.response.text


def test_an_async_task_records_its_prediction_without_waiting(gw: Gateway, rep: FakeReplicate) -> None:
    client = gw.client()
    raw = client.images.with_raw_response.generate(model=MODEL, prompt="x", extra_query=ASYNC)
    task_id = raw.http_response.json()["id"]
    assert poll_task(client, task_id)["status"] == "succeeded"
    (created,) = rep.creations
    assert "prefer" not in created.headers  # a task records the prediction before it is done
    (row,) = gw.query(f"SELECT provider_job FROM tasks WHERE id = '{task_id}'")
    recorded = orjson.loads(row["provider_job"])
    (prediction_id,) = rep.predictions
    assert recorded["prediction"] == {"id": prediction_id, "get": f"{rep.url}/v1/predictions/{prediction_id}"}


def test_a_task_killed_after_create_resumes_polling_and_is_billed_once(
    rep: FakeReplicate, tmp_path: Path
) -> None:
    seen = resume_after_kill(
        rep,
        replicate_upstream(rep),
        {"model": MODEL, "prompt": "a kite", "n": 2},
        tmp_path,
        poll_path="/v1/predictions/",
    )
    assert seen.task["status"] == "succeeded", seen.task
    assert len(seen.task["result"]["data"]) == 2
    assert len(rep.creations) == 1  # resumed: polled again, never created twice
    assert seen.provider_job["prediction"]["id"] == next(iter(rep.predictions))
    assert [(r["status"], r["images"], int(r["cost_micros"])) for r in seen.ledger] == [
        ("succeeded", 2, 6_000)
    ]
    assert (int(seen.key["spent_micros"]), int(seen.key["reserved_micros"])) == (6_000, 0)
