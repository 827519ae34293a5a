"""The books of a reliability run (issue 10): what the clients saw complete, priced, against what the
gateway's database says, exactly in micro-units. Shared by ``bench/soak.py`` and tests/reliability.

The price oracle is written out here from the catalog's published prices (SPEC §3) on purpose, so
that a pricing bug in ``app/billing`` cannot cancel itself out in the comparison.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.traffic import Outcome

# gpt-image-1, in micro-units of the price unit per token (= PTC per 1M tokens): text in 5, image
# in 10, text out — (none), image out 40.
PRICE_TEXT_IN, PRICE_IMAGE_IN, PRICE_IMAGE_OUT = 5, 10, 40


def query(url: str, sql: str) -> list[dict[str, Any]]:
    """Rows as dicts from the gateway's database (SQLite file or PostgreSQL), read directly."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.split("///", 1)[1]) as connection:
            connection.row_factory = sqlite3.Row
            return [dict(row) for row in connection.execute(sql).fetchall()]

    async def fetch() -> list[dict[str, Any]]:
        import asyncpg

        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return [dict(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    return asyncio.run(fetch())


def usage_cost(usage: dict[str, Any]) -> int:
    """What ``usage`` costs on gpt-image-1, in micro-units (no rounding: integer prices per token)."""
    details_in = usage.get("input_tokens_details") or {}
    details_out = usage.get("output_tokens_details") or {}
    assert not details_out.get("text_tokens"), "gpt-image-1 has no text output price"
    image_out = details_out.get("image_tokens", usage.get("output_tokens", 0))
    return (
        details_in.get("text_tokens", 0) * PRICE_TEXT_IN
        + details_in.get("image_tokens", 0) * PRICE_IMAGE_IN
        + image_out * PRICE_IMAGE_OUT
    )


def leftover_files(data_dir: Path) -> list[Path]:
    """Files left in the upload spool and the task inputs (both must be empty once all is done)."""
    return [p for sub in ("spool", "task_inputs") for p in (data_dir / sub).rglob("*") if p.is_file()]


def expected_micros(outcomes: Iterable[Outcome]) -> int:
    return sum(
        sum(usage_cost(usage) for usage in outcome.completed)
        + outcome.unfinished_partials * 100 * PRICE_IMAGE_OUT
        for outcome in outcomes
    )


def ledger_violations(
    db_url: str, key_ids: Sequence[str], expected: int | None, *, tolerated_holds: Sequence[str] = ()
) -> list[str]:
    """Every way the money invariant is broken, as messages (empty: it holds).

    - each ledger row's cost is its tokens at the catalog's prices (exact, micro-units), and a row
      with no image costs nothing;
    - Σ ledger costs = Σ ``api_keys.spent_micros`` = Σ monthly periods' spend, per key;
    - nothing stays reserved: ``reserved_micros`` is 0 and no reservation row is left (but the
      ``tolerated_holds``, whose amounts may stay reserved);
    - Σ ledger costs = ``expected`` (the usage the clients saw completed), when given.
    """
    problems: list[str] = []
    keys = "', '".join(key_ids)
    rows = query(
        db_url,
        "SELECT request_id, key_id, status, images, text_input_tokens, image_input_tokens, "
        "text_output_tokens, image_output_tokens, cost_micros FROM ledger_entries "
        f"WHERE key_id IN ('{keys}')",
    )
    for row in rows:
        tokens_cost = (
            row["text_input_tokens"] * PRICE_TEXT_IN
            + row["image_input_tokens"] * PRICE_IMAGE_IN
            + row["image_output_tokens"] * PRICE_IMAGE_OUT
        )
        if int(row["cost_micros"]) != tokens_cost:
            problems.append(
                f"ledger row {row['request_id']} costs {row['cost_micros']}, tokens say {tokens_cost}"
            )
        # A stream cut after some completed images is billed for those (status failed or cancelled),
        # and for the partial images of an unfinished one: 100 image output tokens each.
        if int(row["images"]) == 0 and int(row["image_output_tokens"]) % 100:
            problems.append(f"ledger row {row['request_id']} has no image but bills a non-partial amount")
    ledger_total = sum(int(r["cost_micros"]) for r in rows)
    key_rows = query(db_url, f"SELECT id, spent_micros, reserved_micros FROM api_keys WHERE id IN ('{keys}')")
    spent = sum(int(r["spent_micros"]) for r in key_rows)
    if ledger_total != spent:
        problems.append(f"ledger total {ledger_total} != keys' spend {spent}")
    periods = query(
        db_url, f"SELECT spent_micros, reserved_micros FROM key_periods WHERE key_id IN ('{keys}')"
    )
    if sum(int(p["spent_micros"]) for p in periods) != spent:
        problems.append(f"monthly periods' spend {sum(int(p['spent_micros']) for p in periods)} != {spent}")
    holds = query(
        db_url, f"SELECT id, request_id, amount_micros FROM reservations WHERE key_id IN ('{keys}')"
    )
    tolerated = sum(int(h["amount_micros"]) for h in holds if h["id"] in tolerated_holds)
    for what, rows_reserved in (("keys", key_rows), ("monthly periods", periods)):
        reserved = sum(int(r["reserved_micros"]) for r in rows_reserved)
        if reserved != tolerated:
            problems.append(f"{what} still reserve {reserved} micro-units ({tolerated} tolerated)")
    left = [h for h in holds if h["id"] not in tolerated_holds]
    if left:
        problems.append(f"{len(left)} reservation rows left, e.g. {left[:3]}")
    if expected is not None and ledger_total != expected:
        problems.append(
            f"ledger total {ledger_total} != cost of the usage the clients saw completed {expected}"
        )
    return problems


def open_tasks(db_url: str) -> int:
    return int(
        query(db_url, "SELECT COUNT(*) AS n FROM tasks WHERE status IN ('queued', 'in_progress')")[0]["n"]
    )
