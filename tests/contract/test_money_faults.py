"""Issue 23, money items 3, 4 and 5, end to end: a real gateway (SQLite, and PostgreSQL where the
item touches the database), the fake OpenAI upstream as a real HTTP server, the official SDK.
Each test ends on the ledger invariant (bench/books.py ``ledger_violations``): every row's cost is
its tokens at the catalog's prices, Σ rows = Σ keys' spend, nothing stays reserved.

- Item 3: once the upstream answered, a failure of the image store (here: ENOSPC) is billed, the
  same on every path (sync ``response_format=url``, async with and without previews), and the
  client gets an OpenAI-shaped 500 ``image_store_failed`` naming the failure.
- Item 4: a settlement the database refuses (here: ENOSPC inside the settlement's transaction) is
  retried until written; the request is answered as usual, a task gets its real outcome, and a
  request that stopped waiting (503 ``ledger_unavailable``) still has its hold settled within
  seconds once the database takes writes again.
- Item 5: in a stream whose ``completed`` events carry ``usage`` only for some images, each other
  image is billed at the catalog's estimate and the row is marked estimated.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.billing import ledger as ledger_module
from app.billing.ledger import LedgerService
from app.storage.local import LocalImageStore
from bench.books import ledger_violations
from tests.conftest import Gateway, fake_upstream_config, make_settings, migrate, start_gateway
from tests.fakes.openai_upstream import FakeOpenAI
from tests.services import fresh_postgres_database

GEN = "/v1/images/generations"
LOW_1024 = 272  # the catalog's image output tokens for a low-quality 1024x1024 image
TEXT_IN, IMAGE_IN, IMAGE_OUT = 5, 10, 40  # gpt-image-1, micro-units per token


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        return
    with fresh_postgres_database() as url:
        migrate(url)
        yield url


@pytest.fixture
def gateway_on(tmp_path: Path, upstream: FakeOpenAI) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(db_url: str, **extra: Any) -> Gateway:
        data_dir = tmp_path / f"gw{len(started)}"
        settings = make_settings(
            data_dir, [fake_upstream_config(upstream)], database={"url": db_url}, **extra
        )
        gw = start_gateway(settings, data_dir)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def rows(gw: Gateway, key_id: str) -> list[dict[str, Any]]:
    return [r for r in gw.ledger() if r["key_id"] == key_id]


def wait_task(gw: Gateway, key: str, task_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = httpx.get(gw.url + f"/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}).json()
        return body if body["status"] in ("succeeded", "failed") else None

    task = wait_for(done)
    assert task, f"task {task_id} never finished"
    return task


def submit(gw: Gateway, key: str, **body: Any) -> str:
    answer = httpx.post(
        gw.url + GEN,
        params={"async": "true"},
        json={"model": "gpt-image-1", "prompt": "a lighthouse", **body},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def reported_cost(usage: dict[str, Any]) -> int:
    details_in = usage["input_tokens_details"]
    return (
        details_in["text_tokens"] * TEXT_IN
        + details_in["image_tokens"] * IMAGE_IN
        + usage["output_tokens_details"]["image_tokens"] * IMAGE_OUT
    )


# -- item 3: the image store fails after the upstream answered -----------------------------------------


@pytest.fixture
def full_store(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every image the gateway stores fails as on a full disk; counts the attempts."""
    attempts: list[int] = []

    async def put(self: LocalImageStore, data: bytes, *, content_type: str) -> Any:
        attempts.append(len(data))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalImageStore, "put", put)
    return attempts


def test_a_store_failure_after_the_upstream_answered_is_billed_on_every_path(
    db_url: str, gateway_on: Callable[..., Gateway], upstream: FakeOpenAI, full_store: list[int]
) -> None:
    gw = gateway_on(db_url)
    key, key_id = gw.create_key(name="full-store")
    per_call = reported_cost(upstream.usage)

    # Sync, response_format=url: an OpenAI-shaped 500 naming the failure, not retried by the SDK.
    with pytest.raises(openai.InternalServerError) as failed:
        gw.client(key).with_options(max_retries=2).images.generate(
            model="gpt-image-1", prompt="a lighthouse", response_format="url"
        )
    error = failed.value.body
    assert isinstance(error, dict) and error["code"] == "image_store_failed", error
    assert "No space left on device" in error["message"] and error["type"] == "api_error"
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert upstream.count(GEN) == 1  # not retried: it was charged
    (row,) = rows(gw, key_id)
    assert (row["status"], row["images"], row["error_code"]) == ("failed", 1, "image_store_failed")
    assert int(row["cost_micros"]) == per_call

    # Async, no previews, and async with previews: the task fails naming the store, and is billed.
    for body in ({}, {"partial_images": 1}):
        task = wait_task(gw, key, submit(gw, key, **body))
        assert task["status"] == "failed" and task["error"]["code"] == "image_store_failed", task
        assert "No space left on device" in task["error"]["message"]
    assert [r["status"] for r in rows(gw, key_id)] == ["failed"] * 3
    assert all(int(r["cost_micros"]) > 0 for r in rows(gw, key_id))
    costs = gw.query(f"SELECT cost_micros FROM tasks WHERE key_id = '{key_id}'")
    assert sorted(int(c["cost_micros"]) for c in costs) == sorted(
        int(r["cost_micros"]) for r in rows(gw, key_id)[1:]
    )
    expected = sum(int(r["cost_micros"]) for r in rows(gw, key_id))
    assert ledger_violations(gw.settings.database.url, [key_id], expected) == []
    assert full_store  # the store was tried


# -- item 4: the database refuses the settlement ------------------------------------------------------


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The settlement's transaction fails as on a full disk while ``state["refuse"]`` > 0 (each
    refusal counts one down; -1: until told otherwise). Reservations and task writes still work:
    the fault is on the write that must not be lost."""
    state = {"refuse": 0, "refused": 0}
    original = LedgerService._settle

    def settle(self: LedgerService, *args: Any, **kwargs: Any) -> None:
        if state["refuse"]:
            state["refuse"] -= 1 if state["refuse"] > 0 else 0
            state["refused"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, *args, **kwargs)

    monkeypatch.setattr(LedgerService, "_settle", settle)
    return state


def test_refused_settlements_are_retried_and_written_once(
    db_url: str, gateway_on: Callable[..., Gateway], upstream: FakeOpenAI, refusing: dict[str, int]
) -> None:
    gw = gateway_on(db_url)
    key, key_id = gw.create_key(name="full-db")
    per_call = reported_cost(upstream.usage)

    refusing["refuse"] = 3
    image = gw.client(key).images.generate(model="gpt-image-1", prompt="a lighthouse")
    assert image.data and image.data[0].b64_json
    assert refusing["refused"] == 3

    refusing["refuse"] = 3
    task = wait_task(gw, key, submit(gw, key))
    assert task["status"] == "succeeded", task  # its real outcome, written with its charge
    assert refusing["refused"] == 6

    assert [(r["status"], int(r["cost_micros"])) for r in rows(gw, key_id)] == [("succeeded", per_call)] * 2
    assert ledger_violations(gw.settings.database.url, [key_id], 2 * per_call) == []


def test_a_request_that_stops_waiting_still_has_its_settlement_written(
    db_url: str,
    gateway_on: Callable[..., Gateway],
    upstream: FakeOpenAI,
    refusing: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ledger_module, "SETTLE_PATIENCE_S", 0.2)
    gw = gateway_on(db_url)
    key, key_id = gw.create_key(name="down-db")
    refusing["refuse"] = -1
    with pytest.raises(openai.APIStatusError) as failed:
        gw.client(key).with_options(max_retries=2).images.generate(model="gpt-image-1", prompt="a lighthouse")
    assert failed.value.status_code == 503
    assert isinstance(failed.value.body, dict) and failed.value.body["code"] == "ledger_unavailable"
    assert upstream.count(GEN) == 1
    assert rows(gw, key_id) == [] and len(gw.query("SELECT id FROM reservations")) == 1
    # Kept on disk too, so that the process's death would not lose it (replayed by the reconciler).
    assert (gw.data_dir / "ledger-journal.jsonl").exists()

    refusing["refuse"] = 0  # the disk has room again: the process writes what it kept
    assert wait_for(lambda: len(rows(gw, key_id)) == 1 and not gw.query("SELECT id FROM reservations"))
    per_call = reported_cost(upstream.usage)
    assert ledger_violations(gw.settings.database.url, [key_id], per_call) == []


# -- item 5: some completed events carry usage, some don't ---------------------------------------------


def test_stream_images_without_usage_are_billed_at_the_estimate(
    gateway_on: Callable[..., Gateway], upstream: FakeOpenAI, tmp_path: Path
) -> None:
    gw = gateway_on(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    key, key_id = gw.create_key(name="mixed-usage")
    upstream.usage_on_images = {0}  # image 0's completed event carries usage, image 1's none
    events = list(
        gw.client(key).images.generate(
            model="gpt-image-1", prompt="two boats", n=2, quality="low", size="1024x1024", stream=True
        )
    )
    assert [e.type for e in events].count("image_generation.completed") == 2
    (row,) = rows(gw, key_id)
    reported = upstream.usage["output_tokens_details"]["image_tokens"]
    assert row["images"] == 2 and bool(row["estimated"])
    assert row["image_output_tokens"] == reported + LOW_1024
    expected = reported_cost(upstream.usage) + LOW_1024 * IMAGE_OUT
    assert int(row["cost_micros"]) == expected
    assert ledger_violations(gw.settings.database.url, [key_id], expected) == []
