"""Task progress (issue 16): `progress` in polls, and GET /v1/tasks/{id}/events over SSE reporting the
same states in the same order as polling and the webhook."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import Gateway, fake_upstream_config
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.webhook_receiver import WebhookReceiver

GEN = "/v1/images/generations"
ORDER = ["queued", "in_progress", "succeeded"]


def read_events(url: str, key: str, into: list[tuple[str, dict[str, Any]]], done: threading.Event) -> None:
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        name = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name is not None:
                into.append((name, json.loads(line.split(":", 1)[1].strip())))
                name = None
    done.set()


def test_progress_in_polls_sse_and_webhook_agree(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    receiver = WebhookReceiver().start()
    try:
        gw = gateway_with(fake_upstream_config(upstream, timeout_s=300), webhooks={"poll_s": 0.05})
        key, key_id = gw.create_key(name="progress")
        created = gw.admin("POST", f"/admin/keys/{key_id}/webhooks", json={"url": receiver.url}).json()
        receiver.secret = created["secret"]
        headers = {"Authorization": f"Bearer {key}"}
        upstream.hold(10_000, timeout_s=120)  # the task stays in flight until released
        submitted = httpx.post(
            gw.url + GEN,
            params={"async": "true"},
            json={"model": "gpt-image-1", "prompt": "progress", "n": 2},
            headers=headers,
        ).json()
        task_id = submitted["id"]
        assert submitted["progress"] == {"images": 2, "images_completed": 0}

        events: list[tuple[str, dict[str, Any]]] = []
        finished = threading.Event()
        reader = threading.Thread(
            target=read_events,
            args=(gw.url + f"/v1/tasks/{task_id}/events", key, events, finished),
            daemon=True,
        )
        reader.start()
        polled: list[str] = []

        def poll() -> dict[str, Any]:
            body = httpx.get(gw.url + f"/v1/tasks/{task_id}", headers=headers).json()
            if not polled or polled[-1] != body["status"]:
                polled.append(body["status"])
            return dict(body)

        assert upstream.wait_for_count(1, path=GEN, timeout=60)
        deadline = time.monotonic() + 60
        while poll()["status"] != "in_progress" and time.monotonic() < deadline:
            time.sleep(0.05)
        while not any(e[1]["status"] == "in_progress" for e in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        running = poll()
        assert running["status"] == "in_progress" and running["progress"]["images_completed"] == 0
        upstream.release()
        assert finished.wait(60), events
        final = poll()
        assert final["status"] == "succeeded" and final["progress"] == {"images": 2, "images_completed": 2}

        names = [name for name, _ in events]
        assert names[-1] == "image.task.succeeded" and set(names[:-1]) == {"image.task.progress"}
        streamed = [data["status"] for _, data in events]
        assert streamed[-1] == "succeeded" and streamed[-2] == "in_progress"
        # The same states, in the same order, whichever way they are read.
        for seen in (streamed, polled):
            assert seen == [s for s in ORDER if s in seen], seen
        assert events[-1][1]["progress"] == final["progress"]
        assert events[-1][1]["result"]["usage"] == final["result"]["usage"]
        (hook,) = receiver.wait_for(1)
        assert hook.event["type"] == names[-1]
        assert (
            hook.event["data"]["status"] == "succeeded"
            and hook.event["data"]["progress"] == final["progress"]
        )

        # A finished task's stream gives its final state at once; another key's task is a 404.
        again: list[tuple[str, dict[str, Any]]] = []
        read_events(gw.url + f"/v1/tasks/{task_id}/events", key, again, threading.Event())
        assert [name for name, _ in again] == ["image.task.succeeded"]
        other, _ = gw.create_key(name="other")
        refused = httpx.get(
            gw.url + f"/v1/tasks/{task_id}/events", headers={"Authorization": f"Bearer {other}"}
        )
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    finally:
        receiver.stop()
