"""The ledger on a real SQLite database: holds, settlements and releases move exact micro-units
between a key's reserved and spent amounts and its month, and no path moves money twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Connection, select

from app.billing.ledger import Hold, LedgerRecord, LedgerService, SettlementAbandoned, period_of
from app.core.errors import QuotaExceededError
from app.db.tables import LedgerEntry, utcnow
from app.domain.jobs import TokenUsage
from tests.unit.ledger_db import Db, open_db


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Db]:
    async with open_db(tmp_path) as opened:
        yield opened


@pytest.fixture
def ledger(db: Db) -> LedgerService:
    return LedgerService(db.writer, hold_ttl_s=600)


def record(request_id: str, cost: int, *, key_id: str = "k", hold: Hold | None = None) -> LedgerRecord:
    held = hold.amount_micros if hold is not None else 0
    return LedgerRecord(
        request_id=request_id,
        key_id=key_id,
        model="gpt-image-1",
        upstream="fake",
        endpoint="generations",
        status="succeeded",
        images=1,
        usage=TokenUsage(text_input=7, image_output=272),
        cost_micros=cost,
        latency_ms=5,
        reserved_micros=held,
        overrun_micros=max(0, cost - held) if hold is not None else 0,
    )


async def test_a_hold_reserves_the_exact_amount_on_the_key_and_its_month(
    db: Db, ledger: LedgerService
) -> None:
    await db.add_key("k")
    hold = await ledger.reserve(key_id="k", amount_micros=1_234_567, request_id="req_1")
    assert (hold.key_id, hold.amount_micros, hold.period) == ("k", 1_234_567, period_of(utcnow()))
    assert await db.key("k") == {
        "spent": 0,
        "reserved": 1_234_567,
        "balance": None,
        "period_spent": 0,
        "period_reserved": 1_234_567,
    }
    (row,) = await db.holds()
    assert (row["id"], row["request_id"], row["amount_micros"]) == (hold.id, "req_1", 1_234_567)
    assert row["expires_at"] - row["created_at"] == timedelta(seconds=600)


async def test_settle_charges_the_cost_releases_the_hold_and_writes_one_row(
    db: Db, ledger: LedgerService
) -> None:
    await db.add_key("k")
    hold = await ledger.reserve(key_id="k", amount_micros=50_000, request_id="req_1")
    await ledger.settle(hold, record("req_1", 10_880, hold=hold))
    assert await db.key("k") == {
        "spent": 10_880,
        "reserved": 0,
        "balance": None,
        "period_spent": 10_880,
        "period_reserved": 0,
    }
    assert await db.holds() == []
    (entry,) = await db.entries()
    assert (entry["request_id"], entry["cost_micros"], entry["reserved_micros"], entry["overrun_micros"]) == (
        "req_1",
        10_880,
        50_000,
        0,
    )
    assert (entry["text_input_tokens"], entry["image_output_tokens"], entry["estimated"]) == (7, 272, False)


async def test_an_overrun_is_charged_in_full_and_recorded(db: Db, ledger: LedgerService) -> None:
    await db.add_key("k", quota_micros=1_000_000)
    hold = await ledger.reserve(key_id="k", amount_micros=1_000, request_id="req_1")
    # The upstream billed more than was held: all of it is charged, even past the quota.
    await ledger.settle(hold, record("req_1", 1_500_001, hold=hold))
    state = await db.key("k")
    assert (state["spent"], state["reserved"], state["period_spent"]) == (1_500_001, 0, 1_500_001)
    (entry,) = await db.entries()
    assert (entry["reserved_micros"], entry["overrun_micros"]) == (1_000, 1_499_001)


async def test_release_gives_the_hold_back_once(db: Db, ledger: LedgerService) -> None:
    await db.add_key("k")
    hold = await ledger.reserve(key_id="k", amount_micros=777, request_id="req_1")
    await ledger.release(hold)
    await ledger.release(hold)  # a second release finds no hold and moves nothing
    assert await db.key("k") == {
        "spent": 0,
        "reserved": 0,
        "balance": None,
        "period_spent": 0,
        "period_reserved": 0,
    }
    assert await db.holds() == [] and await db.entries() == []


async def test_settling_a_hold_already_released_charges_without_releasing_again(
    db: Db, ledger: LedgerService
) -> None:
    await db.add_key("k")
    first = await ledger.reserve(key_id="k", amount_micros=400, request_id="req_1")
    second = await ledger.reserve(key_id="k", amount_micros=600, request_id="req_2")
    await ledger.release(first)  # as the reconciler would, for a request thought dead
    await ledger.settle(first, record("req_1", 250, hold=first))
    state = await db.key("k")
    # Only req_2's 600 stays reserved: req_1's 400 was not taken off a second time.
    assert (state["spent"], state["reserved"], state["period_reserved"]) == (250, 600, 600)
    await ledger.settle(second, record("req_2", 600, hold=second))
    assert await db.key("k") == {
        "spent": 850,
        "reserved": 0,
        "balance": None,
        "period_spent": 850,
        "period_reserved": 0,
    }


async def test_a_hold_beyond_the_quota_is_refused_and_nothing_is_reserved(
    db: Db, ledger: LedgerService
) -> None:
    await db.add_key("k", quota_micros=1_000, spent_micros=600)
    hold = await ledger.reserve(key_id="k", amount_micros=400, request_id="req_1")  # exactly to the quota
    with pytest.raises(QuotaExceededError, match="used its quota"):
        await ledger.reserve(key_id="k", amount_micros=1, request_id="req_2")
    state = await db.key("k")
    assert (state["reserved"], state["period_reserved"]) == (400, 400)
    assert [h["id"] for h in await db.holds()] == [hold.id]


async def test_the_balance_bounds_holds_and_pays_for_settlements(db: Db, ledger: LedgerService) -> None:
    await db.add_key("k", balance_micros=10_000)
    with pytest.raises(QuotaExceededError, match="balance is too low"):
        await ledger.reserve(key_id="k", amount_micros=10_001, request_id="req_0")
    hold = await ledger.reserve(key_id="k", amount_micros=10_000, request_id="req_1")
    await ledger.settle(hold, record("req_1", 3_333, hold=hold))
    state = await db.key("k")
    assert (state["balance"], state["spent"], state["reserved"]) == (6_667, 3_333, 0)


async def test_the_monthly_quota_counts_the_months_spend_and_holds(db: Db, ledger: LedgerService) -> None:
    await db.add_key("k", monthly_quota_micros=1_000)
    with pytest.raises(QuotaExceededError, match="monthly quota"):
        await ledger.reserve(key_id="k", amount_micros=1_001, request_id="req_0")
    hold = await ledger.reserve(key_id="k", amount_micros=700, request_id="req_1")
    await ledger.settle(hold, record("req_1", 700, hold=hold))
    await ledger.reserve(key_id="k", amount_micros=300, request_id="req_2")
    with pytest.raises(QuotaExceededError, match="monthly quota"):
        await ledger.reserve(key_id="k", amount_micros=1, request_id="req_3")
    # The refused hold's reservation on the key was rolled back with it.
    state = await db.key("k")
    assert (state["reserved"], state["period_reserved"], state["period_spent"]) == (300, 300, 700)


async def test_concurrent_holds_never_both_take_the_last_credit(db: Db, ledger: LedgerService) -> None:
    await db.add_key("k", quota_micros=1_000)
    outcomes = await asyncio.gather(
        *(ledger.reserve(key_id="k", amount_micros=300, request_id=f"req_{i}") for i in range(5)),
        return_exceptions=True,
    )
    taken = [o for o in outcomes if isinstance(o, Hold)]
    assert len(taken) == 3 and sum(isinstance(o, QuotaExceededError) for o in outcomes) == 2
    assert (await db.key("k"))["reserved"] == 900


async def test_a_refusing_hook_commits_nothing(db: Db, ledger: LedgerService) -> None:
    await db.add_key("k")
    hold = await ledger.reserve(key_id="k", amount_micros=500, request_id="req_1")
    seen: list[int] = []

    def refuse(c: Connection) -> bool:
        # The hook runs inside the settlement's transaction: it sees the row about to be written.
        seen.append(len(c.execute(select(LedgerEntry.id)).all()))
        return False

    with pytest.raises(SettlementAbandoned):
        await ledger.settle(hold, record("req_1", 500, hold=hold), also=refuse)
    assert seen == [1]
    assert await db.entries() == [] and [h["id"] for h in await db.holds()] == [hold.id]
    state = await db.key("k")
    assert (state["spent"], state["reserved"]) == (0, 500)


async def test_release_expired_takes_back_only_holds_past_their_ttl(db: Db, ledger: LedgerService) -> None:
    await db.add_key("k")
    short = await ledger.reserve(key_id="k", amount_micros=100, request_id="req_1", ttl_s=60)
    long = await ledger.reserve(key_id="k", amount_micros=200, request_id="req_2", ttl_s=3600)
    assert await ledger.release_expired(utcnow() + timedelta(seconds=120)) == 1
    assert [h["id"] for h in await db.holds()] == [long.id]
    assert (await db.key("k"))["reserved"] == 200
    # Settling the released hold later charges it without giving back its amount twice.
    await ledger.settle(short, record("req_1", 90, hold=short))
    state = await db.key("k")
    assert (state["spent"], state["reserved"], state["period_reserved"]) == (90, 200, 200)


async def test_many_odd_amounts_add_up_exactly(db: Db, ledger: LedgerService) -> None:
    await db.add_key("k")
    costs = [1, 999_999, 1_000_001, 123_456_789, 7, 2**40 + 3]
    for index, cost in enumerate(costs):
        hold = await ledger.reserve(key_id="k", amount_micros=cost + index, request_id=f"req_{index}")
        await ledger.settle(hold, record(f"req_{index}", cost, hold=hold))
    state = await db.key("k")
    assert state["spent"] == state["period_spent"] == sum(costs)
    assert state["reserved"] == state["period_reserved"] == 0
    assert sum(e["cost_micros"] for e in await db.entries()) == sum(costs)


async def test_a_record_without_a_hold_is_charged_to_the_current_month(db: Db, ledger: LedgerService) -> None:
    await db.add_key("k")
    await ledger.settle(None, record("req_1", 42))
    state = await db.key("k")
    assert (state["spent"], state["period_spent"], state["reserved"]) == (42, 42, 0)
