"""An async request's partial_images (issue 16): admitted as a streaming job, so its hold covers
the partial images the upstream may bill, while a synchronous request keeps OpenAI's rule."""

from __future__ import annotations

from app.billing.pricing import PARTIAL_IMAGE_OUTPUT_TOKENS, worst_case_cost, worst_case_usage
from app.domain.catalog import Catalog
from app.images.admission.validation import streamed_for_previews
from tests.unit.test_pricing import job


def test_async_partials_make_a_streaming_job_whose_hold_covers_them(catalog: Catalog) -> None:
    plain = job(catalog, "gpt-image-1", n=2, quality="low", size="1024x1024", partial_images=3)
    streamed = streamed_for_previews(plain)
    assert streamed.stream and not plain.stream
    extra = worst_case_usage(streamed).image_output - worst_case_usage(plain).image_output
    assert extra == 3 * PARTIAL_IMAGE_OUTPUT_TOKENS * 2
    assert worst_case_cost(streamed) > worst_case_cost(plain)


def test_without_partials_or_streaming_the_job_is_unchanged(catalog: Catalog) -> None:
    none = job(catalog, "gpt-image-1", partial_images=0)
    assert streamed_for_previews(none) is none
    dalle = job(catalog, "dall-e-3", partial_images=0)
    assert streamed_for_previews(dalle) is dalle
