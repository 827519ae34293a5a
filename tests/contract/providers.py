"""Helpers shared by the provider contract tests (Google, FLUX, Stability, fal.ai, Replicate)."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
from PIL import Image

from tests.conftest import Gateway
from tests.fakes.provider_fake import ProviderFake

ASYNC = {"async": "true"}
# The catalog's prices in micro-units per 1M tokens (gemini-2.5-flash-image) and per image.
GEMINI_FLASH_PRICES = {
    "text_input": 300_000,
    "image_input": 300_000,
    "text_output": 2_500_000,
    "image_output": 30_000_000,
}


def decoded(b64: str | None) -> Image.Image:
    assert b64
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def token_cost(prices: dict[str, int], row: dict[str, Any]) -> int:
    numerator = sum(int(row[f"{kind}_tokens"]) * price for kind, price in prices.items())
    return -(-numerator // 1_000_000)


def poll_task(client: openai.OpenAI, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task = client.get(f"/tasks/{task_id}", cast_to=object)
        assert isinstance(task, dict)
        if task["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return task
        time.sleep(0.05)


def uncharged(gw: Gateway, key_id: str) -> None:
    """The key spent nothing and holds nothing; its ledger rows (if any) cost nothing."""
    rows = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert all(int(r["cost_micros"]) == 0 and int(r["images"]) == 0 for r in rows), rows
    assert int(gw.key_row(key_id)["spent_micros"]) == 0
    assert gw.query(f"SELECT * FROM reservations WHERE key_id = '{key_id}'") == []


def books_violations(gw: Gateway, key_ids: list[str]) -> list[str]:
    """The money invariant for provider models, as messages (empty: it holds): each ledger row costs
    its tokens at the catalog's token prices (Gemini) or its images at the per-image price (the
    others), rows without images cost nothing, Σ ledger = the keys' spend, nothing stays held."""
    from app.domain.catalog import Catalog
    from tests.conftest import MODELS_FILE

    catalog = Catalog.from_file(MODELS_FILE)
    problems: list[str] = []
    for key_id in key_ids:
        rows = [r for r in gw.ledger() if r["key_id"] == key_id]
        for row in rows:
            caps = catalog.get(row["model"])
            assert caps is not None
            if caps.prices.per_image:
                # Priced by size (FLUX.2, fal): the row does not keep the size, so the cost must be
                # the images at one of the table's prices.
                prices_by_size = {p for table in caps.prices.per_image.values() for p in table.values()}
                costs = {int(row["images"]) * price for price in prices_by_size}
                if int(row["cost_micros"]) not in costs:
                    problems.append(
                        f"{row['model']} row {row['request_id']}: {row['cost_micros']} not in {costs}"
                    )
                continue
            else:
                prices = caps.prices
                per_kind = {
                    "text_input": prices.text_input,
                    "image_input": prices.image_input,
                    "text_output": prices.text_output,
                    "image_output": prices.image_output,
                }
                expected = token_cost(per_kind, row) if int(row["images"]) else 0
            if int(row["cost_micros"]) != expected:
                problems.append(f"{row['model']} row {row['request_id']}: {row['cost_micros']} != {expected}")
        key = gw.key_row(key_id)
        if int(key["spent_micros"]) != sum(int(r["cost_micros"]) for r in rows):
            problems.append(f"key {key_id}: spent {key['spent_micros']} != ledger")
        if int(key["reserved_micros"]) != 0:
            problems.append(f"key {key_id}: {key['reserved_micros']} still reserved")
        if gw.query(f"SELECT id FROM reservations WHERE key_id = '{key_id}'"):
            problems.append(f"key {key_id}: reservations left")
    return problems


@dataclass
class Resumed:
    """What ``resume_after_kill`` saw: the task's last state and the books of its database."""

    task: dict[str, Any]
    provider_job: dict[str, Any]
    ledger: list[dict[str, Any]]
    key: dict[str, Any]


def resume_after_kill(
    fake: ProviderFake, upstream: dict[str, Any], request: dict[str, Any], tmp_path: Path, *, poll_path: str
) -> Resumed:
    """An async task on a gateway process that is SIGKILLed once the provider accepted the job,
    recorded it on the task and is being polled (``fake.hold`` keeps it running); then a second
    process over the same database finishes the task. The caller counts the submissions."""
    from bench.books import query
    from bench.gateway_process import GatewayProcess
    from tests.conftest import ADMIN_KEY

    db_url = f"sqlite+aiosqlite:///{tmp_path / 'resume.db'}"
    config = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(tmp_path / "data"),
        "database": {"url": db_url},
        "logging": {"level": "WARNING"},
        "upstreams": [{**upstream, "poll_budget_s": 60}],
        "tasks": {"lease_s": 1, "poll_s": 0.1, "workers": 1},
    }
    fake.hold.set()  # type: ignore[attr-defined]
    first = GatewayProcess(config, tmp_path).wait_ready()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(first.url + "/admin/keys", json={"name": "resume"}, headers=admin).json()
    headers = {"Authorization": f"Bearer {created['key']}"}
    answer = httpx.post(first.url + "/v1/images/generations", params=ASYNC, json=request, headers=headers)
    task_id = answer.json()["id"]
    # Accepted upstream, recorded on the task, being polled: kill now.
    assert fake.wait_for_count(1, poll_path, timeout=30)
    (row,) = query(db_url, f"SELECT provider_job, dispatched_at FROM tasks WHERE id = '{task_id}'")
    assert row["provider_job"] and row["dispatched_at"], row
    first.kill()
    fake.hold.clear()  # type: ignore[attr-defined]
    second = GatewayProcess(config, tmp_path).wait_ready()
    try:
        task = poll_http(second.url + f"/v1/tasks/{task_id}", headers)
    finally:
        second.stop()
    (row,) = query(db_url, f"SELECT provider_job FROM tasks WHERE id = '{task_id}'")
    recorded = row["provider_job"]
    return Resumed(
        task=task,
        provider_job=orjson.loads(recorded) if isinstance(recorded, str | bytes) else recorded,
        ledger=query(db_url, "SELECT status, images, cost_micros, upstream FROM ledger_entries"),
        key=query(db_url, f"SELECT spent_micros, reserved_micros FROM api_keys WHERE id = '{created['id']}'")[
            0
        ],
    )


def poll_http(url: str, headers: dict[str, str], timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        task = httpx.get(url, headers=headers).json()
        if task["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    return task
