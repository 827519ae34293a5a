"""Costs in integer micro-units, usage splitting and the catalog's estimates."""

from __future__ import annotations

import pytest

from app.billing.pricing import request_cost, token_cost
from app.domain.catalog import Catalog, CatalogError, FreeSizeRule, to_micros
from app.domain.jobs import ImageJob, TokenUsage
from app.domain.money import format_micros


def job(catalog: Catalog, model: str, **fields: object) -> ImageJob:
    caps = catalog.get(model)
    assert caps is not None
    defaults: dict[str, object] = {
        "request_id": "req_test",
        "endpoint": "generations",
        "model": model,
        "caps": caps,
        "prompt": "abcdefgh",
        "n": 1,
        "size": caps.default_size,
        "quality": caps.default_quality,
        "background": None,
        "output_format": "png",
        "output_compression": None,
        "moderation": "auto",
        "stream": False,
        "partial_images": 0,
        "response_format": "b64_json",
    }
    defaults.update(fields)
    return ImageJob(**defaults)  # type: ignore[arg-type]


def test_prices_are_exact_micro_units(catalog: Catalog) -> None:
    mini = catalog.get("gpt-image-1-mini")
    assert mini is not None
    assert mini.prices.image_input == 2_500_000
    assert to_micros("0.000001", where="x") == 1
    with pytest.raises(CatalogError):
        to_micros("0.0000001", where="x")
    with pytest.raises(CatalogError):
        to_micros("-1", where="x")


def test_token_cost_rounds_up_once(catalog: Catalog) -> None:
    caps = catalog.get("gpt-image-1-mini")
    assert caps is not None
    # 1 text token at 2 PTC/1M = 2 micro-units; 1 image input token at 2.5 = 2.5 → total 4.5 → 5.
    assert token_cost(caps, TokenUsage(text_input=1, image_input=1)) == 5
    assert token_cost(caps, TokenUsage(image_output=1_000_000)) == 8_000_000


def test_usage_without_output_details_is_image_output() -> None:
    usage = TokenUsage.from_openai({"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210})
    assert (usage.text_input, usage.image_input, usage.text_output, usage.image_output) == (50, 0, 0, 4160)
    odd = TokenUsage.from_openai({"input_tokens": "x", "input_tokens_details": [1], "output_tokens": -3})
    assert odd.total == 0


def test_request_cost_estimates_when_usage_is_missing(catalog: Catalog) -> None:
    cost, usage = request_cost(job(catalog, "gpt-image-1", quality="high", size="1536x1024"), None, 2)
    assert usage is not None and usage.estimated
    assert usage.image_output == 2 * 6208 and usage.text_input == 2
    assert cost == 2 * 6208 * 40 + 2 * 5


def test_auto_quality_and_size_estimate_as_medium_square(catalog: Catalog) -> None:
    caps = catalog.get("gpt-image-1")
    assert caps is not None
    assert caps.output_tokens_per_image("auto", "auto") == 1056
    assert caps.max_output_tokens_per_image("1024x1536") == 6240


def test_dalle_per_image(catalog: Catalog) -> None:
    cost, usage = request_cost(job(catalog, "dall-e-2", size="512x512"), None, 3)
    assert cost == 3 * 18_000 and usage is None


def test_format_micros() -> None:
    assert format_micros(0) == "0.000000"
    assert format_micros(10_880) == "0.010880"
    assert format_micros(12_345_678) == "12.345678"
    assert format_micros(-5) == "-0.000005"


@pytest.mark.parametrize(
    ("size", "ok"),
    [
        ((1024, 1024), True),
        ((1024, 1000), False),
        ((3840, 1280), True),
        ((4096, 1024), False),
        ((512, 512), False),
    ],
)
def test_free_size_rule(size: tuple[int, int], ok: bool) -> None:
    assert (FreeSizeRule().check(*size) is None) is ok
