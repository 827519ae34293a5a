"""The fake OpenAI upstream (tests/fakes) behaves like the OpenAI Images API, as the official SDK sees it."""

from __future__ import annotations

import base64
import http.client as http_client
import io
import threading
import time
from collections.abc import Iterator
from typing import Literal

import httpx
import openai
import pytest
from openai.types import ImagesResponse
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.fakes.images import decode_b64_image, render_image
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.server import ThreadedServer

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
KEY = "sk-upstream-test"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeOpenAI) -> None:
    fake.clear()


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0, timeout=10) as sdk:
        yield sdk


@pytest.fixture
def http(fake: FakeOpenAI) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=fake.url, headers=headers, timeout=10) as raw:
        yield raw


def png(width: int, height: int) -> bytes:
    return render_image(width, height, "png")


# -- generations ------------------------------------------------------------------------------------


def test_generate_returns_typed_response_with_real_images(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    result = client.images.generate(model="gpt-image-1", prompt="a cat", size="1024x1536", n=2, quality="low")

    assert isinstance(result, ImagesResponse)
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        image = decode_b64_image(item.b64_json)
        assert (image.format, image.size) == ("PNG", (1024, 1536))
    assert (result.size, result.quality, result.output_format, result.background) == (
        "1024x1536",
        "low",
        "png",
        "opaque",
    )
    assert result.usage is not None and result.usage.model_dump() == fake.usage
    record = fake.last
    assert (record.method, record.path, record.bearer) == ("POST", GEN, KEY)
    assert record.json == {
        "model": "gpt-image-1",
        "prompt": "a cat",
        "size": "1024x1536",
        "n": 2,
        "quality": "low",
    }
    assert record.headers["content-type"] == "application/json"


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_generate_output_formats_and_auto_size(
    client: openai.OpenAI, fmt: Literal["jpeg", "webp"], pil: str
) -> None:
    result = client.images.generate(model="gpt-image-1", prompt="x", size="auto", output_format=fmt)
    assert result.data and result.data[0].b64_json
    image = decode_b64_image(result.data[0].b64_json)
    assert (image.format, image.size, result.output_format) == (pil, (1024, 1024), fmt)


def test_transparent_background_has_alpha(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="gpt-image-1", prompt="x", size="1024x1024", background="transparent"
    )
    assert result.data and result.data[0].b64_json and result.background == "transparent"
    image = decode_b64_image(result.data[0].b64_json)
    assert image.mode == "RGBA" and image.getpixel((0, 0))[3] == 0  # type: ignore[index]


def test_custom_usage_is_reported(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.usage = {**fake.usage, "input_tokens": 7, "total_tokens": 4167}
    result = client.images.generate(model="gpt-image-1", prompt="x")
    assert result.usage is not None and (result.usage.input_tokens, result.usage.total_tokens) == (7, 4167)


def test_dalle_answers_like_dalle(client: openai.OpenAI, http: httpx.Client) -> None:
    d3 = client.images.generate(model="dall-e-3", prompt="a fox", size="1792x1024")
    assert d3.usage is None and d3.size is None and d3.output_format is None
    assert d3.data and d3.data[0].revised_prompt and "a fox" in d3.data[0].revised_prompt
    assert d3.data[0].b64_json and decode_b64_image(d3.data[0].b64_json).size == (1792, 1024)

    d2 = client.images.generate(model="dall-e-2", prompt="a fox", size="256x256", response_format="url")
    assert d2.data and d2.data[0].url and d2.data[0].revised_prompt is None
    fetched = httpx.get(d2.data[0].url)  # no auth needed, like the real signed links
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (256, 256)


def test_missing_prompt_and_unknown_route(http: httpx.Client) -> None:
    missing = http.post(GEN, json={"model": "gpt-image-1"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    unknown = http.post("/v1/nope", json={})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "invalid_request_error"


# -- edits ------------------------------------------------------------------------------------------


def test_edit_records_list_of_images_and_mask_byte_for_byte(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    first, second, mask = png(256, 256), render_image(64, 32, "jpeg"), render_image(256, 256, "png", True)
    result = client.images.edit(
        model="gpt-image-1",
        prompt="add a hat",
        image=[("first.png", first, "image/png"), ("second.jpg", second, "image/jpeg")],
        mask=("mask.png", mask, "image/png"),
        n=1,
        input_fidelity="high",
    )

    record = fake.last
    assert record.path == EDIT and record.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert record.files == [
        ("image[]", "first.png", "image/png", first),
        ("image[]", "second.jpg", "image/jpeg", second),
        ("mask", "mask.png", "image/png", mask),
    ]
    assert record.form == {
        "prompt": ["add a hat"],
        "model": ["gpt-image-1"],
        "n": ["1"],
        "input_fidelity": ["high"],
    }
    assert record.field("prompt") == "add a hat" and record.json is None
    assert [f.field for f in record.files_for("mask")] == ["mask"]
    # size absent: the first input image's size
    assert result.data and result.data[0].b64_json and result.size == "256x256"
    assert decode_b64_image(result.data[0].b64_json).size == (256, 256)
    assert result.usage is not None


def test_edit_single_image_field_and_missing_image(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    data = png(32, 32)
    client.images.edit(
        model="gpt-image-1", prompt="x", image=("one.png", data, "image/png"), size="1024x1024"
    )
    assert fake.last.files == [("image", "one.png", "image/png", data)]
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(model="gpt-image-1", prompt="x", image=[])
    assert info.value.code == "missing_required_parameter"


def test_edit_accepts_big_uploads(fake: FakeOpenAI, http: httpx.Client) -> None:
    big = b"\x89PNG" + bytes(3 * 1024 * 1024)
    files = [("image[]", ("a.png", big, "image/png")), ("image[]", ("b.png", big[:10], "image/png"))]
    response = http.post(EDIT, data={"prompt": "x", "model": "gpt-image-1"}, files=files)
    assert response.status_code == 200
    assert [len(f.data) for f in fake.last.files] == [len(big), 10] and fake.last.files[0].data == big


# -- streaming ----------------------------------------------------------------------------------------


def test_stream_generation_partials_then_completed(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    with client.images.generate(
        model="gpt-image-1", prompt="x", stream=True, partial_images=2, size="1024x1024"
    ) as stream:
        events = list(stream)

    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [getattr(e, "partial_image_index", None) for e in events] == [0, 1, None]
    completed = events[-1]
    assert completed.type == "image_generation.completed"
    assert completed.usage.model_dump() == fake.usage and completed.size == "1024x1024"
    assert decode_b64_image(completed.b64_json).size == (1024, 1024)
    assert fake.last.json is not None and fake.last.json["stream"] is True


def test_stream_wire_format(http: httpx.Client) -> None:
    body = {"model": "gpt-image-1", "prompt": "x", "stream": True, "partial_images": 1, "n": 2}
    with http.stream("POST", GEN, json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert [line for line in lines if line.startswith("event:")] == [
        "event: image_generation.partial_image",
        "event: image_generation.completed",
        "event: image_generation.completed",
    ]
    assert all(line.startswith("data: {") for line in lines if not line.startswith("event:"))


def test_stream_edit_events(client: openai.OpenAI) -> None:
    stream = client.images.edit(
        model="gpt-image-1",
        prompt="x",
        image=("a.png", png(64, 64), "image/png"),
        stream=True,
        partial_images=1,
    )
    with stream:
        types = [event.type for event in stream]
    assert types == ["image_edit.partial_image", "image_edit.completed"]


def test_stream_client_disconnect_is_recorded(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.step_streams()  # the second event waits for a step that never comes: the client leaves first
    fake.allow_events(1)
    stream = client.images.generate(model="gpt-image-1", prompt="x", stream=True, partial_images=3)
    with stream:
        first = next(iter(stream))
        assert first.type == "image_generation.partial_image"
    assert fake.wait_for_stream_disconnects(1, timeout=30)
    assert fake.stream_disconnects == 1


def test_huge_completed_event(fake: FakeOpenAI, http: httpx.Client) -> None:
    fake.noise_images = True
    body = {"model": "gpt-image-1", "prompt": "x", "stream": True, "size": "1536x1024"}
    with http.stream("POST", GEN, json=body) as response:
        data = [line for line in response.iter_lines() if line.startswith("data:")]
    assert len(data) == 1 and len(data[0]) > 4_000_000  # an incompressible 1536x1024 PNG, base64


# -- faults -----------------------------------------------------------------------------------------


def test_status_fault_with_retry_after(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fault = Fault.status(429, retry_after=2)
    fake.enqueue_fault(fault, Fault.status(500, "boom"))
    with pytest.raises(openai.RateLimitError) as rate:
        client.images.generate(model="gpt-image-1", prompt="x")
    assert rate.value.response.headers["retry-after"] == "2" and rate.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError) as err:
        client.images.generate(model="gpt-image-1", prompt="x")
    assert (
        err.value.status_code == 500
        and err.value.message.endswith("boom")
        and err.value.type == "server_error"
    )
    assert client.images.generate(model="gpt-image-1", prompt="x").data  # queue drained
    assert fault.fired == 1 and fake.pending_faults == [] and fake.count(GEN) == 3


def test_fault_path_filter_and_times(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fault = Fault.status(503, path=EDIT, times=2)
    fake.enqueue_fault(fault)
    assert client.images.generate(model="gpt-image-1", prompt="x").data
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.images.edit(model="gpt-image-1", prompt="x", image=("a.png", png(8, 8), "image/png"))
    assert client.images.edit(model="gpt-image-1", prompt="x", image=("a.png", png(8, 8), "image/png")).data
    assert fault.fired == 2 and not fake.pending_faults


def test_upstream_moderation_refusal(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.enqueue_fault(Fault.moderation_blocked(stage="output", categories=("violence",)))
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="gpt-image-1", prompt="x")
    assert (info.value.code, info.value.type) == ("moderation_blocked", "image_generation_user_error")
    assert isinstance(info.value.body, dict)
    assert info.value.body["moderation_details"] == {"moderation_stage": "output", "categories": ["violence"]}


def test_always_fail(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.always_fail = Fault.status(502, path=GEN)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            client.images.generate(model="gpt-image-1", prompt="x")
    assert client.models.list().data  # other paths are fine
    assert fake.always_fail.fired == 3
    fake.always_fail = None
    assert client.images.generate(model="gpt-image-1", prompt="x").data


def test_delay_fault_times_out_short_clients_serves_patient_ones(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.enqueue_fault(Fault.delay(60), Fault.delay(0.3))  # the first ends when its client leaves
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).images.generate(model="gpt-image-1", prompt="x")
    started = time.monotonic()
    assert client.images.generate(model="gpt-image-1", prompt="x").data
    assert time.monotonic() - started >= 0.3


def test_delay_does_not_block_other_requests(
    fake: FakeOpenAI, client: openai.OpenAI, http: httpx.Client
) -> None:
    # The delay outlasts any test; it ends when its client hangs up (no clock in the assertions).
    fake.enqueue_fault(Fault.delay(300, path=GEN))
    slow = http_client.HTTPConnection(fake.server.host, fake.server.port, timeout=30)
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    slow.request("POST", GEN, body=b'{"model": "gpt-image-1", "prompt": "x"}', headers=headers)
    assert fake.wait_for_count(1, GEN)
    assert http.get("/v1/models").status_code == 200
    assert fake.in_flight == 1  # answered while the delayed request was still being worked on
    assert fake.max_in_flight >= 2
    slow.close()
    deadline = time.monotonic() + 30  # bounds a failure only
    while fake.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.in_flight == 0
    assert fake.abandoned == [(GEN, None)]


def test_hang_fault_times_out_and_server_stays_up(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.enqueue_fault(Fault.hang())
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).images.generate(model="gpt-image-1", prompt="x")
    assert client.images.generate(model="gpt-image-1", prompt="x").data
    deadline = time.monotonic() + 30
    while fake.in_flight and time.monotonic() < deadline:  # the hang ended when the client left
        time.sleep(0.02)
    assert fake.in_flight == 0


def test_close_fault_is_a_connection_error(
    fake: FakeOpenAI, client: openai.OpenAI, http: httpx.Client
) -> None:
    fake.enqueue_fault(Fault.close(), Fault.close())
    with pytest.raises(openai.APIConnectionError) as info:
        client.images.generate(model="gpt-image-1", prompt="x")
    assert not isinstance(info.value, openai.APITimeoutError)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        http.post(GEN, json={"model": "gpt-image-1", "prompt": "x"})
    assert http.post(GEN, json={"model": "gpt-image-1", "prompt": "x"}).status_code == 200


def test_invalid_json_fault(fake: FakeOpenAI, client: openai.OpenAI, http: httpx.Client) -> None:
    fake.enqueue_fault(Fault.invalid_json(), Fault.invalid_json(b"<html>oops</html>"))
    with pytest.raises(ValueError):  # the SDK lets json.JSONDecodeError through
        client.images.generate(model="gpt-image-1", prompt="x")
    response = http.post(GEN, json={"model": "gpt-image-1", "prompt": "x"})
    assert response.status_code == 200 and response.content == b"<html>oops</html>"


def test_stream_cut_fault(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.enqueue_fault(Fault.stream_cut())
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        with client.images.generate(model="gpt-image-1", prompt="x", stream=True, partial_images=2) as stream:
            received.extend(event.type for event in stream)
    assert received == ["image_generation.partial_image"]
    assert fake.stream_disconnects == 0  # the fake cut it; the client did not leave


def test_stream_cut_on_json_request_truncates_body(fake: FakeOpenAI, http: httpx.Client) -> None:
    fake.enqueue_fault(Fault.stream_cut(path=GEN))
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(GEN, json={"model": "gpt-image-1", "prompt": "x"})


def test_hang_does_not_block_stop() -> None:
    # A hang that held the server would cost the whole 30 s grace: far from a prompt stop, however
    # loaded the machine.
    with FakeOpenAI(graceful_timeout_s=30, shutdown_timeout_s=60) as own:
        own.enqueue_fault(Fault.hang())
        errors: list[BaseException] = []

        def call() -> None:
            try:
                httpx.post(own.base_url + "/models", timeout=30)
            except httpx.HTTPError as exc:
                errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert own.wait_for_count(1)
        started = time.monotonic()
    assert time.monotonic() - started < 15
    caller.join(30)
    assert not caller.is_alive() and len(errors) == 1 and isinstance(errors[0], httpx.RemoteProtocolError)


# -- auth, moderation, models ---------------------------------------------------------------------------


def test_wrong_key_is_401(fake: FakeOpenAI) -> None:
    with openai.OpenAI(base_url=fake.base_url, api_key="sk-wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as info:
            sdk.images.generate(model="gpt-image-1", prompt="x")
    assert info.value.code == "invalid_api_key" and info.value.body == {
        "message": "Incorrect API key provided",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert fake.last.bearer == "sk-wrong"  # recorded even when refused


def test_azure_style_key_and_deployment_path(fake: FakeOpenAI) -> None:
    url = fake.url + "/openai/deployments/my-gpt-image/images/generations?api-version=2025-04-01-preview"
    response = httpx.post(url, headers={"api-key": KEY}, json={"prompt": "x"})
    assert response.status_code == 200 and response.json()["usage"] == fake.usage
    assert fake.last.query == {"api-version": "2025-04-01-preview"} and fake.last.headers["api-key"] == KEY
    assert httpx.post(url, headers={"api-key": "nope"}, json={"prompt": "x"}).status_code == 401


def test_moderation_flagging(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    clean = client.moderations.create(input="a calm lake", model="omni-moderation-latest")
    assert not clean.results[0].flagged and clean.model == "omni-moderation-latest"

    flagged = client.moderations.create(input=["fine", "something FORBIDDEN here"])
    assert [r.flagged for r in flagged.results] == [False, True]
    assert flagged.results[1].categories.violence and not flagged.results[1].categories.hate
    assert flagged.results[1].category_scores.violence > 0.5

    fake.moderation_flag_words = {"kitten"}
    fake.moderation_category = "hate"
    parts = [{"type": "text", "text": "a kitten"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    multimodal = client.moderations.create(input=parts)  # type: ignore[arg-type]
    assert len(multimodal.results) == 1 and multimodal.results[0].categories.hate
    assert fake.last.json == {"input": parts}


def test_models(client: openai.OpenAI) -> None:
    assert "gpt-image-1" in [m.id for m in client.models.list().data]
    assert client.models.retrieve("dall-e-3").id == "dall-e-3"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nope")


def test_requests_snapshot_and_clear(fake: FakeOpenAI, http: httpx.Client) -> None:
    http.get("/v1/models")
    http.post("/v1/moderations", json={"input": "x"})
    assert [r.path for r in fake.requests] == ["/v1/models", "/v1/moderations"]
    assert fake.count() == 2 and fake.count("/v1/models") == 1
    assert fake.requests[0].received_at <= fake.requests[1].received_at
    fake.clear()
    assert fake.requests == [] and fake.count() == 0
    with pytest.raises(AssertionError):
        _ = fake.last


# -- the generic threaded server --------------------------------------------------------------------


def test_threaded_server_runs_any_asgi_app() -> None:
    app = Starlette(routes=[Route("/ping", lambda request: PlainTextResponse("pong"))])
    server = ThreadedServer(app, lifespan="on")
    with server:
        assert server.url == f"http://127.0.0.1:{server.port}" and server.running
        assert httpx.get(server.url + "/ping").text == "pong"
    assert not server.running
    with server:  # restartable
        assert httpx.get(server.url + "/ping").text == "pong"
    server.stop()  # idempotent


def test_b64_payloads_are_plain_base64(client: openai.OpenAI) -> None:
    result = client.images.generate(model="gpt-image-1", prompt="x", size="256x256")
    assert result.data and result.data[0].b64_json
    assert base64.b64decode(result.data[0].b64_json, validate=True).startswith(b"\x89PNG\r\n\x1a\n")
