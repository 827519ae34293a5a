"""Task progress with partial images (issue 16, acceptance 3): an async request that asks for
`partial_images` is streamed from the upstream by its worker, which keeps the latest partial of each
image as a preview behind a signed link in `progress`, and bills the partials as the upstream reported
them. The fake upstream's step gate lets each stream event out only when the test says so."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from app.billing.pricing import PARTIAL_IMAGE_OUTPUT_TOKENS, token_cost
from app.domain.catalog import Catalog
from app.domain.jobs import TokenUsage
from app.tasks import progress
from tests.conftest import Gateway, fake_upstream_config
from tests.fakes import image_files
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.webhook_receiver import WebhookReceiver

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
ASYNC = {"async": "true"}
# What the fake reports on the completed event: OpenAI counts each partial image in the output.
REPORTED = {
    "input_tokens": 37,
    "input_tokens_details": {"text_tokens": 37, "image_tokens": 0},
    "output_tokens": 272 + 2 * PARTIAL_IMAGE_OUTPUT_TOKENS,
    "output_tokens_details": {"text_tokens": 0, "image_tokens": 272 + 2 * PARTIAL_IMAGE_OUTPUT_TOKENS},
    "total_tokens": 37 + 272 + 2 * PARTIAL_IMAGE_OUTPUT_TOKENS,
}
# Bounded waits: each iteration is one request to the gateway (no timers in the assertions).
POLLS = 400


def read_events(url: str, key: str, into: list[tuple[str, dict[str, Any]]], done: threading.Event) -> None:
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as response:
        assert response.status_code == 200
        name = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name is not None:
                into.append((name, json.loads(line.split(":", 1)[1].strip())))
                name = None
    done.set()


class Poller:
    def __init__(self, gw: Gateway, key: str, task_id: str) -> None:
        self.url = gw.url + f"/v1/tasks/{task_id}"
        self.headers = {"Authorization": f"Bearer {key}"}
        self.statuses: list[str] = []

    def get(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(self.url, headers=self.headers).json()
        if not self.statuses or self.statuses[-1] != body["status"]:
            self.statuses.append(body["status"])
        return body

    def until(self, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        for _ in range(POLLS):
            body = self.get()
            if check(body):
                return body
            time.sleep(0.02)  # between requests; the bound is the count
        raise AssertionError(f"the task never got there: {body}")


def wait_until(check: Callable[[], bool]) -> None:
    for _ in range(POLLS):
        if check():
            return
        time.sleep(0.02)
    raise AssertionError("never happened")


def received(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda body: body["progress"].get("partial_images_received") == n


def download(url: str) -> Image.Image:
    response = httpx.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()  # a real, whole image
    return image


def expected_cost(catalog: Catalog, model: str, usage: TokenUsage) -> int:
    caps = catalog.get(model)
    assert caps is not None
    return token_cost(caps, usage)


def without_links(progress: dict[str, Any]) -> dict[str, Any]:
    """Progress minus the signed links (each rendering signs afresh)."""
    previews = [{k: v for k, v in p.items() if k != "url"} for p in progress.get("previews") or []]
    return {**progress, "previews": previews}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


def test_async_partials_advance_in_polls_and_events_with_preview_links(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, catalog: Catalog, receiver: WebhookReceiver
) -> None:
    gw = gateway_with(fake_upstream_config(upstream, timeout_s=300), webhooks={"poll_s": 0.05})
    key, key_id = gw.create_key(name="partials")
    hook = gw.admin("POST", f"/admin/keys/{key_id}/webhooks", json={"url": receiver.url}).json()
    receiver.secret = hook["secret"]
    client = gw.client(key)
    upstream.usage = dict(REPORTED)
    upstream.step_streams()
    raw = client.images.with_raw_response.generate(
        model="gpt-image-1",
        prompt="a lighthouse at dusk",
        size="1024x1536",
        quality="low",
        partial_images=2,
        extra_query=ASYNC,
    )
    assert raw.status_code == 202
    submitted = raw.http_response.json()
    task_id = submitted["id"]
    assert submitted["progress"] == {
        "images": 1,
        "images_completed": 0,
        "partial_images": 2,
        "partial_images_received": 0,
        "previews": [],
    }
    events: list[tuple[str, dict[str, Any]]] = []
    finished = threading.Event()
    threading.Thread(
        target=read_events, args=(gw.url + f"/v1/tasks/{task_id}/events", key, events, finished), daemon=True
    ).start()
    poller = Poller(gw, key, task_id)

    # The worker streams from the upstream, asking for the partials.
    assert upstream.wait_for_count(1, path=GEN, timeout=60)
    sent = upstream.last.json
    assert sent["stream"] is True and sent["partial_images"] == 2

    def streamed(check: Callable[[dict[str, Any]], bool]) -> None:
        wait_until(lambda: any(check(data) for _, data in events))

    previews: list[str] = []
    for step in (1, 2):
        upstream.allow_events(1)  # partial image `step - 1`
        body = poller.until(received(step))
        assert body["status"] == "in_progress" and body["progress"]["images_completed"] == 0
        (preview,) = body["progress"]["previews"]
        assert preview["index"] == 0 and preview["partial_image_index"] == step - 1
        image = download(preview["url"])
        assert image.size == (1024, 1536)
        previews.append(preview["url"])
        streamed(lambda data, step=step: data["progress"].get("partial_images_received") == step)
    # The latest partial replaced the earlier one: its file is gone, its link with it.
    assert httpx.get(previews[0]).status_code == 404

    upstream.allow_events(1)  # the completed image
    final = poller.until(lambda body: body["status"] == "succeeded")
    assert finished.wait(60)
    assert final["progress"]["images_completed"] == 1 and final["progress"]["partial_images_received"] == 2
    (item,) = final["result"]["data"]
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (1024, 1536)
    assert final["result"]["usage"] == REPORTED
    assert final["result"]["size"] == "1024x1536" and final["result"]["output_format"] == "png"

    # The events stream: progress events (the same states as polled, in order), then the final one.
    names = [name for name, _ in events]
    assert names[-1] == "image.task.succeeded" and set(names[:-1]) == {"image.task.progress"}
    counts = [data["progress"]["partial_images_received"] for _, data in events]
    assert counts == sorted(counts) and {1, 2} <= set(counts)
    statuses = [data["status"] for _, data in events]
    statuses = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    for seen in (statuses, poller.statuses):
        assert seen == [s for s in ("queued", "in_progress", "succeeded") if s in seen], seen
    assert events[-1][1]["result"]["usage"] == final["result"]["usage"]
    (delivered,) = receiver.wait_for(1)
    assert delivered.event["type"] == "image.task.succeeded"
    assert without_links(delivered.event["data"]["progress"]) == without_links(final["progress"])
    assert without_links(events[-1][1]["progress"]) == without_links(final["progress"])

    # Billed once, exactly as the fake reported (its output tokens include the two partials).
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    reported = TokenUsage.from_openai(REPORTED)
    assert row["status"] == "succeeded" and row["images"] == 1 and not row["estimated"]
    assert row["image_output_tokens"] == 272 + 2 * PARTIAL_IMAGE_OUTPUT_TOKENS
    assert row["cost_micros"] == expected_cost(catalog, "gpt-image-1", reported)
    assert row["reserved_micros"] >= row["cost_micros"] and row["overrun_micros"] == 0
    assert (
        gw.query(f"SELECT cost_micros FROM tasks WHERE id = '{task_id}'")[0]["cost_micros"]
        == row["cost_micros"]
    )


def test_async_edit_with_partials_and_url_results(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream))
    client = gw.client()
    raw = client.images.with_raw_response.edit(
        model="gpt-image-1",
        image=("a.png", image_files.png(256, 256), "image/png"),
        prompt="add a hat",
        size="1024x1024",
        partial_images=1,
        response_format="url",
        extra_query=ASYNC,
    )
    assert raw.status_code == 202
    poller = Poller(gw, str(client.api_key), raw.http_response.json()["id"])
    final = poller.until(lambda body: body["status"] in ("succeeded", "failed"))
    assert final["status"] == "succeeded", final
    assert upstream.last.form["stream"] == ["true"] and upstream.last.form["partial_images"] == ["1"]
    (preview,) = final["progress"]["previews"]
    assert download(preview["url"]).size == (1024, 1024)
    (item,) = final["result"]["data"]
    assert download(item["url"]).size == (1024, 1024) and "b64_json" not in item


def test_sync_partial_images_without_stream_keeps_the_openai_rule(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    """Synchronous: partial_images takes effect only with stream=true, as before."""
    gw = gateway_with(fake_upstream_config(upstream))
    client = gw.client()
    answer = client.images.generate(model="gpt-image-1", prompt="plain", partial_images=2)
    assert answer.data and answer.data[0].b64_json
    assert "stream" not in upstream.last.json
    try:
        client.images.generate(
            model="gpt-image-1", prompt="x", partial_images=2, stream=True, extra_query=ASYNC
        )
    except openai.BadRequestError as exc:
        assert exc.code == "invalid_value" and exc.param == "stream"
    else:
        raise AssertionError("stream=true with async=true must stay a 400")


def test_failure_mid_stream_bills_the_partials_and_keeps_the_previews(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, catalog: Catalog
) -> None:
    gw = gateway_with(fake_upstream_config(upstream))
    key, key_id = gw.create_key(name="cut")
    upstream.enqueue_fault(Fault.stream_cut(2, path=GEN))  # two partials, then the connection drops
    raw = gw.client(key).images.with_raw_response.generate(
        model="gpt-image-1", prompt="cut short", size="1024x1024", partial_images=3, extra_query=ASYNC
    )
    poller = Poller(gw, key, raw.http_response.json()["id"])
    final = poller.until(lambda body: body["status"] in ("succeeded", "failed"))
    assert final["status"] == "failed" and final["error"]["type"] == "api_error", final
    assert final["progress"]["partial_images_received"] == 2
    (preview,) = final["progress"]["previews"]
    assert preview["partial_image_index"] == 1 and download(preview["url"]).size == (1024, 1024)
    # The relay bills unfinished partials as OpenAI does; one row, charged once, the task agrees.
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    partials = TokenUsage(image_output=2 * PARTIAL_IMAGE_OUTPUT_TOKENS, estimated=True)
    assert row["status"] == "failed" and row["images"] == 0 and row["estimated"]
    assert row["image_output_tokens"] == 2 * PARTIAL_IMAGE_OUTPUT_TOKENS
    assert row["cost_micros"] == expected_cost(catalog, "gpt-image-1", partials)
    task_id = final["id"]
    assert (
        gw.query(f"SELECT cost_micros FROM tasks WHERE id = '{task_id}'")[0]["cost_micros"]
        == row["cost_micros"]
    )


def test_an_upstream_that_cannot_stream_succeeds_without_previews(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, catalog: Catalog
) -> None:
    gw = gateway_with(fake_upstream_config(upstream, stream=False))
    key, key_id = gw.create_key(name="plain")
    raw = gw.client(key).images.with_raw_response.generate(
        model="gpt-image-1", prompt="no stream", n=2, partial_images=2, extra_query=ASYNC
    )
    poller = Poller(gw, key, raw.http_response.json()["id"])
    final = poller.until(lambda body: body["status"] in ("succeeded", "failed"))
    assert final["status"] == "succeeded", final
    assert "stream" not in upstream.last.json
    assert final["progress"] == {
        "images": 2,
        "images_completed": 2,
        "partial_images": 2,
        "partial_images_received": 0,
        "previews": [],
    }
    assert len(final["result"]["data"]) == 2 and final["result"]["usage"] == upstream.usage
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert row["cost_micros"] == expected_cost(catalog, "gpt-image-1", TokenUsage.from_openai(upstream.usage))


def test_a_preview_that_cannot_be_stored_neither_fails_nor_rebills_the_task(
    gateway_with: Callable[..., Gateway],
    upstream: FakeOpenAI,
    catalog: Catalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The image store refuses every preview: the task still succeeds with its result, is billed
    once, and writes its progress at most once per partial plus once per image before the last."""

    async def refuse(*_: Any, **__: Any) -> Any:
        raise OSError("the image store is full")

    writes: list[dict[str, Any]] = []
    write = progress.ProgressRecorder._write

    async def counted(self: progress.ProgressRecorder) -> bool:
        writes.append(self.snapshot())
        return await write(self)

    monkeypatch.setattr(progress, "store_b64", refuse)
    monkeypatch.setattr(progress.ProgressRecorder, "_write", counted)
    gw = gateway_with(fake_upstream_config(upstream))
    key, key_id = gw.create_key(name="no-previews")
    raw = gw.client(key).images.with_raw_response.generate(
        model="gpt-image-1", prompt="store full", n=2, partial_images=2, extra_query=ASYNC
    )
    poller = Poller(gw, key, raw.http_response.json()["id"])
    final = poller.until(lambda body: body["status"] in ("succeeded", "failed"))
    assert final["status"] == "succeeded", final
    assert len(final["result"]["data"]) == 2 and all(i["b64_json"] for i in final["result"]["data"])
    progressed = final["progress"]
    assert progressed["partial_images_received"] == 2 and progressed["previews"] == []
    assert progressed["images_completed"] == 2
    assert [w["partial_images_received"] for w in writes] == [1, 2, 2]  # two partials, image 1 of 2
    assert writes[-1]["images_completed"] == 1
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    usage = TokenUsage.from_openai(upstream.usage)
    assert row["status"] == "succeeded" and row["images"] == 2
    assert row["cost_micros"] == expected_cost(catalog, "gpt-image-1", usage + usage)
