"""Settlement on a real SQLite ledger: an upstream outcome becomes one priced row, the hold is
released once, estimates are marked, overruns are charged in full and counted, and a request that
reached no upstream costs nothing. Prices are written out from the catalog (gpt-image-1: text in
5, image in 10, image out 40 micro-units per token; dall-e-2: 0.02 a 1024x1024 image)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Connection

from app.auth.keys import Caller
from app.billing.ledger import LedgerService, SettlementAbandoned
from app.billing.svg import SvgCharge
from app.domain.catalog import Catalog
from app.domain.jobs import ImageJob, TokenUsage
from app.images.settlement import Settlement, UpstreamOutcome
from app.telemetry.metrics import Metrics
from tests.conftest import MODELS_FILE
from tests.unit.ledger_db import Db, open_db

CATALOG = Catalog.from_file(MODELS_FILE)
USAGE = TokenUsage(text_input=7, image_input=0, image_output=272)
USAGE_COST = 7 * 5 + 272 * 40  # 10_915


def job(model: str = "gpt-image-1", **changes: object) -> ImageJob:
    caps = CATALOG.get(model)
    assert caps is not None
    base = ImageJob(
        request_id="req_1",
        endpoint="generations",
        model=model,
        caps=caps,
        prompt="a lighthouse at dawn",  # 20 characters: 5 estimated text tokens
        n=1,
        size="1024x1024",
        quality="low" if model.startswith("gpt") else "standard",
        background=None,
        output_format="png",
        output_compression=None,
        moderation="auto",
        stream=False,
        partial_images=0,
        response_format="b64_json",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def caller(multiplier_ppm: int = 1_000_000) -> Caller:
    return Caller(
        key_id="k",
        name="k",
        owner=None,
        models=None,
        moderation="default",
        price_multiplier_ppm=multiplier_ppm,
    )


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Db]:
    async with open_db(tmp_path) as opened:
        await opened.add_key("k")
        yield opened


@pytest.fixture
def ledger(db: Db) -> LedgerService:
    return LedgerService(db.writer)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def settlement(ledger: LedgerService, metrics: Metrics) -> Settlement:
    return Settlement(ledger, metrics)


async def outcome(
    ledger: LedgerService,
    *,
    reserve: int | None = 100_000,
    the_job: ImageJob | None = None,
    who: Caller | None = None,
    **fields: object,
) -> UpstreamOutcome:
    hold = None
    if reserve is not None:
        hold = await ledger.reserve(key_id="k", amount_micros=reserve, request_id="req_1")
    values: dict[str, object] = dict(upstream="fake", status="succeeded", images=1, usage=USAGE)
    values.update(fields)
    return UpstreamOutcome(
        job=the_job or job(), caller=who or caller(), hold=hold, started=time.perf_counter(), **values
    )  # type: ignore[arg-type]


def overruns(metrics: Metrics) -> float:
    """gateway_overrun_micros_total over every model label."""
    return sum(
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "gateway_overrun_micros_total"
    )


async def test_reported_usage_is_priced_exactly_and_settled_once(
    settlement: Settlement, ledger: LedgerService, db: Db
) -> None:
    settled = await settlement.settle(await outcome(ledger, raw_usage={"total_tokens": 279}))
    assert (settled.cost_micros, settled.overrun_micros) == (USAGE_COST, 0)
    (entry,) = await db.entries()
    assert (entry["cost_micros"], entry["estimated"], entry["reserved_micros"]) == (
        USAGE_COST,
        False,
        100_000,
    )
    assert (entry["upstream"], entry["status"], entry["images"], entry["usage"]) == (
        "fake",
        "succeeded",
        1,
        {"total_tokens": 279},
    )
    state = await db.key("k")
    assert (state["spent"], state["reserved"]) == (USAGE_COST, 0) and await db.holds() == []


async def test_no_reported_usage_charges_the_catalog_estimate_marked_as_such(
    settlement: Settlement, ledger: LedgerService, db: Db
) -> None:
    settled = await settlement.settle(await outcome(ledger, usage=None))
    # 5 estimated prompt tokens, 272 output tokens for one low 1024x1024 image.
    assert settled.cost_micros == 5 * 5 + 272 * 40
    (entry,) = await db.entries()
    assert entry["estimated"] is True
    assert (entry["text_input_tokens"], entry["image_output_tokens"]) == (5, 272)


async def test_an_overrun_is_charged_in_full_recorded_and_counted(
    settlement: Settlement, ledger: LedgerService, db: Db, metrics: Metrics
) -> None:
    settled = await settlement.settle(await outcome(ledger, reserve=10_000))
    assert (settled.cost_micros, settled.overrun_micros) == (USAGE_COST, USAGE_COST - 10_000)
    (entry,) = await db.entries()
    assert (entry["reserved_micros"], entry["overrun_micros"]) == (10_000, 915)
    assert overruns(metrics) == 915
    assert (await db.key("k"))["spent"] == USAGE_COST


async def test_a_charge_within_its_hold_counts_no_overrun(
    settlement: Settlement, ledger: LedgerService, metrics: Metrics
) -> None:
    await settlement.settle(await outcome(ledger, reserve=USAGE_COST))
    assert overruns(metrics) == 0


async def test_no_upstream_reached_releases_the_hold_and_writes_no_row(
    settlement: Settlement, ledger: LedgerService, db: Db
) -> None:
    settled = await settlement.settle(await outcome(ledger, upstream=None, status="failed", images=0))
    assert (settled.cost_micros, settled.overrun_micros) == (0, 0)
    assert await db.entries() == [] and await db.holds() == []
    assert (await db.key("k"))["reserved"] == 0


async def test_a_failure_without_images_is_recorded_at_no_cost(
    settlement: Settlement, ledger: LedgerService, db: Db
) -> None:
    settled = await settlement.settle(
        await outcome(ledger, status="failed", images=0, usage=None, error_code="upstream_error")
    )
    assert settled.cost_micros == 0
    (entry,) = await db.entries()
    assert (entry["status"], entry["cost_micros"], entry["error_code"]) == ("failed", 0, "upstream_error")
    state = await db.key("k")
    assert (state["spent"], state["reserved"]) == (0, 0)


async def test_partial_images_of_an_unfinished_stream_are_billed_as_estimated_output(
    settlement: Settlement, ledger: LedgerService, db: Db
) -> None:
    settled = await settlement.settle(
        await outcome(ledger, status="failed", images=0, usage=None, partials=2, error_code="stream_cut")
    )
    assert settled.cost_micros == 2 * 100 * 40
    (entry,) = await db.entries()
    assert (entry["image_output_tokens"], entry["estimated"]) == (200, True)


async def test_the_key_multiplier_rounds_up(settlement: Settlement, ledger: LedgerService, db: Db) -> None:
    settled = await settlement.settle(await outcome(ledger, who=caller(multiplier_ppm=1_333_333)))
    # 10_915 * 1.333333 = 14_553.329...: rounded up like every charge.
    assert settled.cost_micros == 14_554
    assert (await db.key("k"))["spent"] == 14_554


async def test_per_image_models_ignore_token_usage(settlement: Settlement, ledger: LedgerService) -> None:
    dalle = job("dall-e-2", n=3)
    settled = await settlement.settle(await outcome(ledger, the_job=dalle, images=3, usage=None))
    assert settled.cost_micros == 3 * 20_000


async def test_svg_author_cost_is_added_to_the_charge(
    settlement: Settlement, ledger: LedgerService, db: Db
) -> None:
    svg = SvgCharge(model="author", input_tokens=10, output_tokens=20, reasoning_tokens=0, cost_micros=333)
    settled = await settlement.settle(await outcome(ledger, svg=svg))
    assert settled.cost_micros == USAGE_COST + 333
    (entry,) = await db.entries()
    assert (entry["svg_cost_micros"], entry["svg_output_tokens"]) == (333, 20)


async def test_a_refusing_hook_leaves_no_charge_and_the_hold_in_place(
    settlement: Settlement, ledger: LedgerService, db: Db
) -> None:
    costs: list[int] = []

    def refuse(c: Connection, cost: int) -> bool:
        costs.append(cost)
        return False

    with pytest.raises(SettlementAbandoned):
        await settlement.settle(await outcome(ledger), also=refuse)
    assert costs == [USAGE_COST]
    assert await db.entries() == [] and len(await db.holds()) == 1
    state = await db.key("k")
    assert (state["spent"], state["reserved"]) == (0, 100_000)


async def test_settling_the_same_hold_twice_releases_it_once(
    settlement: Settlement, ledger: LedgerService, db: Db
) -> None:
    first = await outcome(ledger)
    await settlement.settle(first)
    await ledger.reserve(key_id="k", amount_micros=50_000, request_id="req_2")
    await settlement.settle(
        first
    )  # a duplicate settlement (a bug upstream of this) must not free req_2's hold
    state = await db.key("k")
    assert state["reserved"] == 50_000
