"""SVG output is billed for its author's tokens too (acceptance 4).

The answer's `svg_usage` (the text model that wrote the document) is priced at that author's
rates from the catalog's `svg_authors` table; the ledger row records the author's tokens and
their cost apart from the image's, its `cost_micros` is the sum, and `x-gateway-cost` says it.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from app.billing.svg import svg_charge
from app.domain.catalog import Catalog
from tests.conftest import MODELS_FILE, Gateway, fake_upstream_config, make_settings, start_gateway
from tests.fakes.openai_upstream import FakeOpenAI

CATALOG = Catalog.from_file(MODELS_FILE)


@pytest.fixture(scope="module")
def every_model(fake_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("svg-billing")
    gw = start_gateway(make_settings(data_dir, [fake_upstream_config(fake_upstream, models=["*"])]), data_dir)
    yield gw
    gw.close()


def generate(gw: Gateway, key: str, **fields: object) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/images/generations",
        json={"model": "gpt-image-2", "prompt": "a fox logo", "output_format": "svg", **fields},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_svg_usage_is_billed_and_recorded_apart(every_model: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = every_model.create_key(name="svg")
    response = generate(every_model, key, svg={"model": "gpt-5.5-mini", "reasoning": {"effort": "low"}})
    assert response.status_code == 200, response.text
    svg_usage = response.json()["svg_usage"]
    assert svg_usage == {
        "model": "gpt-5.5-mini",
        "input_tokens": 1200,
        "output_tokens": 2500,
        "reasoning_tokens": 100,
        "total_tokens": 3700,
    }
    # The author at $0.25 in / $2 out per 1M: 1200 * 0.25 + 2500 * 2 = 5,300 micro-units.
    author_cost = 1200 * 250_000 // 1_000_000 + 2500 * 2_000_000 // 1_000_000
    # The image at gpt-image-2's $5 / $8 / $30 (the fake's usage: 40 text in, 10 image in, 4160 out).
    image_cost = (40 * 5_000_000 + 10 * 8_000_000 + 4160 * 30_000_000) // 1_000_000
    (row,) = every_model.ledger()
    assert row["svg_model"] == "gpt-5.5-mini"
    assert (row["svg_input_tokens"], row["svg_output_tokens"], row["svg_reasoning_tokens"]) == (
        1200,
        2500,
        100,
    )
    assert row["svg_cost_micros"] == author_cost == 5300
    assert row["cost_micros"] == image_cost + author_cost
    # The image's own tokens stay in their columns; the author's are not mixed into them.
    assert (row["text_input_tokens"], row["image_output_tokens"]) == (40, 4160)
    assert Decimal(response.headers["x-gateway-cost"]) == Decimal(row["cost_micros"]) / 1_000_000
    assert every_model.key_row(key_id)["spent_micros"] == row["cost_micros"]
    # The usage report sums the author's columns too, by model and in its totals and CSV.
    report = every_model.admin("GET", f"/admin/usage?key_id={key_id}&group_by=model").json()
    for entry in (report["data"][0], report["totals"]):
        assert (entry["svg_input_tokens"], entry["svg_output_tokens"], entry["svg_reasoning_tokens"]) == (
            1200,
            2500,
            100,
        )
        assert entry["svg_cost_micros"] == 5300 and entry["cost_micros"] == row["cost_micros"]
    csv_text = every_model.admin("GET", f"/admin/usage?key_id={key_id}&format=csv").text
    header, *_ = csv_text.splitlines()
    assert "svg_cost_micros" in header.split(",")


def test_an_answer_without_svg_usage_has_no_author_charge(every_model: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = every_model.create_key(name="png")
    before = len(every_model.ledger())
    response = httpx.post(
        every_model.url + "/v1/images/generations",
        json={"model": "gpt-image-2", "prompt": "a fox", "size": "1024x1024"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert response.status_code == 200
    row = every_model.ledger()[before]
    assert (row["svg_model"], row["svg_cost_micros"], row["svg_input_tokens"]) == (None, 0, 0)


def test_local_svg_is_billed_at_the_dearest_author(local_gateway: Gateway) -> None:
    """The local backend's author is not in the price table: it is billed at the dearest entry."""
    key, _ = local_gateway.create_key(name="local-svg")
    before = len(local_gateway.ledger())
    response = generate(local_gateway, key, size="1024x1024")
    assert response.status_code == 200, response.text
    usage = response.json()["svg_usage"]
    dearest = CATALOG.svg_author_price("not-in-the-table")
    expected = -(
        -(usage["input_tokens"] * dearest.input + usage["output_tokens"] * dearest.output) // 1_000_000
    )
    row = local_gateway.ledger()[before]
    assert row["svg_model"] == usage["model"] and row["svg_output_tokens"] == usage["output_tokens"]
    assert row["svg_cost_micros"] == expected > 0
    assert Decimal(response.headers["x-gateway-cost"]) == Decimal(row["cost_micros"]) / 1_000_000


def test_svg_charge_rounds_up_once_and_ignores_garbage() -> None:
    prices = CATALOG.svg_authors
    fallback = CATALOG.svg_author_price(None)
    charge = svg_charge({"model": "gpt-5-mini", "input_tokens": 3, "output_tokens": 1}, prices, fallback)
    # 3 tokens at 0.25 and 1 at 2 per 1M: 2.75 micro-units, rounded up once to 3.
    assert charge is not None and charge.cost_micros == 3
    assert svg_charge(None, prices, fallback) is None
    odd = svg_charge({"model": 7, "input_tokens": -5, "output_tokens": True}, prices, fallback)
    assert odd is not None and (odd.model, odd.input_tokens, odd.output_tokens, odd.cost_micros) == (
        None,
        0,
        0,
        0,
    )
