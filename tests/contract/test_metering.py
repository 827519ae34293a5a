"""Metering, quotas and reports (SPEC §5, issue 5), on SQLite and on the PostgreSQL service."""

from __future__ import annotations

import asyncio
import csv
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.billing.ledger import LedgerService
from bench.gateway_process import GatewayProcess
from tests.conftest import (
    ADMIN_KEY,
    Gateway,
    fake_upstream_config,
    make_settings,
    migrate,
    query,
    start_gateway,
)
from tests.fakes.leaving_client import post_then_hang_up
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.services import fresh_postgres_database

GEN = "/v1/images/generations"
PROMPT = "q"
# gpt-image-1 at quality high, 1024x1024: the reservation is 1 text token (1 byte) + 4160 image
# tokens, and the fake reports exactly that, so reservation == charge == 1×5 + 4160×40 micro-PTC.
EXACT_USAGE = {
    "input_tokens": 1,
    "input_tokens_details": {"text_tokens": 1, "image_tokens": 0},
    "output_tokens": 4160,
    "output_tokens_details": {"text_tokens": 0, "image_tokens": 4160},
    "total_tokens": 4161,
}
COST = 1 * 5 + 4160 * 40
BODY = {"model": "gpt-image-1", "prompt": PROMPT, "quality": "high", "size": "1024x1024"}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'meter.db'}"
        return
    with fresh_postgres_database() as url:
        migrate(url)
        yield url


@pytest.fixture
def metered(db_url: str, upstream: FakeOpenAI, tmp_path: Path) -> Iterator[Gateway]:
    upstream.usage = dict(EXACT_USAGE)
    data_dir = tmp_path / "gw"
    gw = start_gateway(
        make_settings(data_dir, [fake_upstream_config(upstream)], database={"url": db_url}), data_dir
    )
    yield gw
    gw.close()


async def fire(url: str, key: str, count: int, body: dict[str, Any] | None = None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(url + GEN, json=body or BODY, headers={"Authorization": f"Bearer {key}"})
                    for _ in range(count)
                )
            )
        )


def spent(gw: Gateway, key_id: str) -> tuple[int, int]:
    row = gw.key_row(key_id)
    return int(row["spent_micros"]), int(row["reserved_micros"])


def ledger_sum(gw: Gateway, key_id: str) -> int:
    return sum(int(r["cost_micros"]) for r in gw.ledger() if r["key_id"] == key_id)


def test_concurrent_requests_never_spend_past_the_quota(metered: Gateway) -> None:
    key, key_id = metered.create_key(name="quota", quota=f"{50 * COST / 1_000_000:.6f}")
    responses = asyncio.run(fire(metered.url, key, 200))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 50
    assert all(r.status_code == 429 for r in refused)
    assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
    assert {r.json()["error"]["type"] for r in refused} == {"insufficient_quota"}
    assert spent(metered, key_id) == (50 * COST, 0)
    assert ledger_sum(metered, key_id) == 50 * COST
    assert all(r.headers["x-gateway-cost"] == "0.166405" for r in ok)


def test_failures_and_disconnects_cost_nothing_but_partials(metered: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = metered.create_key(name="no-charge", quota="10")
    headers = {"Authorization": f"Bearer {key}"}

    upstream.enqueue_fault(Fault.status(500, "boom", times=3))  # the first try and both retries
    assert httpx.post(metered.url + GEN, json=BODY, headers=headers, timeout=30).status_code == 500
    assert spent(metered, key_id) == (0, 0)

    # A non-streaming client that gives up while the upstream works: the call is cancelled (the
    # upstream's delay ends when the gateway hangs up on it).
    upstream.enqueue_fault(Fault.delay(300))
    calls = upstream.count(GEN)
    post_then_hang_up(metered.url, GEN, BODY, headers, when=lambda: upstream.wait_for_count(calls + 1, GEN))
    rows = wait_for_rows(metered, key_id, 2)
    assert rows[-1]["status"] == "cancelled"
    assert spent(metered, key_id) == (0, 0)

    # A streaming client that leaves after the first partial: no image completed, but the upstream
    # made (and OpenAI bills) that partial image: 100 image output tokens, marked as an estimate.
    upstream.step_streams()  # the second partial waits for a step that never comes
    upstream.allow_events(1)
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", metered.url + GEN, json={**BODY, "stream": True, "partial_images": 2}, headers=headers
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    rows = wait_for_rows(metered, key_id, 3)
    assert rows[-1]["status"] == "cancelled"
    assert (rows[-1]["images"], rows[-1]["image_output_tokens"], bool(rows[-1]["estimated"])) == (
        0,
        100,
        True,
    )
    assert spent(metered, key_id) == (100 * 40, 0)
    assert ledger_sum(metered, key_id) == 100 * 40


def wait_for_rows(gw: Gateway, key_id: str, count: int) -> list[dict[str, Any]]:
    import time

    deadline = time.monotonic() + 30
    while True:
        rows = [r for r in gw.ledger() if r["key_id"] == key_id]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_completed_request_is_billed_once_when_the_client_leaves_during_settlement(
    metered: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = LedgerService.settle
    settling, left = threading.Event(), threading.Event()

    async def slow_settle(self: LedgerService, *args: Any, **kwargs: Any) -> None:
        settling.set()
        await asyncio.to_thread(left.wait, 60)  # the client hangs up while the charge is being written
        for _ in range(100):  # loop turns (no clock) for the gateway to read the hang-up
            await asyncio.sleep(0)
        await original(self, *args, **kwargs)

    monkeypatch.setattr(LedgerService, "settle", slow_settle)
    key, key_id = metered.create_key(name="leaves")
    post_then_hang_up(
        metered.url, GEN, BODY, {"Authorization": f"Bearer {key}"}, when=lambda: settling.wait(60)
    )
    left.set()
    rows = wait_for_rows(metered, key_id, 1)
    assert [r["status"] for r in rows] == ["succeeded"]
    assert spent(metered, key_id) == (COST, 0)


def test_balance_top_up_multiplier_and_monthly_quota(metered: Gateway) -> None:
    key, key_id = metered.create_key(name="prepaid", balance="0.4", price_multiplier="1.5")
    headers = {"Authorization": f"Bearer {key}"}
    charged = -(-COST * 3 // 2)
    first = httpx.post(metered.url + GEN, json=BODY, headers=headers, timeout=30)
    assert first.status_code == 200 and first.headers["x-gateway-cost"] == f"0.{charged:06d}"
    assert httpx.post(metered.url + GEN, json=BODY, headers=headers, timeout=30).status_code == 429
    assert int(metered.key_row(key_id)["balance_micros"]) == 400_000 - charged

    topped = metered.admin("POST", f"/admin/keys/{key_id}/topup", json={"amount": "1"})
    assert topped.status_code == 200 and topped.json()["balance"] == f"{(1_400_000 - charged) / 1e6:.6f}"
    assert httpx.post(metered.url + GEN, json=BODY, headers=headers, timeout=30).status_code == 200
    assert spent(metered, key_id) == (2 * charged, 0)
    assert ledger_sum(metered, key_id) == 2 * charged

    monthly_key, monthly_id = metered.create_key(name="monthly", monthly_quota=f"{2 * COST / 1e6:.6f}")
    results = [
        httpx.post(
            metered.url + GEN, json=BODY, headers={"Authorization": f"Bearer {monthly_key}"}, timeout=30
        )
        for _ in range(3)
    ]
    assert [r.status_code for r in results] == [200, 200, 429]
    assert "monthly" in results[2].json()["error"]["message"]
    (period,) = metered.query(f"SELECT * FROM key_periods WHERE key_id = '{monthly_id}'")
    assert (int(period["spent_micros"]), int(period["reserved_micros"])) == (2 * COST, 0)


def test_usage_reports_match_the_ledger(metered: Gateway, upstream: FakeOpenAI) -> None:
    key_a, id_a = metered.create_key(name="a")
    key_b, id_b = metered.create_key(name="b")
    for key, model, n in (
        (key_a, "gpt-image-1", 1),
        (key_a, "gpt-image-1-mini", 2),
        (key_b, "gpt-image-1", 1),
    ):
        body = {**BODY, "model": model, "n": n}
        assert (
            httpx.post(metered.url + GEN, json=body, headers={"Authorization": f"Bearer {key}"}).status_code
            == 200
        )
    assert (
        httpx.post(
            metered.url + GEN,
            json={**BODY, "model": "dall-e-2", "size": "256x256", "quality": "standard"},
            headers={"Authorization": f"Bearer {key_b}"},
        ).status_code
        == 200
    )
    # Move one of key A's rows to an earlier day, to have two days to group by.
    first_id = min(int(r["id"]) for r in metered.ledger() if r["key_id"] == id_a)
    metered.query(f"UPDATE ledger_entries SET created_at = '2026-01-15 12:00:00+00:00' WHERE id = {first_id}")
    rows = metered.ledger()

    def expect(selected: list[dict[str, Any]]) -> dict[str, int]:
        return {
            "requests": len(selected),
            "images": sum(int(r["images"]) for r in selected),
            "text_input_tokens": sum(int(r["text_input_tokens"]) for r in selected),
            "image_input_tokens": sum(int(r["image_input_tokens"]) for r in selected),
            "text_output_tokens": sum(int(r["text_output_tokens"]) for r in selected),
            "image_output_tokens": sum(int(r["image_output_tokens"]) for r in selected),
            "svg_input_tokens": sum(int(r["svg_input_tokens"]) for r in selected),
            "svg_output_tokens": sum(int(r["svg_output_tokens"]) for r in selected),
            "svg_reasoning_tokens": sum(int(r["svg_reasoning_tokens"]) for r in selected),
            "svg_cost_micros": sum(int(r["svg_cost_micros"]) for r in selected),
            "cost_micros": sum(int(r["cost_micros"]) for r in selected),
            "operator_cost_micros": sum(int(r["operator_cost_micros"]) for r in selected),
        }

    def report(**params: str) -> dict[str, Any]:
        response = metered.admin("GET", "/admin/usage", params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def totals(data: dict[str, Any]) -> dict[str, int]:
        return {k: v for k, v in data["totals"].items() if k != "cost"}

    assert totals(report()) == expect(rows)
    assert totals(report(key_id=id_a)) == expect([r for r in rows if r["key_id"] == id_a])
    assert totals(report(model="gpt-image-1")) == expect([r for r in rows if r["model"] == "gpt-image-1"])
    assert totals(report(**{"from": "2026-02-01"})) == expect([r for r in rows if int(r["id"]) != first_id])
    assert totals(report(to="2026-02-01")) == expect([r for r in rows if int(r["id"]) == first_id])

    by_model = report(group_by="model")
    for group in by_model["data"]:
        assert {k: v for k, v in group.items() if k not in ("model", "cost")} == expect(
            [r for r in rows if r["model"] == group["model"]]
        )
    assert sorted(g["model"] for g in by_model["data"]) == sorted({r["model"] for r in rows})

    by_day = report(group_by="day", key_id=id_a)
    assert [g["day"] for g in by_day["data"]][0] == "2026-01-15"
    assert (
        sum(g["cost_micros"] for g in by_day["data"])
        == expect([r for r in rows if r["key_id"] == id_a])["cost_micros"]
    )

    csv_text = metered.admin("GET", "/admin/usage", params={"group_by": "model", "format": "csv"}).text
    parsed = list(csv.DictReader(io.StringIO(csv_text)))
    assert parsed[-1]["model"] == "total"
    assert int(parsed[-1]["cost_micros"]) == expect(rows)["cost_micros"]
    for line in parsed[:-1]:
        assert (
            int(line["cost_micros"])
            == expect([r for r in rows if r["model"] == line["model"]])["cost_micros"]
        )

    own = httpx.get(metered.url + "/v1/usage", headers={"Authorization": f"Bearer {key_b}"}).json()
    assert own["key_id"] == id_b
    assert totals(own) == expect([r for r in rows if r["key_id"] == id_b])
    assert (
        httpx.get(metered.url + "/admin/usage", headers={"Authorization": f"Bearer {key_b}"}).status_code
        == 401
    )


def test_stale_holds_are_released(metered: Gateway) -> None:
    _, key_id = metered.create_key(name="crashed")

    async def scenario() -> int:
        from app.db.engine import create_engine
        from app.db.tables import utcnow
        from app.db.writer import create_writer

        engine = create_engine(metered.settings.database.url)
        try:
            writer = create_writer(engine)
            try:
                ledger = LedgerService(writer, hold_ttl_s=0.001)
                await ledger.reserve(key_id=key_id, amount_micros=12345, request_id="req_dead")
                await asyncio.sleep(0.01)
                return await ledger.release_expired(utcnow())
            finally:
                await writer.aclose()
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == 1
    assert spent(metered, key_id) == (0, 0)


def test_two_gateway_processes_share_one_quota_on_postgres(upstream: FakeOpenAI, tmp_path: Path) -> None:
    upstream.usage = dict(EXACT_USAGE)
    with fresh_postgres_database() as url:
        migrate(url)
        config = {
            "admin_key": ADMIN_KEY,
            "data_dir": str(tmp_path / "data"),
            "database": {"url": url},
            "logging": {"level": "WARNING"},
            "upstreams": [fake_upstream_config(upstream)],
        }
        gateways = [GatewayProcess(config, tmp_path) for _ in range(2)]
        try:
            for gw in gateways:
                gw.wait_ready()
            created = httpx.post(
                gateways[0].url + "/admin/keys",
                json={"name": "shared", "quota": f"{50 * COST / 1e6:.6f}"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            ).json()

            async def both() -> list[httpx.Response]:
                halves = await asyncio.gather(*(fire(gw.url, created["key"], 100) for gw in gateways))
                return [r for half in halves for r in half]

            responses = asyncio.run(both())
        finally:
            for gw in gateways:
                gw.stop()
        assert sum(r.status_code == 200 for r in responses) == 50
        assert {r.status_code for r in responses} == {200, 429}
        (key_row,) = query(url, f"SELECT * FROM api_keys WHERE id = '{created['id']}'")
        ledger = query(
            url, f"SELECT SUM(cost_micros) AS total FROM ledger_entries WHERE key_id = '{created['id']}'"
        )
        assert (int(key_row["spent_micros"]), int(key_row["reserved_micros"])) == (50 * COST, 0)
        assert int(ledger[0]["total"]) == 50 * COST


# -- issue 15, defect 1: an upstream that bills more than the catalog -----------------------------

OVER_USAGE = {  # the catalog says 272 image output tokens for low 1024x1024; the upstream bills 900
    "input_tokens": 100,
    "input_tokens_details": {"text_tokens": 100, "image_tokens": 0},
    "output_tokens": 900,
    "output_tokens_details": {"text_tokens": 0, "image_tokens": 900},
    "total_tokens": 1000,
}
OVER_COST = 100 * 5 + 900 * 40
LOW = {"model": "gpt-image-1", "prompt": PROMPT, "quality": "low", "size": "1024x1024"}
LOW_HOLD = len(PROMPT) * 5 + 272 * 40


def metric(gw: Gateway, name: str, model: str) -> int:
    text = httpx.get(gw.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_overruns_are_charged_recorded_and_bounded_and_block_the_key(
    metered: Gateway, upstream: FakeOpenAI
) -> None:
    upstream.usage = dict(OVER_USAGE)
    key, key_id = metered.create_key(name="overrun", quota="0.05")
    responses = asyncio.run(fire(metered.url, key, 10, LOW))
    ok = [r for r in responses if r.status_code == 200]
    assert ok and all(r.status_code in (200, 429) for r in responses)
    rows = [r for r in metered.ledger() if r["key_id"] == key_id]
    assert len(rows) == len(ok)
    for row in rows:
        # Charged in full, and the excess over the hold is on the row.
        assert (int(row["cost_micros"]), int(row["reserved_micros"])) == (OVER_COST, LOW_HOLD)
        assert int(row["overrun_micros"]) == OVER_COST - LOW_HOLD
    spend, reserved = spent(metered, key_id)
    overruns = sum(int(r["overrun_micros"]) for r in rows)
    assert reserved == 0 and spend == len(ok) * OVER_COST
    # The invariant: spend exceeds the quota by no more than the overruns recorded.
    assert spend - 50_000 <= overruns
    assert metric(metered, "gateway_overrun_micros_total", "gpt-image-1") >= overruns
    # Over its quota now, the key starts nothing new.
    upstream.usage = dict(EXACT_USAGE)
    refused = httpx.post(metered.url + GEN, json=LOW, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert [r["status"] for r in metered.ledger() if r["key_id"] == key_id] == ["succeeded"] * len(ok)


def test_a_balance_key_over_its_balance_after_an_overrun_is_blocked(
    metered: Gateway, upstream: FakeOpenAI
) -> None:
    upstream.usage = dict(OVER_USAGE)
    key, key_id = metered.create_key(name="prepaid-overrun", balance="0.02")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(metered.url + GEN, json=LOW, headers=headers, timeout=30).status_code == 200
    assert int(metered.key_row(key_id)["balance_micros"]) == 20_000 - OVER_COST  # negative: owed
    refused = httpx.post(metered.url + GEN, json=LOW, headers=headers, timeout=30)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"


def test_the_safety_margin_enlarges_every_hold(upstream: FakeOpenAI, tmp_path: Path) -> None:
    upstream.usage = dict(OVER_USAGE)
    data_dir = tmp_path / "margin"
    gw = start_gateway(
        make_settings(data_dir, [fake_upstream_config(upstream)], billing={"reserve_margin_pct": 250}),
        data_dir,
    )
    try:
        key, key_id = gw.create_key(name="margin")
        response = httpx.post(gw.url + GEN, json=LOW, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert response.status_code == 200
        (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
        hold = LOW_HOLD + -(-LOW_HOLD * 2_500_000 // 1_000_000)
        assert int(row["reserved_micros"]) == hold and hold > OVER_COST
        assert int(row["overrun_micros"]) == 0
    finally:
        gw.close()
