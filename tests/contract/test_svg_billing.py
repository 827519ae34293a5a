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
from app.domain.catalog import Catalog, CatalogError
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


def test_an_author_missing_from_the_table_is_billed_at_the_default_rate_and_estimated(
    every_model: Gateway, upstream: FakeOpenAI
) -> None:
    """Issue 23 item 15: ``svg.model`` takes any string. A new author is not refused; its tokens
    are priced at the catalog's ``svg_author_default`` and the row is marked estimated."""
    key, key_id = every_model.create_key(name="svg-new-author")
    before = len(every_model.ledger())
    response = generate(every_model, key, svg={"model": "gpt-7-svg-preview"})
    assert response.status_code == 200, response.text
    usage = response.json()["svg_usage"]
    assert usage["model"] == "gpt-7-svg-preview"
    default = CATALOG.svg_author_price("gpt-7-svg-preview")
    assert "gpt-7-svg-preview" not in CATALOG.svg_authors
    assert (default.input, default.output) == (1_250_000, 10_000_000)  # models.yaml's svg_author_default
    # The fake's 1200 in and 2700 out (medium effort) at $1.25 / $10 per 1M.
    assert (usage["input_tokens"], usage["output_tokens"]) == (1200, 2700)
    author_cost = -(-(1200 * default.input + 2700 * default.output) // 1_000_000)
    row = every_model.ledger()[before]
    assert row["svg_model"] == "gpt-7-svg-preview"
    assert row["svg_cost_micros"] == author_cost == 28_500
    assert row["estimated"] is True or row["estimated"] == 1
    assert every_model.key_row(key_id)["spent_micros"] == row["cost_micros"]
    # A listed author's row is not an estimate (the fake reports real usage).
    listed = generate(every_model, key, svg={"model": "gpt-5.1"})
    assert listed.status_code == 200, listed.text
    assert not every_model.ledger()[before + 1]["estimated"]


def test_the_default_author_rate_is_a_catalog_setting() -> None:
    base = {"models": {}, "svg_authors": {"a": {"input": 1, "output": 2}, "b": {"input": 3, "output": 4}}}
    dearest = Catalog.from_mapping(base).svg_author_price("new")
    assert (dearest.input, dearest.output) == (3_000_000, 4_000_000)
    chosen = Catalog.from_mapping(base | {"svg_author_default": {"input": 0.5, "output": 1}})
    assert (chosen.svg_author_price("new").input, chosen.svg_author_price("a").output) == (500_000, 2_000_000)
    charge = svg_charge(
        {"model": "new", "input_tokens": 10, "output_tokens": 0},
        chosen.svg_authors,
        chosen.svg_author_price(None),
    )
    assert charge is not None and charge.estimated and charge.cost_micros == 5
    known = svg_charge({"model": "a", "input_tokens": 10}, chosen.svg_authors, chosen.svg_author_price(None))
    assert known is not None and not known.estimated
    with pytest.raises(CatalogError, match="svg_author_default"):
        Catalog.from_mapping(base | {"svg_author_default": 3})


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


def test_local_svg_is_billed_at_the_default_author_rate(local_gateway: Gateway) -> None:
    """The local backend's author is not in the price table: it is billed at the default rate."""
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
