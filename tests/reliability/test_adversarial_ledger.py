"""The ledger invariant under adversarial usage (issue 15), on SQLite and on PostgreSQL.

The fake upstream reports usage above, below and without the catalog's estimate, and partial detail
objects; some streams end before their images complete; clients leave at every stage (before the
upstream answers, while its body arrives, while URL images are stored, mid-stream after a partial
image); async tasks run beside them, some streamed for their partial images (some cut short); and
keys with a quota or a balance are pushed past them by upstreams billing more than their holds.
Afterwards, exactly, in micro-units:

- Σ ledger costs = Σ keys' spend = the price of what the upstream billed for the calls that
  completed (computed here from what the fake was told to report, not from the gateway's code),
  plus the documented charge for partial images of streams that did not complete;
- every row's cost is its tokens at the catalog's prices; nothing stays reserved;
- no key ends over its quota or balance by more than the overruns recorded on its rows.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app.images.service import ImageService
from bench.books import PRICE_IMAGE_IN, PRICE_IMAGE_OUT, PRICE_TEXT_IN, ledger_violations, open_tasks
from bench.traffic import sse_events
from tests.conftest import Gateway, fake_upstream_config, make_settings, migrate, start_gateway
from tests.fakes import image_files
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.services import fresh_postgres_database

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
PARTIAL_TOKENS = 100  # OpenAI bills a streamed partial image as 100 image output tokens
LOW_1024 = 272  # the catalog's image output tokens for low 1024x1024 (estimates)
EDIT_INPUT = 1024  # the catalog's image input tokens per input image at low fidelity

# What the fake reports, by the variant written in the prompt.
USAGES: dict[str, dict[str, Any] | None] = {
    "above": {
        "input_tokens": 100,
        "input_tokens_details": {"text_tokens": 100, "image_tokens": 0},
        "output_tokens": 900,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 900},
        "total_tokens": 1000,
    },
    "below": {
        "input_tokens": 3,
        "input_tokens_details": {"text_tokens": 3, "image_tokens": 0},
        "output_tokens": 100,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 100},
        "total_tokens": 103,
    },
    "none": None,
    "partial_out": {
        "input_tokens": 20,
        "output_tokens": 500,
        "output_tokens_details": {"reasoning_tokens": 0},
    },
    "partial_in": {"input_tokens": 40, "input_tokens_details": {"image_tokens": 10}, "output_tokens": 300},
}


def variant_of(params: dict[str, Any]) -> str:
    return str(params.get("prompt", "")).split()[1]


def kind_of(params: dict[str, Any]) -> str:
    return str(params.get("prompt", "")).split()[2]


def billed_tokens(usage: dict[str, Any] | None, prompt: str, images: int, edit: bool) -> int:
    """The price of one answer's usage (the oracle, written from OpenAI's usage semantics: a detail
    that is missing is its total minus the known ones); without usage, the catalog's estimate."""
    if usage is None:
        text_in = math.ceil(len(prompt) / 4)
        return (
            text_in * PRICE_TEXT_IN
            + (EDIT_INPUT if edit else 0) * PRICE_IMAGE_IN
            + LOW_1024 * images * PRICE_IMAGE_OUT
        )
    details_in = usage.get("input_tokens_details") or {}
    image_in = details_in.get("image_tokens", 0)
    text_in = details_in.get("text_tokens", usage["input_tokens"] - image_in)
    details_out = usage.get("output_tokens_details") or {}
    text_out = details_out.get("text_tokens", 0)
    image_out = details_out.get("image_tokens", usage["output_tokens"] - text_out)
    assert text_out == 0, "gpt-image-1 has no text output price"
    return text_in * PRICE_TEXT_IN + image_in * PRICE_IMAGE_IN + image_out * PRICE_IMAGE_OUT


@dataclass
class Seen:
    """What the test expects one request to have cost, once it is over."""

    kind: str
    key: str
    expected: int = 0
    status: int = 0
    detail: str = ""
    # A call whose completion only the upstream knows (the client left as it answered).
    delivered: Callable[[], bool] | None = None
    expected_if_delivered: int = 0

    def cost(self) -> int:
        if self.delivered is None:
            return self.expected
        return self.expected_if_delivered if self.delivered() else 0


@dataclass
class Run:
    gw: Gateway
    upstream: FakeOpenAI
    storing: set[str]
    results: list[Seen] = field(default_factory=list)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'adversarial.db'}"
        return
    with fresh_postgres_database() as url:
        migrate(url)
        yield url


@pytest.fixture
def run(db_url: str, upstream: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    storing: set[str] = set()
    lock = threading.Lock()
    as_urls = ImageService._as_urls

    def slow_urls(self: ImageService, job: Any, base_url: str) -> Any:
        finish = as_urls(self, job, base_url)

        async def slow(body: dict[str, Any]) -> Any:
            with lock:
                storing.add(job.prompt)
            await asyncio.sleep(1.0)  # storing the images takes a while: some clients leave now
            return await finish(body)

        return slow

    monkeypatch.setattr(ImageService, "_as_urls", slow_urls)

    def fault_for(params: dict[str, Any]) -> Fault | None:
        kind = kind_of(params) if len(str(params.get("prompt", "")).split()) > 2 else ""
        if kind == "leave_before":
            return Fault.delay(30)
        if kind == "leave_body":
            return Fault.slow_body(3)
        if kind.startswith(("stream_end", "async_partials_end")):
            return Fault.stream_end(int(kind[-1]))
        return None

    upstream.usage_for = lambda params: USAGES[variant_of(params)]
    upstream.fault_for = fault_for
    upstream.stream_delay_for = lambda params: 30.0 if kind_of(params) == "leave_stream" else 0.0
    data_dir = tmp_path / "gw"
    gw = start_gateway(
        make_settings(
            data_dir,
            [fake_upstream_config(upstream, timeout_s=60)],
            database={"url": db_url},
            logging={"level": "WARNING"},
            tasks={"workers": 2, "poll_s": 0.05},
        ),
        data_dir,
    )
    yield Run(gw=gw, upstream=upstream, storing=storing)
    gw.close()


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "the condition never came"
        await asyncio.sleep(0.02)


async def leave_when(request: Any, ready: Callable[[], bool]) -> None:
    """Send ``request`` and hang up (cancel it: httpx closes the connection) once ``ready``."""
    task = asyncio.ensure_future(request)
    try:
        await until(ready)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class Client:
    def __init__(self, run: Run, client: httpx.AsyncClient) -> None:
        self.run, self.client = run, client

    def recorded(self, prompt: str) -> bool:
        return any(
            (r.json or {}).get("prompt") == prompt or r.field("prompt") == prompt
            for r in self.run.upstream.requests
        )

    async def one(self, key: str, kind: str, variant: str, index: int) -> Seen:
        prompt = f"adv {variant} {kind} {index}"
        usage = USAGES[variant]
        seen = Seen(kind, key)
        headers = {"Authorization": f"Bearer {key}"}
        body: dict[str, Any] = {
            "model": "gpt-image-1",
            "prompt": prompt,
            "quality": "low",
            "size": "1024x1024",
        }
        edit_fields = {"model": "gpt-image-1", "prompt": prompt, "quality": "low"}
        files = {"image": ("in.png", image_files.png(32, 32), "image/png")}
        post = self.client.post
        if kind in ("sync", "url", "async"):
            n = 1 + index % 2
            body["n"] = n
            if kind == "url":
                body["response_format"] = "url"
            params = {"async": "true"} if kind == "async" else None
            response = await post(GEN, json=body, params=params, headers=headers)
            await self._json(seen, response, headers, billed_tokens(usage, prompt, n, edit=False))
        elif kind in ("edit", "async_edit"):
            params = {"async": "true"} if kind == "async_edit" else None
            response = await post(EDIT, data=edit_fields, files=files, params=params, headers=headers)
            await self._json(seen, response, headers, billed_tokens(usage, prompt, 1, edit=True))
        elif kind in ("stream", "stream_n2") or kind.startswith("stream_end"):
            n = 2 if kind == "stream_n2" else 1
            body.update(stream=True, partial_images=2, n=n)
            async with self.client.stream("POST", GEN, json=body, headers=headers) as answer:
                seen.status = answer.status_code
                text = (await answer.aread()).decode()
            if seen.status == 200:
                events = sse_events(text)
                completed = sum(1 for name, _ in events if name.endswith(".completed"))
                partials = sum(1 for name, _ in events if name.endswith(".partial_image"))
                if kind.startswith("stream_end"):
                    assert completed == 0 and events[-1][0] == "error", text[-300:]
                    seen.expected = partials * PARTIAL_TOKENS * PRICE_IMAGE_OUT
                else:
                    assert completed == n, text[-300:]
                    # Each completed event carries the usage of its image.
                    seen.expected = (
                        billed_tokens(usage, prompt, n, edit=False)
                        if usage is None
                        else n * billed_tokens(usage, prompt, 1, edit=False)
                    )
                    last = orjson.loads([data for name, data in events if name.endswith(".completed")][-1])
                    assert last["gateway_cost"] == f"{seen.expected / 1e6:.6f}"
        elif kind.startswith("async_partials"):
            # Streamed by the worker for its previews (issue 16): billed like a stream.
            n = 1 + index % 2 if kind == "async_partials" else 1
            body.update(partial_images=2, n=n)
            response = await post(GEN, json=body, params={"async": "true"}, headers=headers)
            seen.status = response.status_code
            if response.status_code != 202:
                seen.detail = response.text[:300]
                return seen
            task = await self._finished(response.json()["id"], headers)
            if kind == "async_partials":
                assert task["status"] == "succeeded", task
                assert task["progress"]["partial_images_received"] == 2, task["progress"]
                seen.expected = (
                    billed_tokens(usage, prompt, n, edit=False)
                    if usage is None
                    else n * billed_tokens(usage, prompt, 1, edit=False)
                )
            else:
                cut = int(kind[-1])  # partial images sent before the stream ended
                assert task["status"] == "failed", task
                assert task["progress"]["partial_images_received"] == cut, task["progress"]
                seen.expected = cut * PARTIAL_TOKENS * PRICE_IMAGE_OUT
        elif kind == "leave_before":
            await leave_when(post(GEN, json=body, headers=headers), lambda: self.recorded(prompt))
        elif kind == "leave_body":
            answered = lambda: any(p.get("prompt") == prompt for p in self.run.upstream.slow_answers)  # noqa: E731
            await leave_when(post(GEN, json=body, headers=headers), answered)
            # The client left after the headers; whether the gateway had read them by then is up
            # to scheduling. The upstream knows whether its call completed (the body went out):
            # that is what is billed.
            seen.delivered = lambda: any(p.get("prompt") == prompt for p in self.run.upstream.slow_delivered)
            seen.expected_if_delivered = billed_tokens(usage, prompt, 1, edit=False)
        elif kind == "leave_store":
            body.update(response_format="url", n=2)
            await leave_when(post(GEN, json=body, headers=headers), lambda: prompt in self.run.storing)
            seen.expected = billed_tokens(usage, prompt, 2, edit=False)
        elif kind == "leave_stream":
            body.update(stream=True, partial_images=2)
            async with self.client.stream("POST", GEN, json=body, headers=headers) as answer:
                async for line in answer.aiter_lines():
                    if line.startswith("data:"):
                        break  # the first partial image: hang up
            seen.expected = PARTIAL_TOKENS * PRICE_IMAGE_OUT
        else:
            raise AssertionError(kind)
        return seen

    async def _json(self, seen: Seen, response: httpx.Response, headers: dict[str, str], cost: int) -> None:
        seen.status = response.status_code
        if response.status_code == 200:
            seen.expected = cost
            assert response.headers["x-gateway-cost"] == f"{cost / 1e6:.6f}", response.headers
        elif response.status_code == 202:
            task = await self._finished(response.json()["id"], headers)
            assert task["status"] == "succeeded", task
            seen.expected = cost
        else:
            seen.detail = response.text[:300]

    async def _finished(self, task_id: str, headers: dict[str, str]) -> dict[str, Any]:
        while True:
            task: dict[str, Any] = (await self.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
            if task["status"] in ("succeeded", "failed"):
                return task
            await asyncio.sleep(0.05)


OPEN_KINDS = (
    ("sync", 4),
    ("url", 2),
    ("edit", 2),
    ("async", 3),
    ("async_edit", 2),
    ("async_partials", 2),
    ("async_partials_end1", 1),
    ("stream", 3),
    ("stream_n2", 1),
    ("stream_end1", 1),
    ("stream_end2", 1),
    ("leave_before", 1),
    ("leave_body", 1),
    ("leave_store", 1),
    ("leave_stream", 1),
)
LIMITED_KINDS = (("sync", 3), ("stream", 2), ("async", 2), ("edit", 1), ("async_partials", 1))


async def drive(run: Run, keys: dict[str, str], seed: int) -> list[Seen]:
    rng = random.Random(seed)
    plan: list[tuple[str, str, str]] = []
    for _ in range(150):
        kind = rng.choices([k for k, _ in OPEN_KINDS], [w for _, w in OPEN_KINDS])[0]
        plan.append((keys["open"], kind, rng.choice(list(USAGES))))
    for name in ("quota", "balance"):
        for _ in range(24):
            kind = rng.choices([k for k, _ in LIMITED_KINDS], [w for _, w in LIMITED_KINDS])[0]
            plan.append((keys[name], kind, "above"))  # every call bills more than its hold
    rng.shuffle(plan)
    queue: asyncio.Queue[tuple[int, tuple[str, str, str]]] = asyncio.Queue()
    for item in enumerate(plan):
        queue.put_nowait(item)
    results: list[Seen] = []
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=run.gw.url, timeout=120, limits=limits) as http:
        client = Client(run, http)

        async def worker() -> None:
            while not queue.empty():
                index, (key, kind, variant) = queue.get_nowait()
                results.append(await client.one(key, kind, variant, index))

        await asyncio.gather(*(worker() for _ in range(12)))
    return results


def test_the_ledger_invariant_holds_exactly_under_adversarial_usage(run: Run, db_url: str) -> None:
    gw = run.gw
    keys: dict[str, str] = {}
    ids: dict[str, str] = {}
    for name, limits in (("open", {}), ("quota", {"quota": "0.2"}), ("balance", {"balance": "0.15"})):
        keys[name], ids[name] = gw.create_key(name=f"adversarial-{name}", **limits)
    results = asyncio.run(drive(run, keys, seed=15))

    unexpected = [
        s
        for s in results
        if s.status not in (0, 200, 202) and not (s.key != keys["open"] and s.status == 429)
    ]
    assert not unexpected, unexpected[:5]
    limited = [s for s in results if s.key != keys["open"]]
    assert any(s.status == 429 for s in limited), "the limited keys were never refused"
    assert any(s.status in (200, 202) for s in limited)

    def settled() -> bool:
        rows = gw.query("SELECT COUNT(*) AS n FROM reservations")
        return int(rows[0]["n"]) == 0 and open_tasks(db_url) == 0

    deadline = time.monotonic() + 60
    while not settled():
        assert time.monotonic() < deadline, "holds or tasks were left open"
        time.sleep(0.1)
    expected = sum(s.cost() for s in results)
    assert ledger_violations(db_url, list(ids.values()), expected) == []
    for name, bound in (("quota", 200_000), ("balance", 150_000)):
        key_id = ids[name]
        rows = [r for r in gw.ledger() if r["key_id"] == key_id]
        overruns = sum(int(r["overrun_micros"]) for r in rows)
        spent = int(gw.key_row(key_id)["spent_micros"])
        assert overruns > 0
        assert spent <= bound + overruns, (name, spent, overruns)
        assert spent == sum(s.cost() for s in results if s.key == keys[name])
    # Every kind of ending happened and was billed as documented.
    statuses = {r["status"] for r in gw.ledger()}
    assert {"succeeded", "failed", "cancelled"} <= statuses
