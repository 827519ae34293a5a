"""Helpers shared by the provider contract tests (Google, FLUX, Stability; issue 19)."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import openai
from PIL import Image

from tests.conftest import Gateway

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
