"""The client side of a reliability run (issue 10), shared by ``bench/soak.py`` and tests/reliability.

- ``Traffic``: the mixed client load (generations, streams, edits, ``response_format=url``, async tasks)
  sent with httpx at a fixed concurrency; every answer is kept as an ``Outcome`` with what the client
  saw completed (the ``usage`` objects of the responses, completed stream events and task results).
- ``openai_error`` / ``sse_events``: the client's own reading of error bodies and SSE streams
  (deliberately not the gateway's code: the client side must not share the code under test).

What the clients saw is priced and checked against the database in ``bench/books.py``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from PIL import Image

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
MODEL = "gpt-image-1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Codes of the 5xx answers the gateway documents for upstream trouble (README "Errors").
UPSTREAM_CODES = frozenset({"upstream_error", "upstream_unavailable", "upstream_timeout"})
# The statuses the fault-injecting upstreams (tests' FakeOpenAI, bench/upstream.py) answer with
# themselves: when every try of a request draws one of them, the gateway relays the upstream's own
# status (type `server_error`, as the upstream sends it).
FAULT_STATUSES = frozenset({500, 502, 503})


def create_key(base_url: str, admin_key: str, name: str = "reliability") -> tuple[str, str]:
    """A new tenant key through the admin API: (plaintext key, key id)."""
    response = httpx.post(
        base_url + "/admin/keys", json={"name": name}, headers={"Authorization": f"Bearer {admin_key}"}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return body["key"], body["id"]


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Outcome:
    """One request as the client saw it."""

    kind: str
    status: int  # HTTP status; 0 for a transport error
    request_id: str | None = None
    error: Any = None  # the `error` object of an error answer (or of a stream's error event)
    body_ok: bool = True  # an error answer whose body is not OpenAI-shaped sets this False
    completed: list[dict[str, Any]] = field(default_factory=list)  # usage of every completed result
    # Partial images of a stream's unfinished image (after its last completed event), when the
    # stream ended without all its images: billed at 100 image output tokens each.
    unfinished_partials: int = 0
    task_id: str | None = None
    task_status: str | None = None
    detail: str = ""

    @property
    def unexpected_5xx(self) -> bool:
        """A 5xx that is not one of the documented upstream answers."""
        if self.status < 500:
            return False
        error = self.error if isinstance(self.error, dict) else {}
        if error.get("code") in UPSTREAM_CODES:
            return False
        relayed = error.get("type") == "server_error" and self.status in FAULT_STATUSES
        return not relayed


def openai_error(body: Any) -> dict[str, Any] | None:
    """The error object when ``body`` is exactly OpenAI-shaped, else None."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None
    error = body["error"]
    if not {"message", "type", "param", "code"} <= error.keys():
        return None
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return None
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return None
    return error


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body; comment lines (keep-alive pings) are skipped.

    Deliberately not the gateway's own decoder: the client side must not share the code under test.
    """
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events


EDIT_IMAGE = _png(64, 48)


class Traffic:
    """The mixed load. ``kinds`` and their weights are the mix; ``seed`` makes the choice of requests
    reproducible (what they meet at the upstream is up to the fake's own seeded draw)."""

    MIX: tuple[tuple[str, int], ...] = (
        ("generate", 30),
        ("stream", 20),
        ("edit", 15),
        ("edit_stream", 5),
        ("url", 5),
        ("async_generate", 15),
        ("async_edit", 10),
    )

    def __init__(
        self, base_url: str, key: str, *, seed: int = 0, timeout_s: float = 60.0, wait_for_tasks: bool = False
    ) -> None:
        self.base_url = base_url
        # Like an SDK user, poll each submitted task until it ends before sending the next request
        # (else a client submits as fast as the gateway answers 202s, and the queue grows as long
        # as submissions outpace the workers, which no queue survives).
        self.wait_for_tasks = wait_for_tasks
        self.headers = {"Authorization": f"Bearer {key}"}
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.outcomes: list[Outcome] = []
        self.stopped = False  # set to end a run early (its requests in flight still finish)
        self._sent = 0

    async def run(
        self, *, requests: int | None = None, seconds: float | None = None, concurrency: int = 50
    ) -> list[Outcome]:
        """Send ``requests`` requests (or for ``seconds``) at ``concurrency``; returns their outcomes."""
        assert requests is not None or seconds is not None
        deadline = time.monotonic() + seconds if seconds is not None else None
        budget = requests
        kinds, weights = zip(*self.MIX, strict=True)
        new: list[Outcome] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout_s, limits=limits
        ) as client:

            async def worker() -> None:
                nonlocal budget
                while True:
                    if budget is not None:
                        if budget <= 0:
                            return
                        budget -= 1
                    if self.stopped or (deadline is not None and time.monotonic() >= deadline):
                        return
                    kind = self.rng.choices(kinds, weights)[0]
                    self._sent += 1
                    new.append(await self.one(client, kind, self._sent))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.outcomes.extend(new)
        return new

    async def one(self, client: httpx.AsyncClient, kind: str, index: int) -> Outcome:
        prompt = f"reliability {kind} {index}"
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "quality": "low", "size": "1024x1024"}
        try:
            if kind in ("generate", "url", "async_generate"):
                body["n"] = 1 + index % 2
                if kind == "url":
                    body["response_format"] = "url"
                params = {"async": "true"} if kind == "async_generate" else None
                return await self._json(client, kind, client.post(GEN, json=body, params=params))
            if kind == "stream":
                body.update(stream=True, partial_images=index % 3)
                return await self._stream(kind, client.stream("POST", GEN, json=body))
            fields = {"model": MODEL, "prompt": prompt, "quality": "low"}
            files = {"image": ("in.png", EDIT_IMAGE, "image/png")}
            if kind == "edit_stream":
                fields.update(stream="true", partial_images="1")
                request = client.stream("POST", EDIT, data=fields, files=files)
                return await self._stream(kind, request)
            params = {"async": "true"} if kind == "async_edit" else None
            return await self._json(client, kind, client.post(EDIT, data=fields, files=files, params=params))
        except httpx.TransportError as exc:
            return Outcome(kind, 0, detail=repr(exc))

    async def _json(self, client: httpx.AsyncClient, kind: str, sending: Any) -> Outcome:
        response: httpx.Response = await sending
        outcome = Outcome(kind, response.status_code, response.headers.get("x-request-id"))
        try:
            payload = response.json()
        except ValueError:
            outcome.body_ok = False
            outcome.detail = response.text[:300]
            return outcome
        if response.status_code >= 400:
            outcome.error = openai_error(payload)
            outcome.body_ok = outcome.error is not None
            outcome.detail = response.text[:300]
        elif response.status_code == 202:
            outcome.task_id = payload["id"]
            if self.wait_for_tasks:
                await self._wait(client, outcome)
        else:
            outcome.completed.append(payload["usage"])
            if kind == "url":
                await self._fetch_links(client, outcome, payload)
        return outcome

    async def _fetch_links(
        self, client: httpx.AsyncClient, outcome: Outcome, payload: dict[str, Any]
    ) -> None:
        """`response_format=url`: the links must serve the stored images."""
        for item in payload["data"]:
            link = await client.get(item["url"])
            if link.status_code != 200 or not link.content.startswith(PNG_SIGNATURE):
                outcome.body_ok = False
                outcome.detail = f"link {item['url']} answered {link.status_code}"

    async def _stream(self, kind: str, sending: Any) -> Outcome:
        async with sending as response:
            outcome = Outcome(kind, response.status_code, response.headers.get("x-request-id"))
            text = (await response.aread()).decode()
        if response.status_code != 200:
            try:
                outcome.error = openai_error(orjson.loads(text))
            except orjson.JSONDecodeError:
                outcome.error = None
            outcome.body_ok = outcome.error is not None
            outcome.detail = text[:300]
            return outcome
        partials = 0
        for name, data in sse_events(text):
            event = orjson.loads(data)
            if name.endswith(".completed"):
                outcome.completed.append(event["usage"])
                base64.b64decode(event["b64_json"], validate=True)
                partials = 0
            elif name.endswith(".partial_image"):
                partials += 1
            elif name == "error":
                outcome.error = openai_error(event)
                outcome.body_ok = outcome.error is not None and event.get("type") == "error"
                outcome.unfinished_partials = partials
        return outcome

    async def _wait(self, client: httpx.AsyncClient, outcome: Outcome, poll_s: float = 0.25) -> None:
        while outcome.task_status is None:
            await asyncio.sleep(poll_s)
            self._record(outcome, (await client.get(f"/v1/tasks/{outcome.task_id}")).json())

    @staticmethod
    def _record(outcome: Outcome, task: dict[str, Any]) -> None:
        """A finished task's outcome (its result's usage is billed); nothing while it runs."""
        if task["status"] == "succeeded":
            outcome.task_status = "succeeded"
            outcome.completed.append(task["result"]["usage"])
        elif task["status"] == "failed":
            outcome.task_status = "failed"
            outcome.error = task.get("error")

    async def settle_tasks(self, *, timeout_s: float = 120.0) -> list[Outcome]:
        """Poll every submitted task until it ends; records its result's usage. Returns those still
        open at the deadline (none, when the queue works)."""
        pending = [o for o in self.outcomes if o.task_id is not None and o.task_status is None]
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=30) as client:
            while pending and time.monotonic() < deadline:
                still = []
                for outcome in pending:
                    self._record(outcome, (await client.get(f"/v1/tasks/{outcome.task_id}")).json())
                    if outcome.task_status is None:
                        still.append(outcome)
                pending = still
                if pending:
                    await asyncio.sleep(0.2)
        return pending


def summary(outcomes: Sequence[Outcome]) -> str:
    """A one-line count of outcomes by kind and status, for failure messages and the soak's log."""
    counts = Counter(f"{o.kind}:{o.task_status or o.status}" for o in outcomes)
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
