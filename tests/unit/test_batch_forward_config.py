"""The settings of forwarding batch lines to an upstream's Batch API (issue 27)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.batches.config import BatchSettings
from app.batches.forward import Discounts
from app.upstream.config import UpstreamSettings, provider_kind
from app.upstream.providers.openai_batch import OpenAIBatchClient

KEY = "sk-upstream-test-0123456789"


def test_only_openai_upstreams_take_batch() -> None:
    with pytest.raises(ValidationError, match="batch is only for kind openai"):
        UpstreamSettings(name="flux", kind="bfl", api_key=KEY, batch=True)


def test_a_batch_upstream_offers_its_files_and_batches_client() -> None:
    settings = UpstreamSettings(
        name="oai",
        kind="openai",
        base_url="http://127.0.0.1:9/v1",
        api_key=KEY,
        batch=True,
        poll_interval_s=2,
    )
    provider = provider_kind("openai").build(settings)
    client = getattr(provider, "batch_client", None)
    assert isinstance(client, OpenAIBatchClient)
    assert (client.name, client.poll_interval_s, client.poll_max_interval_s) == ("oai", 2, 60)
    plain = provider_kind("openai").build(
        UpstreamSettings(name="oai", kind="openai", base_url="http://127.0.0.1:9/v1", api_key=KEY)
    )
    assert getattr(plain, "batch_client", None) is None


def test_a_key_discount_wins_over_its_model_and_the_default() -> None:
    discounts = Discounts(default_ppm=100_000, models={"gpt-image-1.5": 500_000}, keys={"key_a": 0})
    assert discounts.for_line("key_a", "gpt-image-1.5") == 0
    assert discounts.for_line("key_b", "gpt-image-1.5") == 500_000
    assert discounts.for_line("key_b", "gpt-image-1") == 100_000
    assert Discounts().for_line("key_b", "gpt-image-1") == 0


@pytest.mark.parametrize(
    "field", ["forward_tenant_discount_ppm", "forward_tenant_discount_models", "forward_tenant_discount_keys"]
)
def test_a_discount_is_at_most_the_whole_price(field: str) -> None:
    value = 1_000_001 if field.endswith("_ppm") else {"x": 1_000_001}
    with pytest.raises(ValidationError):
        BatchSettings(**{field: value})
