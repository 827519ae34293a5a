"""The azure upstream kind (SPEC §2, issue 8): an Azure-shaped fake upstream serves generations, edits
and streams through the azure adapter, and its errors come back OpenAI-shaped through the official SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

from tests.conftest import UPSTREAM_KEY, Gateway, fake_upstream_config, make_settings, start_gateway
from tests.fakes import image_files as files
from tests.fakes.images import render_b64
from tests.fakes.openai_upstream import FakeOpenAI, Fault

DEPLOYMENT = "my-deployment"
VERSION = "2025-04-01-preview"
GENERATIONS = f"/openai/deployments/{DEPLOYMENT}/images/generations"
EDITS = f"/openai/deployments/{DEPLOYMENT}/images/edits"


def azure_config(fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "azure",
        "kind": "azure",
        "follows_retirements": False,  # serves the retired gpt-image-1
        "base_url": fake.url,
        "api_key": UPSTREAM_KEY,
        "api_version": VERSION,
        "models": [{"name": "gpt-image-1", "upstream_model": DEPLOYMENT}],
        "timeout_s": 10,
    }
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def azure_gateway(fake_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("azure-gateway")
    gw = start_gateway(make_settings(data_dir, [azure_config(fake_upstream)]), data_dir)
    yield gw
    gw.close()


@pytest.fixture
def gateway_with(tmp_path: Path) -> Iterator[Any]:
    started: list[Gateway] = []

    def start(*upstreams: dict[str, Any]) -> Gateway:
        data_dir = tmp_path / f"gw{len(started)}"
        gw = start_gateway(make_settings(data_dir, list(upstreams)), data_dir)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.close()


def assert_azure_request(fake: FakeOpenAI, path: str) -> None:
    recorded = fake.last
    assert recorded.path == path
    assert recorded.query == {"api-version": VERSION}
    assert recorded.headers["api-key"] == UPSTREAM_KEY
    assert "authorization" not in recorded.headers


# -- the three request kinds -------------------------------------------------------------------------


def test_generation(azure_gateway: Gateway, upstream: FakeOpenAI) -> None:
    result = azure_gateway.client().images.generate(
        model="gpt-image-1",
        prompt="a lighthouse at dawn",
        size="1024x1536",
        quality="low",
        extra_body={"future_field": "kept"},
    )
    assert_azure_request(upstream, GENERATIONS)
    sent = upstream.last.json
    assert sent == {
        "prompt": "a lighthouse at dawn",
        "size": "1024x1536",
        "quality": "low",
        "future_field": "kept",
        # The gateway's effective moderation level always goes upstream (SPEC §4).
        "moderation": "auto",
    }
    # The image is relayed byte for byte as the upstream rendered it.
    assert result.data and result.data[0].b64_json == render_b64(1024, 1536, "png")
    assert result.usage is not None and result.usage.total_tokens == upstream.usage["total_tokens"]
    row = azure_gateway.ledger()[-1]
    assert row["status"] == "succeeded" and row["upstream"] == "azure"


def test_edit_with_several_images_and_a_mask(azure_gateway: Gateway, upstream: FakeOpenAI) -> None:
    images = [files.png(256, 256), files.jpeg(256, 256), files.webp(256, 256)]
    mask = files.mask(256, 256)
    result = azure_gateway.client().images.edit(
        model="gpt-image-1",
        image=[
            ("a.png", images[0], "image/png"),
            ("b.jpg", images[1], "image/jpeg"),
            ("c.webp", images[2], "image/webp"),
        ],
        mask=("mask.png", mask, "image/png"),
        prompt="merge them",
        input_fidelity="high",
    )
    assert_azure_request(upstream, EDITS)
    recorded = upstream.last
    assert [f.data for f in recorded.files_for("image[]")] == images
    assert [f.content_type for f in recorded.files_for("image[]")] == [
        "image/png",
        "image/jpeg",
        "image/webp",
    ]
    (sent_mask,) = recorded.files_for("mask")
    assert sent_mask.data == mask
    assert recorded.form["prompt"] == ["merge them"] and recorded.form["input_fidelity"] == ["high"]
    assert "model" not in recorded.form
    assert result.data and result.data[0].b64_json == render_b64(256, 256, "png")


def test_stream_with_partial_images(azure_gateway: Gateway, upstream: FakeOpenAI) -> None:
    events = list(
        azure_gateway.client().images.generate(
            model="gpt-image-1", prompt="a fox", size="1024x1024", stream=True, partial_images=2
        )
    )
    assert [type(e) for e in events] == [
        ImageGenPartialImageEvent,
        ImageGenPartialImageEvent,
        ImageGenCompletedEvent,
    ]
    partials = [e for e in events if isinstance(e, ImageGenPartialImageEvent)]
    assert [e.partial_image_index for e in partials] == [0, 1]
    done = events[-1]
    assert isinstance(done, ImageGenCompletedEvent)
    assert done.b64_json == render_b64(1024, 1024, "png")
    assert done.usage.total_tokens == upstream.usage["total_tokens"]
    assert_azure_request(upstream, GENERATIONS)
    sent = upstream.last.json
    assert sent is not None and sent["stream"] is True and sent["partial_images"] == 2 and "model" not in sent


# -- Azure's errors, OpenAI-shaped -------------------------------------------------------------------


def content_filter_fault() -> Fault:
    body = {
        "error": {
            "code": "content_filter",
            "message": "Your request was rejected as a result of our safety system.",
            "param": "prompt",
            "type": None,
            "inner_error": {
                "code": "ResponsibleAIPolicyViolation",
                "revised_prompt": "an internal revised prompt",
                "content_filter_results": {
                    "hate": {"filtered": False, "severity": "safe"},
                    "violence": {"filtered": True, "severity": "medium"},
                },
            },
        }
    }
    return Fault(kind="status", status_code=400, body=orjson.dumps(body))


def test_content_filter_is_moderation_blocked(azure_gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.enqueue_fault(content_filter_fault())
    with pytest.raises(openai.BadRequestError) as caught:
        azure_gateway.client().images.generate(model="gpt-image-1", prompt="something violent")
    error = caught.value
    assert error.status_code == 400
    assert (error.type, error.code, error.param) == (
        "image_generation_user_error",
        "moderation_blocked",
        None,
    )
    assert error.body == {
        "message": "Your request was rejected as a result of our safety system.",
        "type": "image_generation_user_error",
        "param": None,
        "code": "moderation_blocked",
        "moderation_details": {"moderation_stage": "input", "categories": ["violence"]},
    }
    for azure_only in ("inner_error", "ResponsibleAIPolicyViolation", "revised", "severity", DEPLOYMENT):
        assert azure_only not in error.response.text


def test_content_filter_on_a_stream(azure_gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.enqueue_fault(content_filter_fault())
    with pytest.raises(openai.BadRequestError) as caught:
        list(
            azure_gateway.client().images.generate(
                model="gpt-image-1", prompt="x", stream=True, partial_images=1
            )
        )
    assert caught.value.code == "moderation_blocked"


def test_bad_parameter_keeps_status_and_code(azure_gateway: Gateway, upstream: FakeOpenAI) -> None:
    body = {
        "error": {"code": "invalidPayload", "message": "The prompt is too long.", "param": None, "type": None}
    }
    upstream.enqueue_fault(Fault(kind="status", status_code=400, body=orjson.dumps(body)))
    with pytest.raises(openai.BadRequestError) as caught:
        azure_gateway.client().images.edit(
            model="gpt-image-1", image=("a.png", files.png(64, 64), "image/png"), prompt="x"
        )
    assert (caught.value.type, caught.value.code) == ("invalid_request_error", "invalidPayload")
    assert caught.value.message.endswith("The prompt is too long.")


def test_rate_limit_relays_retry_after(azure_gateway: Gateway, upstream: FakeOpenAI) -> None:
    body = {
        "error": {
            "code": "429",
            "message": "Requests to the Images_Generations Operation have exceeded call rate limit. "
            "Please retry after 120 seconds.",
        }
    }
    # Longer than any wait the gateway would spend on the same upstream: relayed at once.
    upstream.enqueue_fault(
        Fault(kind="status", status_code=429, body=orjson.dumps(body), headers={"retry-after": "120"})
    )
    with pytest.raises(openai.RateLimitError) as caught:
        azure_gateway.client().images.generate(model="gpt-image-1", prompt="x")
    error = caught.value
    assert (error.type, error.code) == ("rate_limit_error", "rate_limit_exceeded")
    assert error.response.headers["retry-after"] == "120"


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(500, "The server had an error.", path=GENERATIONS),
        Fault(
            kind="status",
            status_code=404,
            body=b'{"error": {"code": "DeploymentNotFound", "message": "The deployment does not exist."}}',
            path=GENERATIONS,
        ),
    ],
    ids=["500", "deployment-not-found"],
)
def test_failure_fails_over_to_the_next_upstream(
    gateway_with: Any, upstream: FakeOpenAI, fault: Fault
) -> None:
    backup = fake_upstream_config(upstream, name="backup", priority=1)
    gw = gateway_with(azure_config(upstream, priority=0), backup)
    upstream.enqueue_fault(fault)
    result = gw.client().images.generate(model="gpt-image-1", prompt="x", size="1024x1024")
    assert result.data and result.data[0].b64_json == render_b64(1024, 1024, "png")
    assert [r.path for r in upstream.requests] == [GENERATIONS, "/v1/images/generations"]
    assert fault.fired == 1
    (row,) = gw.ledger()
    assert row["status"] == "succeeded" and row["upstream"] == "backup"


def test_refused_key_is_502_and_nothing_leaks(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(azure_config(upstream, api_key="azure-wrong-key-0123456789"))
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model="gpt-image-1", prompt="x")
    assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
    assert upstream.last.headers["api-key"] == "azure-wrong-key-0123456789"
    for secret in ("azure-wrong-key-0123456789", upstream.url, "127.0.0.1", DEPLOYMENT):
        assert secret not in caught.value.response.text
