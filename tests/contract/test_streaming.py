"""SSE relay of partial images (SPEC §1.3, issue 4) through the official SDK and raw HTTP."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

from tests.conftest import (
    MODELS_FILE,
    Gateway,
    fake_upstream_config,
)
from tests.fakes.openai_upstream import FakeOpenAI, Fault

GEN = "/v1/images/generations"


def collect(events: Any) -> list[Any]:
    return list(events)


def test_sdk_stream_through_the_fake_upstream(gateway: Gateway, upstream: FakeOpenAI) -> None:
    events = collect(
        gateway.client().images.generate(model="gpt-image-1", prompt="a fox", stream=True, partial_images=2)
    )
    assert [type(e) for e in events] == [
        ImageGenPartialImageEvent,
        ImageGenPartialImageEvent,
        ImageGenCompletedEvent,
    ]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    done = events[-1]
    assert done.usage.total_tokens == upstream.usage["total_tokens"]
    assert done.size and done.output_format == "png" and done.b64_json
    sent = upstream.last.json
    assert sent is not None and sent["stream"] is True and sent["partial_images"] == 2


def test_sdk_stream_through_the_local_backend(local_gateway: Gateway) -> None:
    events = collect(
        local_gateway.client().images.generate(
            model="gpt-image-1-mini", prompt="a fox", stream=True, partial_images=3, size="1024x1024"
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    sizes = [len(base64.b64decode(e.b64_json)) for e in events]
    # Coarse to fine: each preview carries more detail than the one before.
    assert sizes[0] < sizes[1] < sizes[2]
    assert events[-1].usage.output_tokens == 1056


def test_streamed_n3_is_billed_as_the_sum_of_completed_usages(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gateway.create_key(name="stream-n3")
    events = collect(gateway.client(key).images.generate(model="gpt-image-1.5", prompt="x", stream=True, n=3))
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert len(completed) == 3
    (row,) = [r for r in gateway.ledger() if r["key_id"] == key_id]
    per = upstream.usage
    text_in = per["input_tokens_details"]["text_tokens"] * 3
    image_in = per["input_tokens_details"]["image_tokens"] * 3
    image_out = per["output_tokens_details"]["image_tokens"] * 3
    assert (row["text_input_tokens"], row["image_input_tokens"], row["image_output_tokens"]) == (
        text_in,
        image_in,
        image_out,
    )
    assert row["cost_micros"] == text_in * 5 + image_in * 8 + image_out * 32
    assert row["status"] == "succeeded" and row["images"] == 3


def test_events_are_relayed_as_they_arrive(gateway: Gateway, upstream: FakeOpenAI) -> None:
    """The upstream sends its completed event only once the client has the partial one; a
    buffering relay would hold the partial until the end (here: until the step gate gives up)."""
    upstream.step_streams(timeout_s=30)
    upstream.allow_events(1)
    arrivals: list[tuple[str, int]] = []  # each event, with how many events the upstream had sent
    for event in gateway.client().images.generate(
        model="gpt-image-1", prompt="x", stream=True, partial_images=1
    ):
        arrivals.append((event.type, upstream.events_sent))
        upstream.allow_events(1)
    (partial, sent_then), (done, _) = arrivals
    assert partial.endswith("partial_image") and done.endswith("completed")
    assert sent_then == 1  # the partial reached the client before the upstream sent the rest


def test_upstream_dropping_mid_stream_gives_an_error_event(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.enqueue_fault(Fault.stream_cut(events_before_cut=1))
    key, key_id = gateway.create_key(name="cut")
    received: list[str] = []
    with pytest.raises(openai.APIError):
        for event in gateway.client(key).images.generate(
            model="gpt-image-1", prompt="x", stream=True, partial_images=2
        ):
            received.append(event.type)
    assert received == ["image_generation.partial_image"]
    (row,) = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert row["status"] == "failed"
    # The partial image the client got is billed as OpenAI bills it: 100 image output tokens.
    assert row["cost_micros"] == 100 * 40 and row["image_output_tokens"] == 100 and row["estimated"]


def test_error_event_wire_format(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.enqueue_fault(Fault.stream_cut(events_before_cut=1))
    key, _ = gateway.create_key(name="wire")
    body = httpx.post(
        gateway.url + GEN,
        json={"model": "gpt-image-1", "prompt": "x", "stream": True, "partial_images": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert body.status_code == 200
    assert body.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in body.text.splitlines() if line and not line.startswith(":")]
    assert lines[0] == "event: image_generation.partial_image"
    assert lines[-2] == "event: error"
    assert lines[-1].startswith('data: {"type":"error","error":{')


def test_server_error_before_the_first_event_fails_over(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(
        fake_upstream_config(upstream, name="first", priority=0),
        fake_upstream_config(upstream, name="second", priority=1),
    )
    upstream.enqueue_fault(Fault.status(500, "boom"))
    events = collect(
        gw.client().images.generate(model="gpt-image-1", prompt="x", stream=True, partial_images=1)
    )
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert upstream.count(GEN) == 2
    rows = gw.ledger()
    # One request, one ledger row, whatever the number of attempts.
    assert [(r["upstream"], r["status"]) for r in rows] == [("second", "succeeded")]


def test_error_before_any_event_is_a_plain_http_error(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.enqueue_fault(Fault.status(400, "nope", code="invalid_value", param="prompt"))
    with pytest.raises(openai.BadRequestError) as caught:
        collect(gateway.client().images.generate(model="gpt-image-1", prompt="x", stream=True))
    assert caught.value.param == "prompt"


def test_client_disconnect_closes_the_upstream_and_is_recorded(
    gateway: Gateway, upstream: FakeOpenAI
) -> None:
    upstream.step_streams()  # the second partial waits for a step that never comes
    upstream.allow_events(1)
    key, key_id = gateway.create_key(name="leaver")
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            gateway.url + GEN,
            json={"model": "gpt-image-1", "prompt": "x", "stream": True, "partial_images": 2},
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # got the first partial: hang up
    assert upstream.wait_for_stream_disconnects(1, timeout=30), "the upstream connection was left open"
    deadline = time.monotonic() + 30
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not rows:
        rows = [r for r in gateway.ledger() if r["key_id"] == key_id]
        time.sleep(0.05)
    (row,) = rows
    # One partial image was made before the client left: billed, 100 image output tokens.
    assert row["status"] == "cancelled" and row["cost_micros"] == 100 * 40


def test_keepalive_comments_while_the_upstream_is_silent(gateway_with: Any, upstream: FakeOpenAI) -> None:
    gw = gateway_with(fake_upstream_config(upstream), server={"sse_ping_s": 0.2})
    # The upstream stays silent after its first event until the client has seen a keep-alive (or,
    # were there none, until the step gate gives up and the assertion below fails).
    upstream.step_streams(timeout_s=30)
    upstream.allow_events(1)
    key, _ = gw.create_key()
    lines: list[str] = []
    with httpx.stream(
        "POST",
        gw.url + GEN,
        json={"model": "gpt-image-1", "prompt": "x", "stream": True, "partial_images": 1},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            lines.append(line)
            if (
                line.startswith(":")
                and upstream.events_sent == 1
                and any(x.startswith("data:") for x in lines)
            ):
                upstream.allow_events(1)
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    last_data = max(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert any(line.startswith(":") for line in lines[first_data:last_data])


def test_non_streaming_upstream_still_answers_the_stream_contract(
    gateway_with: Any, upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream, stream=False))
    key, key_id = gw.create_key()
    events = collect(gw.client(key).images.generate(model="gpt-image-1", prompt="x", stream=True, n=2))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert upstream.last.json is not None and "stream" not in upstream.last.json
    (row,) = gw.ledger()
    assert (
        row["images"] == 2
        and row["image_output_tokens"] == upstream.usage["output_tokens_details"]["image_tokens"]
    )


def test_twenty_megabyte_event_crosses_intact(
    gateway_with: Any, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    models = yaml.safe_load(Path(MODELS_FILE).read_text())
    big = dict(models["models"]["gpt-image-1"])
    big["free_size"] = {"max_pixels": 16_777_216, "max_edge": 4096}
    models["models"]["gpt-image-big"] = big
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump(models))
    gw = gateway_with(fake_upstream_config(upstream, models=["gpt-image-big"]), models_file=str(models_file))
    upstream.noise_images = True

    captured: dict[str, str] = {}
    original = upstream._stream

    def spy(events: Any, cut_after: Any, **options: Any) -> Any:
        materialized = list(events)
        for name, data in materialized:
            if name.endswith("completed"):
                captured["b64"] = data["b64_json"]
        return original(iter(materialized), cut_after, **options)

    upstream._stream = spy  # type: ignore[method-assign]
    try:
        events = collect(
            gw.client().images.generate(model="gpt-image-big", prompt="noise", stream=True, size="2880x2304")
        )
    finally:
        upstream._stream = original  # type: ignore[method-assign]
    (done,) = events
    assert len(done.b64_json) > 20 * 1024 * 1024
    assert done.b64_json == captured["b64"]


def test_stream_survives_a_concurrent_second_stream(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.stream_delay_s = 0.3
    results: list[int] = []

    def run() -> None:
        events = collect(
            gateway.client().images.generate(model="gpt-image-1", prompt="x", stream=True, partial_images=2)
        )
        results.append(len(events))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [3, 3, 3]
