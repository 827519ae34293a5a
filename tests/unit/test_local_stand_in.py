"""`local` is never a silent stand-in (SPEC §2, issue 23 item 1): which routes each model gets."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.domain.catalog import Catalog
from app.upstream.config import UpstreamSettings
from app.upstream.registry import ProviderRegistry
from tests.conftest import MODELS_FILE

CATALOG = Catalog.from_file(MODELS_FILE)
OPENAI: dict[str, Any] = {"name": "openai", "kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
LOCAL: dict[str, Any] = {"name": "local", "kind": "local", "priority": 10}


def routes(*upstreams: dict[str, Any]) -> ProviderRegistry:
    return ProviderRegistry.build([UpstreamSettings(**u) for u in upstreams], CATALOG)


def names(registry: ProviderRegistry, model: str, *, retired: bool = False) -> list[str]:
    return [r.name for r in registry.routes(model, retired=retired)]


def test_without_a_provider_key_local_serves_every_model() -> None:
    registry = routes(OPENAI, LOCAL)  # no api_key: the openai upstream is skipped
    assert names(registry, "gpt-image-1.5") == ["local"]
    assert names(registry, "gpt-image-1", retired=True) == ["local"]
    assert set(registry.models()) == set(CATALOG.names())


def test_with_a_provider_key_local_serves_only_what_no_provider_serves() -> None:
    registry = routes(
        OPENAI | {"api_key": "sk-real-0123456789", "models": ["gpt-image-1.5", "gpt-image-1"]}, LOCAL
    )
    assert names(registry, "gpt-image-1.5") == ["openai"]
    # The retired model stays OpenAI's: no upstream serves it now, rather than a placeholder.
    assert names(registry, "gpt-image-1", retired=True) == []
    assert names(registry, "gpt-image-2") == ["local"]  # no real upstream lists it


def test_fallback_for_names_the_models_local_stands_in_for() -> None:
    keyed = OPENAI | {"api_key": "sk-real-0123456789"}
    registry = routes(keyed, LOCAL | {"fallback_for": ["gpt-image-1.5"]})
    assert names(registry, "gpt-image-1.5") == ["openai", "local"]
    assert names(registry, "gpt-image-2") == ["openai"]
    everything = routes(keyed, LOCAL | {"fallback_for": ["*"]})
    assert names(everything, "gpt-image-2") == ["openai", "local"]


def test_fallback_for_is_only_for_local() -> None:
    with pytest.raises(ValidationError, match="fallback_for is only for kind local"):
        UpstreamSettings(**OPENAI, fallback_for=["gpt-image-1.5"])
